"""The tests' PostgreSQL: a real server, a fresh database per test, LISTEN/NOTIFY across connections."""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg


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
