"""The stability report: one self-contained HTML page (html.py) and its figures (figures.py)."""
