"""Audits: specs (spec.py), the runner that executes them resumably (runner.py), and where runs
execute (backends.py: a local process pool or Ray)."""
