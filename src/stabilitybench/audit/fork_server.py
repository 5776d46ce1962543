"""Imported by the audit's multiprocessing fork server, first of its preloads (`PRELOAD`): the
fork server ends with the audit process that started it (`lifetime.die_with_parent`).

The pool's workers are forked by the fork server, and each holds the pipe end whose closing
would tell the fork server that the audit is gone; so without this a killed audit left the fork
server waiting on its workers and the workers training on. With it the chain ends together:
audit → fork server (here) → worker (`backends.worker_init`) → a `share_prefix` run's forked
process (`workloads.rl`). Imported anywhere but in a fork server, this module does nothing.
"""

from __future__ import annotations

import sys

from stabilitybench.lifetime import die_with_parent


def in_fork_server() -> bool:
    """Whether this process is a multiprocessing fork server (`python -c 'from
    multiprocessing.forkserver import main; main(…)'`)."""
    return sys.argv == ["-c"] and "multiprocessing.forkserver" in sys.modules


if in_fork_server():
    die_with_parent()
