"""Key metadata in SQL: SQLite (embedded, one file) or PostgreSQL (shared by replicas).

One class, :class:`SqlKeyStore`, speaks to both through a small :class:`Dialect`: the SQL is the
same, written with ``?`` placeholders. Every write is one transaction that first takes the
writer lock of its backend (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``SELECT … FOR UPDATE`` on the
key's row), so two replicas never compute the same next version number. Every metadata change
bumps ``kb_meta.generation`` (and, on PostgreSQL, sends ``NOTIFY keybroker_keys``) so caches know
to reload; usage counts do not.

Schema migrations are numbered and applied at start-up, under the same lock (PostgreSQL: an
advisory lock), so replicas starting together apply each exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from keybroker.core.keys import (
    DEFAULT_ROTATE_AFTER_WRAPS,
    KeyInfo,
    VersionInfo,
    VersionState,
)
from keybroker.core.ports import Usage
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import ConfigurationError, StoreUnavailableError

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "keybroker_keys"
_MIGRATION_LOCK_ID = 7_274_511  # PostgreSQL advisory lock for migrations

#: Numbered schema migrations; never edit one that has shipped, add the next.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE kb_meta (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                generation BIGINT NOT NULL)""",
            "INSERT INTO kb_meta (id, generation) VALUES (1, 0)",
            """CREATE TABLE kb_keys (
                name TEXT PRIMARY KEY,
                created_at DOUBLE PRECISION NOT NULL,
                current_version INTEGER NOT NULL,
                min_decryption_version INTEGER NOT NULL DEFAULT 1,
                rotation_period BIGINT,
                rotate_after_wraps BIGINT NOT NULL)""",
            """CREATE TABLE kb_key_versions (
                name TEXT NOT NULL REFERENCES kb_keys (name),
                version INTEGER NOT NULL,
                state TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                destroy_after DOUBLE PRECISION,
                destroyed_at DOUBLE PRECISION,
                wraps BIGINT NOT NULL DEFAULT 0,
                unwraps BIGINT NOT NULL DEFAULT 0,
                last_used_at DOUBLE PRECISION,
                PRIMARY KEY (name, version))""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class Cursor(Protocol):
    """The part of a DB-API cursor both backends share."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Dialect(Protocol):
    name: str

    def connect(self) -> Any: ...

    @contextmanager
    def write(self, conn: Any) -> Iterator[Cursor]: ...

    def lock_key(self, cur: Cursor, name: str) -> None: ...

    def notify(self, cur: Cursor) -> None: ...

    def sql(self, text: str) -> str: ...

    def is_unavailable(self, exc: BaseException) -> bool: ...


class SqliteDialect:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def write(self, conn: Any) -> Iterator[Cursor]:
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")  # the database-wide writer lock
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    def lock_key(self, cur: Cursor, name: str) -> None:
        """BEGIN IMMEDIATE already serialises every writer."""

    def notify(self, cur: Cursor) -> None:
        """SQLite has no notifications: caches poll the generation."""

    def sql(self, text: str) -> str:
        return text

    def is_unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError)


