"""The metadata database: SQLite (embedded, one file) or PostgreSQL (shared by replicas).

:class:`Database` speaks to both through a small :class:`Dialect`: the SQL is the same, written
with ``?`` placeholders. Every write is one transaction that first takes the writer lock of its
backend (SQLite ``BEGIN IMMEDIATE``; PostgreSQL a row lock or an advisory lock), so replicas never
interleave conflicting changes.

Schema migrations are numbered and applied at start-up, under the same lock (PostgreSQL: an
advisory lock), so replicas starting together apply each exactly once. Never edit a migration
that has shipped: add the next one.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from keybroker.adapters.files import create_private
from keybroker.errors import ConfigurationError, StoreUnavailableError

T = TypeVar("T")

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "keybroker_keys"
_MIGRATION_LOCK_ID = 7_274_511  # PostgreSQL advisory lock for migrations
_MIGRATION_ATTEMPTS = 5

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
    (
        2,
        (
            """CREATE TABLE kb_recordings (
                recording_id TEXT PRIMARY KEY,
                purposes TEXT NOT NULL,
                retain_until DOUBLE PRECISION NOT NULL,
                key_name TEXT NOT NULL,
                key_version INTEGER NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                erased_at DOUBLE PRECISION)""",
            """CREATE TABLE kb_recording_subjects (
                subject_id TEXT NOT NULL,
                recording_id TEXT NOT NULL,
                PRIMARY KEY (subject_id, recording_id))""",
            "CREATE INDEX kb_recording_subjects_by_recording "
            "ON kb_recording_subjects (recording_id)",
            """CREATE TABLE kb_erasures (
                seq {serial},
                kind TEXT NOT NULL,
                target TEXT NOT NULL,
                reason TEXT NOT NULL,
                erased_by TEXT NOT NULL,
                erased_at DOUBLE PRECISION NOT NULL,
                recordings BIGINT NOT NULL,
                UNIQUE (kind, target))""",
            """CREATE TABLE kb_holds (
                kind TEXT NOT NULL,
                target TEXT NOT NULL,
                reason TEXT NOT NULL,
                placed_by TEXT NOT NULL,
                placed_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (kind, target))""",
            """CREATE TABLE kb_replicas (
                replica_id TEXT PRIMARY KEY,
                seen_privacy BIGINT NOT NULL,
                heartbeat_at DOUBLE PRECISION NOT NULL)""",
            "ALTER TABLE kb_meta ADD COLUMN privacy_generation BIGINT NOT NULL DEFAULT 0",
        ),
    ),
    (
        3,
        (
            # retention epochs: the registry keeps each recording's wrapped key (ciphertext
            # under an HSM key) so held recordings can be moved to the hold key before their
            # epoch key is destroyed, and the hold copy it made.
            "ALTER TABLE kb_recordings ADD COLUMN wrapped_key {blob}",
            "ALTER TABLE kb_recordings ADD COLUMN held_wrapped_key {blob}",
            "CREATE INDEX kb_recordings_by_key ON kb_recordings (key_name)",
        ),
    ),
    (
        4,
        (
            # purposes removed from a recording by AmendPurposes (consent withdrawn): refused at
            # unwrap even with a wrapped key made before the removal, until added back.
            """CREATE TABLE kb_purpose_withdrawals (
                recording_id TEXT NOT NULL,
                purpose TEXT NOT NULL,
                reason TEXT NOT NULL,
                withdrawn_by TEXT NOT NULL,
                withdrawn_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (recording_id, purpose))""",
        ),
    ),
    (
        5,
        (
            # every wrapped key of a recording, append-only (registration, then each purpose
            # amendment): a later GenerateDataKey can no longer overwrite the one a legal hold
            # must keep. A hold copy (the key rewrapped to the hold key) belongs to one row.
            """CREATE TABLE kb_recording_keys (
                seq {serial},
                recording_id TEXT NOT NULL,
                key_name TEXT NOT NULL,
                key_version INTEGER NOT NULL,
                wrapped_key {blob} NOT NULL,
                registered_at DOUBLE PRECISION NOT NULL,
                held_wrapped_key {blob})""",
            "CREATE INDEX kb_recording_keys_by_recording ON kb_recording_keys (recording_id)",
            "CREATE INDEX kb_recording_keys_by_key ON kb_recording_keys (key_name, key_version)",
            "INSERT INTO kb_recording_keys (recording_id, key_name, key_version, wrapped_key, "
            "registered_at, held_wrapped_key) SELECT recording_id, key_name, key_version, "
            "wrapped_key, created_at, held_wrapped_key FROM kb_recordings "
            "WHERE wrapped_key IS NOT NULL ORDER BY created_at, recording_id",
            "UPDATE kb_recordings SET wrapped_key = NULL, held_wrapped_key = NULL",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class Cursor(Protocol):
    """The part of a DB-API cursor both backends share."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Dialect(Protocol):
    name: str
    serial: str
    """Column type of an auto-incrementing integer primary key."""
    blob: str
    """Column type of binary data."""

    def connect(self) -> Any: ...

    @contextmanager
    def write(self, conn: Any) -> Iterator[Cursor]: ...

    def lock_key(self, cur: Cursor, name: str) -> None: ...

    def lock(self, cur: Cursor, lock_id: int) -> None:
        """A transaction-wide lock on one subject area (PostgreSQL advisory lock)."""
        ...

    def notify(self, cur: Cursor) -> None: ...

    def sql(self, text: str) -> str: ...

    def is_unavailable(self, exc: BaseException) -> bool: ...


