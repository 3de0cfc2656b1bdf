"""Process hardening at start-up: no core dumps of a process that holds secrets.

A core dump of the broker would write its memory to disk: the HSM PIN, the audit chain key, the
checkpoint signing key and, for a moment, data keys on their way to a caller.
:func:`disable_core_dumps` sets ``RLIMIT_CORE`` to 0 (soft and hard, so nothing in the process
can raise it again) and, on Linux, marks the process not dumpable (``prctl(PR_SET_DUMPABLE,
0)``): no core even through a ``core_pattern`` pipe, and no ``ptrace`` attach or
``/proc/<pid>/mem`` read by other processes of the same user. Dumpability is reset by ``execve``,
so every worker process calls this itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    result: int = libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot disable core dumps: prctl({option}): {os.strerror(errno)}")
    return result


def is_dumpable() -> bool:
    """Whether this process may dump core or be traced (Linux; elsewhere: by the core limit)."""
    if sys.platform.startswith("linux"):
        return _prctl(PR_GET_DUMPABLE) != 0
    return resource.getrlimit(resource.RLIMIT_CORE)[0] != 0


def disable_core_dumps() -> None:
    """``RLIMIT_CORE = 0`` and, on Linux, ``PR_SET_DUMPABLE = 0``. Raises OSError if either
    cannot be set (fail closed: the caller should not serve secrets then)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        _prctl(PR_SET_DUMPABLE, 0)
    log.debug("core dumps disabled")
