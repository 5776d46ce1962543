"""Worker processes that end with the process that started them.

An audit's runs train in worker processes (a pool's, and in `share_prefix` one forked child per
run). Killed with SIGTERM or SIGKILL (`kill PID` of an audit started with `nohup … &`), the audit
process used to leave its workers training on: an audit resumed in the same folder then trained
the same runs a second time beside them, and the old workers, on finding their run folders
cleared, recorded those runs as failed over the new attempts. On Linux each worker asks the
kernel for SIGTERM when its parent ends (`prctl(PR_SET_PDEATHSIG)`); a forkserver ends when the
audit process does, so the chain audit → fork server → worker → forked run ends together. The
run stays `running` in its run.json, which a resumed audit trains again. Elsewhere this does
nothing (`RunWriter` still refuses to record the end of a superseded attempt).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent ends (Linux); True if set.
    A parent that ends between reading it and the call is caught too (the signal is sent
    at once)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent ended between getppid and prctl
        os.kill(os.getpid(), sig)
    return True


@contextmanager
def exit_on_terminate() -> Iterator[None]:
    """While inside: SIGTERM (`kill PID`) raises SystemExit(143) in the main thread, so that a
    command's own cleanup runs (`export` and `merge` remove their temporary folder) instead of
    the process ending where it stands. Outside the main thread it does nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
