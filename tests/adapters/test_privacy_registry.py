"""The registered-id set GenerateDataKey checks in memory (adapters.privacy_cache): exact for the
ids this replica registered, kept current from the store, grown off the data plane."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keybroker.adapters.privacy_cache import PrivacyCache
from keybroker.adapters.privacystore import SqlPrivacyStore
from keybroker.adapters.sqldb import Database, dialect_for
from keybroker.core.privacy import RecordingEntry
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import AlreadyExistsError


def entry(recording_id: str, *, amendment: bool = False) -> RecordingEntry:
    return RecordingEntry(
        recording_id,
        ("subj",),
        ("support",),
        time.time() + 3600,
        KeyRef("recordings", 1),
        time.time(),
        wrapped_key=b"wrapped",
        amendment=amendment,
    )


@pytest.fixture
def cache(tmp_path: Path) -> PrivacyCache:
    db = Database(dialect_for(f"sqlite:{tmp_path / 'kb.db'}", base=tmp_path))
    db.migrate()
    cache = PrivacyCache(SqlPrivacyStore(db))
    cache.refresh()
    return cache


def test_an_id_is_claimed_once_and_amendments_do_not_claim(cache: PrivacyCache) -> None:
    cache.register(entry("rec-1"))
    with pytest.raises(AlreadyExistsError) as info:
        cache.register(entry("rec-1"))
    assert info.value.reason == "recording_registered"
    cache.register(entry("rec-1", amendment=True))  # the audited path
    with pytest.raises(AlreadyExistsError):
        cache.require_unregistered("rec-1")
    cache.flush_registry()
    assert cache.store.wrapped_keys("rec-1") == [b"wrapped", b"wrapped"]


def test_the_set_is_grown_on_refresh_never_full_on_the_data_plane(cache: PrivacyCache) -> None:
    """Registrations fill the table; the refresh (background thread) regrows it past half full,
    keeping ids added while it copies, so GenerateDataKey's add never has to rehash."""
    ids = [f"rec-{i}" for i in range(1100)]  # 2048 slots: past the 0.5 mark, below 0.7
    for recording_id in ids:
        cache.register(entry(recording_id))
    slots_before = cache._registered.memory_bytes
    values = cache._registered.values

    def copy_with_a_concurrent_add() -> Iterator[int]:
        copied = list(values())
        cache.register(entry("rec-during"))  # after the copy: only the catch-up list has it
        return iter(copied)

    cache._registered.values = copy_with_a_concurrent_add  # type: ignore[method-assign]
    cache.refresh()
    assert cache._registered.memory_bytes > slots_before
    assert cache._registered.load < 0.5
    for recording_id in [*ids, "rec-during"]:
        with pytest.raises(AlreadyExistsError):
            cache.require_unregistered(recording_id)
    cache.require_unregistered("rec-new")
    cache.close()


def test_a_registration_raced_by_another_replica_is_reported(tmp_path: Path) -> None:
    """Two replicas register one id before either has loaded the other's: the store keeps the
    first, and the second replica reports the refused registration (the broker journals it as
    a RegistryConflict decision)."""
    url = f"sqlite:{tmp_path / 'kb.db'}"
    Database(dialect_for(url, base=tmp_path)).migrate()
    reported: list[str] = []
    first = PrivacyCache(SqlPrivacyStore(Database(dialect_for(url, base=tmp_path))))
    second = PrivacyCache(
        SqlPrivacyStore(Database(dialect_for(url, base=tmp_path))), on_conflict=reported.append
    )
    first.refresh()
    second.refresh()
    first.register(entry("rec-raced"))
    second.register(entry("rec-raced"))  # neither knows the other's yet
    first.flush_registry()
    second.flush_registry()
    assert reported == ["rec-raced"]
    assert first.store.wrapped_keys("rec-raced") == [b"wrapped", b"wrapped"]  # both kept
    first.close()
    second.close()