class SqliteDialect:
    name = "sqlite"
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob = "BLOB"

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> Any:
        create_private(self.path)  # 0600 (its -wal/-shm files follow it), whatever the umask
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

    def lock(self, cur: Cursor, lock_id: int) -> None:
        """BEGIN IMMEDIATE already serialises every writer."""

    def notify(self, cur: Cursor) -> None:
        """SQLite has no notifications: caches poll the generation."""

    def sql(self, text: str) -> str:
        return text

    def is_unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError)


class PostgresDialect:
    name = "postgresql"
    serial = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    blob = "BYTEA"
    lock_timeout_ms = 10_000
    """A statement waiting longer for a lock fails (the store is unavailable: UNAVAILABLE,
    retryable), as SQLite's busy timeout does; nothing waits for ever behind another replica."""
    idle_in_transaction_ms = 30_000
    """PostgreSQL ends a session of this broker left idle inside a transaction that long (a
    replica frozen mid-transaction, e.g. a stopped VM), so its locks never block the others."""

    def __init__(self, url: str, password: str | None = None) -> None:
        self.url = url
        self.password = password

    def connect(self) -> Any:
        import psycopg

        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 5}
        if self.password is not None:
            kwargs["password"] = self.password
        conn = psycopg.connect(self.url, **kwargs)
        try:
            conn.execute(f"SET lock_timeout = {int(self.lock_timeout_ms)}")
            conn.execute(
                f"SET idle_in_transaction_session_timeout = {int(self.idle_in_transaction_ms)}"
            )
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def write(self, conn: Any) -> Iterator[Cursor]:
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    def lock_key(self, cur: Cursor, name: str) -> None:
        cur.execute("SELECT name FROM kb_keys WHERE name = %s FOR UPDATE", (name,))

    def lock(self, cur: Cursor, lock_id: int) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))

    def notify(self, cur: Cursor) -> None:
        cur.execute(f"NOTIFY {NOTIFY_CHANNEL}")

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def is_unavailable(self, exc: BaseException) -> bool:
        import psycopg

        ended = psycopg.errors.IdleInTransactionSessionTimeout  # this broker was frozen
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | ended)


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


class Database:
    """One connection to the store (SQLite file or PostgreSQL), shared by the stores built on it.

    Calls are serialised by a lock: the store is off the hot path. A lost connection raises
    StoreUnavailableError and is reopened on the next call.
    """

    def __init__(self, dialect: Dialect) -> None:
        self._d = dialect
        self._lock = threading.Lock()
        self._conn: Any = None

    @property
    def backend(self) -> str:
        return self._d.name

    @property
    def dialect(self) -> Dialect:
        return self._d

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
                detail = f": {exc}" if isinstance(exc, sqlite3.Error) else ""  # no secrets in it
                log.warning("state store unavailable: %s%s", type(exc).__name__, detail)
                self._drop()
                raise StoreUnavailableError from None

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                self._conn.close()
            self._conn = None

    def run(self, fn: Callable[[Cursor], T], *, write: bool) -> T:
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
                    sql = statement.replace("{serial}", self._d.serial)
                    cur.execute(sql.replace("{blob}", self._d.blob))
                cur.execute(
                    "INSERT INTO kb_schema_migrations (version, applied_at) "
                    "VALUES (?, CURRENT_TIMESTAMP)",
                    (number,),
                )
                log.info("state store: applied schema migration %d", number)
            return SCHEMA_VERSION

        # Start-up of several replicas or workers on one fresh store: a competitor converting
        # SQLite to WAL or holding the migration lock can make an attempt fail at once (not
        # every SQLite lock waits for the busy timeout). Migrating is idempotent: try again.
        for attempt in range(1, _MIGRATION_ATTEMPTS):
            try:
                result: int = self.run(apply, write=True)
            except StoreUnavailableError:
                time.sleep(0.1 * attempt)
            else:
                return result
        last: int = self.run(apply, write=True)  # the last attempt's failure is the caller's
        return last

    def close(self) -> None:
        with self._lock:
            self._drop()


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

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        return self._cur.executemany(self._d.sql(sql), [tuple(r) for r in rows])

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())

    def close(self) -> None:
        self._cur.close()
