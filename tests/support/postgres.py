"""A real PostgreSQL server for tests: a throwaway local cluster, or the one a URL names.

``KEYBROKER_TEST_POSTGRES_URL`` (a ``postgresql://`` URL of a superuser, or of a role that may
create databases) points the fixtures at an existing server; otherwise they ``initdb`` a cluster
into a temporary directory and start it on 127.0.0.1 only, on a free port, as the ``postgres``
system user when the tests run as root (PostgreSQL refuses to run as root).
``scripts/ensure-system-deps.sh`` installs the server binaries; without them the fixtures fail,
they never skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from tests.support.process import free_port

ENV_URL = "KEYBROKER_TEST_POSTGRES_URL"
SYSTEM_USER = "postgres"
SUPERUSER = "postgres"
_BINARIES = ("initdb", "pg_ctl", "postgres")
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_START_ATTEMPTS = 3  # a free port can be taken by someone else between probe and bind
_STATEMENT_TIMEOUT = "SET statement_timeout = '30s'"  # bounds CREATE and DROP DATABASE


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found or started; the message says why and what to do."""


def _has_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _BINARIES)


def _version_key(name: str) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(\.\d+)*", name):
        return None
    return tuple(int(part) for part in name.split("."))


def find_bin_dir(search_path: str | None = None, debian_root: Path = _DEBIAN_ROOT) -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    ``pg_ctl`` on ``search_path`` (default: ``PATH``) wins, with symlinks resolved, because
    ``pg_ctl`` starts the ``postgres`` beside its real file; else the newest
    ``/usr/lib/postgresql/<version>/bin`` (where Debian installs them, off ``PATH``).
    """
    pg_ctl = shutil.which("pg_ctl", path=search_path)
    if pg_ctl is not None:
        for directory in (Path(pg_ctl).resolve().parent, Path(pg_ctl).parent):
            if _has_binaries(directory):
                return directory
    versions: list[tuple[tuple[int, ...], Path]] = []
    for directory in debian_root.glob("*/bin"):
        key = _version_key(directory.parent.name)
        if key is not None and _has_binaries(directory):
            versions.append((key, directory))
    if versions:
        return max(versions)[1]
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) are neither on PATH nor in "
        f"{debian_root}/<version>/bin; run scripts/ensure-system-deps.sh (Debian package "
        f"`postgresql`) or set {ENV_URL} to a server's postgresql:// URL"
    )


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PostgresUnavailable(
            f"running as root, PostgreSQL needs the {SYSTEM_USER!r} system user, which is "
            "missing, and useradd is not available to create it"
        )
    done = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home",
         "--home-dir", "/var/lib/postgresql", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise PostgresUnavailable(
            f"could not create the {SYSTEM_USER!r} system user: {done.stderr.strip()}"
        )
    return pwd.getpwnam(SYSTEM_USER)


def _drop_root_prefix() -> list[str]:
    """argv prefix running a command as the ``postgres`` user (root only).

    setpriv execs the command in place, so the server stays this process's own child (reaped here,
    whatever PID 1 does with orphans); runuser forks and waits, which is fine too.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups", "--"]
    runuser = shutil.which("runuser")
    if runuser is not None:
        return [runuser, "-u", SYSTEM_USER, "--"]
    raise PostgresUnavailable(
        "running as root, PostgreSQL must run as another user, but neither setpriv nor runuser "
        "(util-linux) is available"
    )


