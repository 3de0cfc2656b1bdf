"""Files and directories the broker and ``keybroker dev init`` create: owner-only, whatever the
umask (0600 files, 0700 directories).

A mode given to ``open``/``mkdir`` is only ever narrowed by the umask, so asking for 0600/0700
at creation is enough under any umask (000 included). Python's ``Path.write_text``,
``Path.mkdir(parents=True)`` and ``open(..., "a")`` ask for 0666/0777 and leave the rest to the
umask; these helpers do not. Existing files and directories keep their mode (an operator's
choice, e.g. a shared parent directory).
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents with mode 0700; return ``path``."""
    missing: list[Path] = []
    here = path
    while not here.exists() and here != here.parent:
        missing.append(here)
        here = here.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
    return path


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (its parents 0700).

    An existing file is never opened: closing any descriptor of a file drops every POSIX lock
    this process holds on it, and SQLite's locks are POSIX locks — opening and closing a live
    database here (as a first version of this did) let two connections of one process write
    at once and corrupted it."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def write_private(path: Path, data: bytes | str) -> None:
    """Write ``path`` (created 0600, parents 0700; an existing file is truncated, mode kept)."""
    private_dir(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