class PostgresDialect:
    name = "postgresql"

    def __init__(self, url: str, password: str | None = None) -> None:
        self.url = url
        self.password = password

    def connect(self) -> Any:
        import psycopg

        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 5}
        if self.password is not None:
            kwargs["password"] = self.password
        return psycopg.connect(self.url, **kwargs)

    @contextmanager
    def write(self, conn: Any) -> Iterator[Cursor]:
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    def lock_key(self, cur: Cursor, name: str) -> None:
        cur.execute("SELECT name FROM kb_keys WHERE name = %s FOR UPDATE", (name,))

    def notify(self, cur: Cursor) -> None:
        cur.execute(f"NOTIFY {NOTIFY_CHANNEL}")

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def is_unavailable(self, exc: BaseException) -> bool:
        import psycopg

        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def dialect_for(url: str, *, base: Path, password: str | None = None) -> Dialect:
    """``sqlite:PATH`` (relative to ``base``), ``sqlite:///ABS``, or ``postgresql://…``."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDialect(url, password)
    if url.startswith("sqlite:"):
        raw = url.removeprefix("sqlite:")
        raw = "/" + raw.removeprefix("///") if raw.startswith("///") else raw
        if not raw:
            raise ConfigurationError("[state] url: sqlite: needs a file, e.g. sqlite:keybroker.db")
        path = Path(raw).expanduser()
        return SqliteDialect(path if path.is_absolute() else base / path)
    raise ConfigurationError(
        "[state] url: expected sqlite:FILE or postgresql://…, e.g. sqlite:keybroker.db"
    )


def _version(row: Sequence[Any]) -> VersionInfo:
    return VersionInfo(
        version=int(row[1]),
        state=VersionState(row[2]),
        created_at=float(row[3]),
        destroy_after=row[4],
        destroyed_at=row[5],
        wraps=int(row[6]),
        unwraps=int(row[7]),
        last_used_at=row[8],
    )


_VERSION_COLUMNS = (
    "name, version, state, created_at, destroy_after, destroyed_at, wraps, unwraps, last_used_at"
)
_KEY_COLUMNS = (
    "name, created_at, current_version, min_decryption_version, rotation_period, rotate_after_wraps"
)


class SqlKeyStore:
    """Implements :class:`keybroker.core.ports.KeyStore` over SQLite or PostgreSQL."""

    def __init__(self, dialect: Dialect) -> None:
        self._d = dialect
        self._lock = threading.Lock()
        self._conn: Any = None

    @property
    def backend(self) -> str:
        return self._d.name

    @property
    def notifications(self) -> Callable[[], Any] | None:
        """Opens a connection to LISTEN on for changes (PostgreSQL), or None (SQLite: poll)."""
        return self._d.connect if isinstance(self._d, PostgresDialect) else None

    # -- plumbing ----------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._d.connect()
                yield self._conn
            except Exception as exc:
                if not self._d.is_unavailable(exc):
                    raise
                log.warning("state store unavailable: %s", type(exc).__name__)
                self._drop()
                raise StoreUnavailableError from None

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                self._conn.close()
            self._conn = None

    def _run(self, fn: Callable[[Cursor], Any], *, write: bool) -> Any:
        with self._connection() as conn:
            if write:
                with self._d.write(conn) as cur:
                    return fn(_Sql(cur, self._d))
            cur = conn.cursor()
            try:
                return fn(_Sql(cur, self._d))
            finally:
                cur.close()

    def migrate(self) -> int:
        """Apply missing migrations; returns the schema version."""

        def apply(cur: Cursor) -> int:
            if self._d.name == "postgresql":
                cur.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_ID,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS kb_schema_migrations ("
                "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            cur.execute("SELECT version FROM kb_schema_migrations")
            applied = {int(r[0]) for r in cur.fetchall()}
            if applied and max(applied) > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"[state] the database schema (v{max(applied)}) is newer than this "
                    f"keybroker (v{SCHEMA_VERSION}); upgrade keybroker"
                )
            for number, statements in MIGRATIONS:
                if number in applied:
                    continue
                for statement in statements:
                    cur.execute(statement)
                cur.execute(
                    "INSERT INTO kb_schema_migrations (version, applied_at) "
                    "VALUES (?, CURRENT_TIMESTAMP)",
                    (number,),
                )
                log.info("state store: applied schema migration %d", number)
            return SCHEMA_VERSION

        result: int = self._run(apply, write=True)
        return result

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- reads -------------------------------------------------------------------------------

    def generation(self) -> int:
        def read(cur: Cursor) -> int:
            cur.execute("SELECT generation FROM kb_meta WHERE id = 1")
            return int(cur.fetchone()[0])

        result: int = self._run(read, write=False)
        return result

    def list_keys(self) -> list[KeyInfo]:
        def read(cur: Cursor) -> list[KeyInfo]:
            cur.execute(f"SELECT {_KEY_COLUMNS} FROM kb_keys ORDER BY name")  # noqa: S608 - constant
            key_rows = cur.fetchall()
            cur.execute(
                f"SELECT {_VERSION_COLUMNS} FROM kb_key_versions ORDER BY name, version"  # noqa: S608
            )
            versions: dict[str, list[VersionInfo]] = {}
            for row in cur.fetchall():
                versions.setdefault(row[0], []).append(_version(row))
            return [
                KeyInfo(
                    name=row[0],
                    created_at=float(row[1]),
                    current_version=int(row[2]),
                    min_decryption_version=int(row[3]),
                    rotation_period=None if row[4] is None else int(row[4]),
                    rotate_after_wraps=int(row[5]),
                    versions=tuple(versions.get(row[0], ())),
                )
                for row in key_rows
            ]

        result: list[KeyInfo] = self._run(read, write=False)
        return result

    def key(self, name: str) -> KeyInfo | None:
        for key in self.list_keys():  # few keys; one code path for both reads
            if key.name == name:
                return key
        return None

    def stale(self, state: VersionState, older_than: float) -> list[tuple[KeyRef, float]]:
        def read(cur: Cursor) -> list[tuple[KeyRef, float]]:
            cur.execute(
                "SELECT name, version, updated_at FROM kb_key_versions "
                "WHERE state = ? AND updated_at < ? ORDER BY name, version",
                (state.value, older_than),
            )
            return [(KeyRef(r[0], int(r[1])), float(r[2])) for r in cur.fetchall()]

        result: list[tuple[KeyRef, float]] = self._run(read, write=False)
        return result

    def due_destructions(self, now: float) -> list[KeyRef]:
        def read(cur: Cursor) -> list[KeyRef]:
            cur.execute(
                "SELECT name, version FROM kb_key_versions "
                "WHERE state = ? AND destroy_after <= ? ORDER BY name, version",
                (VersionState.SCHEDULED_FOR_DESTRUCTION.value, now),
            )
            return [KeyRef(r[0], int(r[1])) for r in cur.fetchall()]

        result: list[KeyRef] = self._run(read, write=False)
        return result

    # -- writes ------------------------------------------------------------------------------

    def _changed(self, cur: Cursor) -> None:
        cur.execute("UPDATE kb_meta SET generation = generation + 1 WHERE id = 1")
        self._d.notify(cur)

    def _insert_version(self, cur: Cursor, name: str, version: int, state: str, now: float) -> None:
        cur.execute(
            "INSERT INTO kb_key_versions (name, version, state, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, version, state, now, now),
        )

    def create_key(
        self, name: str, now: float, *, rotation_period: int | None, rotate_after_wraps: int
    ) -> bool:
        def write(cur: Cursor) -> bool:
            cur.execute(
                "INSERT INTO kb_keys (name, created_at, current_version, min_decryption_version, "
                "rotation_period, rotate_after_wraps) VALUES (?, ?, 0, 1, ?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (name, now, rotation_period, rotate_after_wraps),
            )
            if cur.rowcount != 1:
                return False
            self._insert_version(cur, name, 1, VersionState.PENDING.value, now)
            self._changed(cur)
            return True

        result: bool = self._run(write, write=True)
        return result

    def claim_version(self, name: str, now: float, expected_current: int | None) -> int | None:
        def write(cur: Cursor) -> int | None:
            self._d.lock_key(cur, name)
            cur.execute("SELECT current_version FROM kb_keys WHERE name = ?", (name,))
            row = cur.fetchone()
            if row is None:
                return None
            if expected_current is not None and int(row[0]) != expected_current:
                return None
            cur.execute("SELECT MAX(version) FROM kb_key_versions WHERE name = ?", (name,))
            version = int(cur.fetchone()[0] or 0) + 1
            self._insert_version(cur, name, version, VersionState.PENDING.value, now)
            return version

        result: int | None = self._run(write, write=True)
        return result

    def activate_version(self, name: str, version: int, now: float) -> None:
        def write(cur: Cursor) -> None:
            self._d.lock_key(cur, name)
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, updated_at = ? "
                "WHERE name = ? AND version = ? AND state = ?",
                (VersionState.ENABLED.value, now, name, version, VersionState.PENDING.value),
            )
            cur.execute(
                "UPDATE kb_keys SET current_version = ? WHERE name = ? AND current_version < ?",
                (version, name, version),
            )
            self._changed(cur)

        self._run(write, write=True)

    def drop_pending(self, name: str, version: int) -> bool:
        def write(cur: Cursor) -> bool:
            cur.execute(
                "DELETE FROM kb_key_versions WHERE name = ? AND version = ? AND state = ?",
                (name, version, VersionState.PENDING.value),
            )
            dropped = cur.rowcount == 1
            cur.execute(
                "DELETE FROM kb_keys WHERE name = ? AND current_version = 0 AND NOT EXISTS "
                "(SELECT 1 FROM kb_key_versions v WHERE v.name = kb_keys.name)",
                (name,),
            )
            return dropped

        result: bool = self._run(write, write=True)
        return result

    def set_state(
        self,
        name: str,
        version: int,
        *,
        expected: VersionState,
        new: VersionState,
        now: float,
        destroy_after: float | None = None,
    ) -> bool:
        def write(cur: Cursor) -> bool:
            self._d.lock_key(cur, name)
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, destroy_after = ?, updated_at = ? "
                "WHERE name = ? AND version = ? AND state = ? AND version <> "
                "(SELECT current_version FROM kb_keys WHERE name = ?)",
                (new.value, destroy_after, now, name, version, expected.value, name),
            )
            if cur.rowcount != 1:
                return False
            self._changed(cur)
            return True

        result: bool = self._run(write, write=True)
        return result

    def set_policy(
        self,
        name: str,
        *,
        rotation_period: int | None,
        rotate_after_wraps: int,
        min_decryption_version: int,
    ) -> None:
        def write(cur: Cursor) -> None:
            self._d.lock_key(cur, name)
            cur.execute(
                "UPDATE kb_keys SET rotation_period = ?, rotate_after_wraps = ?, "
                "min_decryption_version = ? WHERE name = ?",
                (rotation_period, rotate_after_wraps, min_decryption_version, name),
            )
            self._changed(cur)

        self._run(write, write=True)

    def claim_destruction(self, name: str, version: int, now: float) -> bool:
        def write(cur: Cursor) -> bool:
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, updated_at = ? "
                "WHERE name = ? AND version = ? AND state = ? AND destroy_after <= ?",
                (
                    VersionState.DESTROYING.value,
                    now,
                    name,
                    version,
                    VersionState.SCHEDULED_FOR_DESTRUCTION.value,
                    now,
                ),
            )
            if cur.rowcount != 1:
                return False
            self._changed(cur)
            return True

        result: bool = self._run(write, write=True)
        return result

    def finish_destruction(self, name: str, version: int, now: float) -> None:
        def write(cur: Cursor) -> None:
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, destroyed_at = ?, updated_at = ? "
                "WHERE name = ? AND version = ? AND state = ?",
                (
                    VersionState.DESTROYED.value,
                    now,
                    now,
                    name,
                    version,
                    VersionState.DESTROYING.value,
                ),
            )
            self._changed(cur)

        self._run(write, write=True)

    def adopt_version(self, key: KeyRef, now: float) -> bool:
        def write(cur: Cursor) -> bool:
            cur.execute(
                "INSERT INTO kb_keys (name, created_at, current_version, min_decryption_version, "
                "rotation_period, rotate_after_wraps) VALUES (?, ?, 0, 1, NULL, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (key.name, now, DEFAULT_ROTATE_AFTER_WRAPS),
            )
            self._d.lock_key(cur, key.name)
            cur.execute(
                "INSERT INTO kb_key_versions (name, version, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name, version) DO NOTHING",
                (key.name, key.version, VersionState.ENABLED.value, now, now),
            )
            if cur.rowcount != 1:
                return False
            cur.execute(
                "UPDATE kb_keys SET current_version = ? WHERE name = ? AND current_version < ?",
                (key.version, key.name, key.version),
            )
            self._changed(cur)
            return True

        result: bool = self._run(write, write=True)
        return result

    def add_usage(self, usage: Mapping[KeyRef, Usage]) -> None:
        if not usage:
            return

        def write(cur: Cursor) -> None:
            for ref, use in sorted(usage.items()):
                cur.execute(
                    "UPDATE kb_key_versions SET wraps = wraps + ?, unwraps = unwraps + ?, "
                    "last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < ? "
                    "THEN ? ELSE last_used_at END WHERE name = ? AND version = ?",
                    (
                        use.wraps,
                        use.unwraps,
                        use.last_used_at,
                        use.last_used_at,
                        ref.name,
                        ref.version,
                    ),
                )

        self._run(write, write=True)


class _Sql:
    """A cursor that rewrites ``?`` placeholders for the dialect."""

    def __init__(self, cur: Any, dialect: Dialect) -> None:
        self._cur = cur
        self._d = dialect

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cur.execute(self._d.sql(sql), tuple(params))

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())

    def close(self) -> None:
        self._cur.close()
