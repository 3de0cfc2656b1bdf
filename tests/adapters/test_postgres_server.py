"""The tests' PostgreSQL: a real server, a fresh database per test, LISTEN/NOTIFY across connections."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from keybroker.adapters.sqldb import Database, PostgresDialect, dialect_for
from keybroker.errors import StoreUnavailableError


def test_fresh_database_stores_and_reads_back(postgres_url: str) -> None:
    dbname = urlsplit(postgres_url).path.lstrip("/")
    with psycopg.connect(postgres_url, connect_timeout=10) as conn:
        database, encoding = conn.execute(
            "SELECT current_database(), pg_encoding_to_char(encoding)"
            " FROM pg_database WHERE datname = current_database()"
        ).fetchone() or (None, None)
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        conn.execute("CREATE TABLE recordings (id text PRIMARY KEY, size bigint NOT NULL)")
        conn.execute(
            "INSERT INTO recordings (id, size) VALUES (%s, %s), (%s, %s)",
            ("rec-0001", 42, "rec-0002", 2**40),
        )
        conn.commit()
    with psycopg.connect(postgres_url, connect_timeout=10) as conn:
        rows = conn.execute("SELECT id, size FROM recordings ORDER BY id").fetchall()
    assert (database, encoding) == (dbname, "UTF8")
    assert tables == (0,)
    assert rows == [("rec-0001", 42), ("rec-0002", 2**40)]


def test_listen_notify_across_connections(postgres_url: str) -> None:
    with (
        psycopg.connect(postgres_url, autocommit=True, connect_timeout=10) as listener,
        psycopg.connect(postgres_url, autocommit=True, connect_timeout=10) as sender,
    ):
        listener.execute("LISTEN recordings_changed")
        sender.execute("SELECT pg_notify(%s, %s)", ("recordings_changed", "rec-0001"))
        received = list(listener.notifies(timeout=10, stop_after=1))
        sender_pid = sender.info.backend_pid
    assert [(n.channel, n.payload, n.pid) for n in received] == [
        ("recordings_changed", "rec-0001", sender_pid)
    ]


def test_a_replica_frozen_in_a_transaction_blocks_nobody_for_long(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker's connection holding a lock, then frozen inside its transaction, neither makes
    another broker wait for ever (lock_timeout: UNAVAILABLE) nor keeps its lock (PostgreSQL ends
    the idle transaction); the frozen one reconnects on its next call."""
    monkeypatch.setattr(PostgresDialect, "lock_timeout_ms", 300)
    monkeypatch.setattr(PostgresDialect, "idle_in_transaction_ms", 1_500)
    frozen = Database(dialect_for(postgres_url, base=Path.cwd()))
    other = Database(dialect_for(postgres_url, base=Path.cwd()))
    frozen.migrate()
    conn = PostgresDialect(postgres_url).connect()
    assert conn.execute("SHOW lock_timeout").fetchone() == ("300ms",)
    conn.close()

    def lock(cur: object) -> None:
        cur.execute("LOCK TABLE kb_schema_migrations IN EXCLUSIVE MODE")  # type: ignore[attr-defined]

    def write(cur: object) -> None:
        cur.execute("INSERT INTO kb_schema_migrations VALUES (?, ?)", (10_000, "x"))  # type: ignore[attr-defined]

    frozen.run(lock, write=True)  # its connection is open
    held = frozen._conn  # frozen inside a transaction, holding a lock
    held.execute("BEGIN")
    held.execute("LOCK TABLE kb_schema_migrations IN EXCLUSIVE MODE")
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        other.run(write, write=True)
    assert time.monotonic() - started < 5  # refused after the lock timeout, not hung
    time.sleep(2.5)  # the frozen transaction outlives idle_in_transaction_session_timeout
    other.run(write, write=True)  # its lock is gone
    with pytest.raises(StoreUnavailableError):
        frozen.run(lock, write=True)  # thawed: its session was ended (unavailable, retryable)
    frozen.run(lock, write=True)  # and the next call reconnects
    frozen.close()
    other.close()
