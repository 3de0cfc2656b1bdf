"""One writer per journal: an exclusive ``flock`` on a lock file, taken before a broker binds.

Two processes appending to one hash chain corrupt it (each computes the next record from its own
head). Every broker therefore takes, at start and before it binds its port:

* ``<[audit] dir>/keybroker.lock``: the journal directory, held by ``keybroker serve`` (the
  supervisor when ``[server] processes`` > 1) for as long as it runs;
* ``<[audit] dir>/w<N>/writer.lock``: worker ``N``'s slot, held by the process that writes it.

A second broker whose journal would be the same fails with a :class:`ConfigurationError` naming
the holder's PID (written into the lock file) and the path. ``flock`` locks belong to the open
file and vanish with the process, so a crashed broker never leaves a stale lock behind. Brokers
sharing a state store but each with its own ``[audit] dir`` do not meet here at all.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from keybroker.adapters.files import private_dir
from keybroker.errors import ConfigurationError

DIR_LOCK = "keybroker.lock"
SLOT_LOCK = "writer.lock"


class JournalLock:
    """An exclusive lock held on one lock file until :meth:`release` (or process exit)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = -1

    def __repr__(self) -> str:
        return f"JournalLock({str(self.path)!r}, held={self._fd >= 0})"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def acquire(path: Path, what: str) -> JournalLock:
    """Take the lock file ``path`` (made 0600), or raise a ConfigurationError naming its holder."""
    try:
        private_dir(path.parent)  # 0700, as the journal makes its directories
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigurationError(
            f"[audit] dir: cannot open the lock file {path} ({exc.strerror}); "
            "check that the directory exists and is writable by this user"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        raise ConfigurationError(
            f"[audit] dir: {what} is in use by another keybroker (pid {pid}; lock {path}); "
            "two brokers must never write one journal: stop that one, or give this broker its "
            "own [audit] dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return JournalLock(path, fd)


def lock_directory(directory: Path) -> JournalLock:
    """The whole journal directory, for the process that runs ``keybroker serve``."""
    return acquire(directory / DIR_LOCK, f"journal {directory}")


def lock_slot(directory: Path, worker: int) -> JournalLock:
    """Worker ``worker``'s chain ``<directory>/w<worker>``, for the process that writes it."""
    slot = directory / f"w{worker}"
    return acquire(slot / SLOT_LOCK, f"journal {slot}")
