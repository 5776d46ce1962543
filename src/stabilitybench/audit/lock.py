"""One audit process at a time per audit folder: an advisory lock that dies with its holder.

The lock is `fcntl.flock` on `<audit>/audit.lock`. The operating system releases it when the
holding process exits for any reason (SIGKILL and power loss included), so a dead holder never
keeps a folder locked; the file itself stays behind, harmless. While held, the file says who
holds it (pid, host, start time), so a second `stabilitybench audit` can name the holder.
`flock` also works on NFS (Linux emulates it with POSIX locks), where a shared audit folder lives.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from stabilitybench.errors import StabilityBenchError

LOCK_FILE = "audit.lock"


class AuditLock:
    """Exclusive, non-blocking hold on an audit folder (use as a context manager)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise a user error naming the process that holds it."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC (Python's default): worker processes never inherit, so never keep, the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe(_read_holder(fd))
            os.close(fd)
            raise StabilityBenchError(
                f"--out: {self.folder} is in use by another audit ({who}); one audit process "
                "at a time writes a folder: wait for it to finish or stop it, then rerun to resume"
            ) from None
        except OSError as exc:  # e.g. ENOLCK: an NFS mount without a lock service
            os.close(fd)
            raise StabilityBenchError(
                f"--out: cannot lock {self.path} ({exc.strerror}); the audit folder must be on a "
                "filesystem with file locks (flock), so that two audits never write it at once"
            ) from None
        holder: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Let go (also done by the OS if this process dies)."""
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # nobody holds it now
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> AuditLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):  # the holder is between taking the lock and writing its name
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that is just starting"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}"
    )
