"""Where the client's access token comes from: a string, a file re-read when it changes, or any
callable returning the current token."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

#: Anything returning the token to send now.
TokenProvider = Callable[[], str]


class StaticToken:
    """A fixed token (tests, short scripts)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return "StaticToken(***)"


class TokenFile:
    """A token in a file that another process refreshes (e.g. a sidecar or a mounted secret).

    The file is re-read only when its inode, size or modification time changes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def __call__(self) -> str:
        st = self._path.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if stamp != self._stamp:
                self._token = self._path.read_text().strip()
                self._stamp = stamp
            return self._token

    def __repr__(self) -> str:
        return f"TokenFile({str(self._path)!r})"


def as_provider(token: str | TokenProvider) -> TokenProvider:
    return StaticToken(token) if isinstance(token, str) else token
