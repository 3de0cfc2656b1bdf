"""Schema migrations of the metadata store, on SQLite and PostgreSQL: upgrade in place, replicas
migrating at once, and refusal of a schema newer than the code."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from keybroker.adapters import sqldb
from keybroker.adapters.sqldb import MIGRATIONS, SCHEMA_VERSION, Database, dialect_for
from keybroker.errors import ConfigurationError


def open_db(url: str, tmp_path: Path) -> Database:
    return Database(dialect_for(url, base=tmp_path))


def applied(db: Database) -> list[int]:
    def read(cur: Any) -> list[int]:
        cur.execute("SELECT version FROM kb_schema_migrations ORDER BY version")
        return [int(r[0]) for r in cur.fetchall()]

    result: list[int] = db.run(read, write=False)
    return result


def test_an_old_schema_is_upgraded_in_place_keeping_its_rows(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store made by a version with schema 1 only is migrated to the current schema at start;
    its keys survive and migrating again changes nothing."""
    monkeypatch.setattr(sqldb, "MIGRATIONS", MIGRATIONS[:1])
    monkeypatch.setattr(sqldb, "SCHEMA_VERSION", 1)
    old = open_db(store_url, tmp_path)
    assert old.migrate() == 1

    def add_key(cur: Any) -> None:
        cur.execute(
            "INSERT INTO kb_keys (name, created_at, current_version, rotate_after_wraps) "
            "VALUES (?, ?, ?, ?)",
            ("recordings", 1.0, 1, 1000),
        )

    old.run(add_key, write=True)
    old.close()
    monkeypatch.undo()

    db = open_db(store_url, tmp_path)
    assert db.migrate() == SCHEMA_VERSION
    assert applied(db) == [number for number, _ in MIGRATIONS]

    def read(cur: Any) -> tuple[list[str], int]:
        cur.execute("SELECT name FROM kb_keys")
        names = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT COUNT(*) FROM kb_recordings")  # a table of a later migration
        return names, int(cur.fetchone()[0])

    assert db.run(read, write=False) == (["recordings"], 0)
    assert db.migrate() == SCHEMA_VERSION  # idempotent
    assert applied(db) == [number for number, _ in MIGRATIONS]
    db.close()


def test_replicas_starting_together_apply_each_migration_once(
    store_url: str, tmp_path: Path
) -> None:
    """Four connections migrate a fresh store at the same moment: no error, no migration twice."""
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def start() -> None:
        db = open_db(store_url, tmp_path)
        barrier.wait()
        try:
            db.migrate()
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    db = open_db(store_url, tmp_path)
    assert applied(db) == [number for number, _ in MIGRATIONS]
    db.close()


def test_a_schema_newer_than_the_code_is_refused(store_url: str, tmp_path: Path) -> None:
    """A store migrated by a newer keybroker is never used by an older one (fail fast)."""
    db = open_db(store_url, tmp_path)
    db.migrate()

    def from_the_future(cur: Any) -> None:
        cur.execute(
            "INSERT INTO kb_schema_migrations (version, applied_at) VALUES (?, CURRENT_TIMESTAMP)",
            (SCHEMA_VERSION + 1,),
        )

    db.run(from_the_future, write=True)
    db.close()
    older = open_db(store_url, tmp_path)
    try:
        with pytest.raises(ConfigurationError, match="newer than this keybroker"):
            older.migrate()
    finally:
        older.close()


def test_registry_keys_move_to_the_append_only_table(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 5: each recording's wrapped key (and hold copy) moves from its registry row to
    ``kb_recording_keys``, where the store reads them; the old columns are emptied."""
    from keybroker.adapters.privacystore import SqlPrivacyStore

    monkeypatch.setattr(sqldb, "MIGRATIONS", MIGRATIONS[:4])
    monkeypatch.setattr(sqldb, "SCHEMA_VERSION", 4)
    old = open_db(store_url, tmp_path)
    assert old.migrate() == 4

    def add(cur: Any) -> None:
        cur.executemany(
            "INSERT INTO kb_recordings (recording_id, purposes, retain_until, key_name, "
            "key_version, created_at, wrapped_key, held_wrapped_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                ("rec-old", '["support"]', 9e9, "recordings.e2030-01", 1, 1.0, b"blob", None),
                ("rec-held", '["qa"]', 9e9, "recordings.e2030-01", 2, 2.0, b"b2", b"held-b2"),
                ("rec-v2", '["qa"]', 9e9, "recordings", 1, 3.0, None, None),  # schema 2 row
            ],
        )

    old.run(add, write=True)
    old.close()
    monkeypatch.undo()

    db = open_db(store_url, tmp_path)
    assert db.migrate() == SCHEMA_VERSION
    store = SqlPrivacyStore(db)
    assert store.wrapped_keys("rec-old") == [b"blob"]
    assert store.wrapped_keys("rec-held") == [b"b2"]
    assert store.hold_copies("rec-held") == [b"held-b2"]
    assert store.wrapped_keys("rec-v2") == []
    assert store.count_hold_copies("recordings.e2030-01") == 1
    assert store.registered_ids(None, 10) == ["rec-held", "rec-old", "rec-v2"]

    def leftovers(cur: Any) -> int:
        cur.execute(
            "SELECT COUNT(*) FROM kb_recordings "
            "WHERE wrapped_key IS NOT NULL OR held_wrapped_key IS NOT NULL"
        )
        return int(cur.fetchone()[0])

    assert db.run(leftovers, write=False) == 0
    store.close()