def _server_env() -> dict[str, str]:
    # PG* variables of the caller (PGDATA, PGPORT, ...) must not steer the throwaway cluster; the
    # C locale keeps the server's messages (matched below) in English.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class LocalPostgres:
    """A throwaway cluster: ``initdb`` into a temporary directory, served on 127.0.0.1 only.

    Trust authentication, UTF8, the unix socket inside the temporary directory, ``fsync=off``.
    ``postgres`` runs in the foreground as a child of this process, its output in ``server.log``.
    :meth:`close` stops the server and removes the directory; it is safe to call twice.
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.bin_dir = bin_dir if bin_dir is not None else find_bin_dir()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self._prefix: list[str] = []
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._owner = _ensure_system_user()
            self._prefix = _drop_root_prefix()
        self._proc: subprocess.Popen[bytes] | None = None
        self.root = Path(tempfile.mkdtemp(prefix="keybroker-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"

    def start(self) -> None:
        """initdb, then start the server and wait (bounded) until it accepts connections."""
        self.sockets.mkdir()
        if self._owner is not None:
            for path in (self.root, self.sockets):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        argv = [str(self.bin_dir / "initdb"), "--pgdata", str(self.data), "--username", SUPERUSER,
                "--auth", "trust", "--encoding", "UTF8", "--locale", "C", "--no-sync"]  # fmt: skip
        try:
            initdb = subprocess.run(
                [*self._prefix, *argv], cwd=self.root, env=_server_env(),
                capture_output=True, text=True, timeout=self.start_timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise PostgresUnavailable(
                f"initdb did not finish in {self.start_timeout:.0f}s"
            ) from exc
        if initdb.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed (exit {initdb.returncode}):\n{initdb.stdout}{initdb.stderr}"
            )
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = free_port()
            self._spawn()
            problem = self._wait_accepting()
            if problem is None:
                return
            self._stop_server()
            port_taken = "already in use" in self.log_tail(10) or "another server" in problem
            if attempt < _START_ATTEMPTS and port_taken:
                continue
            raise PostgresUnavailable(
                f"PostgreSQL did not start on {self.host}:{self.port}: {problem}\n"
                f"server log ({self.log}):\n{self.log_tail()}"
            )

    def _spawn(self) -> None:
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.sockets),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with self.log.open("wb") as log:  # truncated: "already in use" is this attempt's
            self._proc = subprocess.Popen(
                [*self._prefix, *argv], cwd=self.root, env=_server_env(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def _wait_accepting(self) -> str | None:
        """None once this cluster accepts connections on its port, else why not (bounded)."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                return f"postgres exited with status {code}"
            try:
                with psycopg.connect(self.url(), connect_timeout=2) as conn:
                    row = conn.execute("SELECT current_setting('data_directory')").fetchone()
            except psycopg.Error as exc:
                if time.monotonic() >= deadline:
                    return f"no connection accepted in {self.start_timeout:.0f}s: {exc}"
                time.sleep(0.05)
                continue
            # The port was free when probed; someone else may have taken it since.
            served = os.path.realpath(row[0]) if row else None
            if served != os.path.realpath(self.data):
                return f"port {self.port} is answered by another server (data directory {served})"
            return None

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data / "postmaster.pid").read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        return int(first) if first.strip().isdigit() else None

    def _stop_server(self) -> None:
        """Fast shutdown, then immediate, then kill; each wait bounded; the child reaped."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # With setpriv (or not root) the child is the postmaster; under runuser it is its parent.
        postmaster = self._postmaster_pid() or proc.pid
        steps = ((signal.SIGINT, self.stop_timeout), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0))
        for sig, timeout in steps:
            if proc.poll() is not None:
                return
            for pid in {postmaster, proc.pid} if sig == signal.SIGKILL else {postmaster}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)

    def close(self) -> None:
        try:
            self._stop_server()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class PostgresServer:
    """A reachable server: ``admin_url`` may create and drop databases."""

    admin_url: str

    def url_for(self, dbname: str) -> str:
        """``admin_url`` with its database replaced (user, host, port and query kept)."""
        return urlunsplit(urlsplit(self.admin_url)._replace(path=f"/{dbname}"))


def _check_external(url: str) -> str | None:
    """Why ``url`` cannot be used, or None when it can."""
    if urlsplit(url).scheme not in {"postgresql", "postgres"}:
        return "it is not a postgresql:// URL"
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"it is not reachable: {exc}"
    return None


def _start_local() -> LocalPostgres:
    local = LocalPostgres()
    try:
        local.start()
    except BaseException:
        local.close()
        raise
    return local


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The server named by ``KEYBROKER_TEST_POSTGRES_URL`` if reachable, else a local cluster."""
    external = os.environ.get(ENV_URL, "").strip()
    if external:
        problem = _check_external(external)
        if problem is None:
            yield PostgresServer(external)
            return
        # Not a warning: the suite turns warnings into errors. Shown with the test's output.
        print(f"{ENV_URL} ignored, {problem}; starting a local cluster", file=sys.stderr)
    try:
        local = _start_local()
    except PostgresUnavailable as exc:
        problem = str(exc)
    else:
        try:
            yield PostgresServer(local.url())
        finally:
            local.close()
        return
    # Outside the except block, so the report shows the message once, without a traceback.
    pytest.fail(f"no PostgreSQL server for the tests: {problem}", pytrace=False)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """libpq URL of a fresh, empty database, dropped after the test."""
    name = f"kbtest_{uuid.uuid4().hex[:16]}"
    database = sql.Identifier(name)
    with psycopg.connect(postgres_server.admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(_STATEMENT_TIMEOUT)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(database))
    try:
        yield postgres_server.url_for(name)
    finally:
        with psycopg.connect(
            postgres_server.admin_url, autocommit=True, connect_timeout=10
        ) as conn:
            conn.execute(_STATEMENT_TIMEOUT)
            # FORCE terminates connections the test left open (PostgreSQL 13+).
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(database))
