"""Key lifecycle against the real SoftHSM token and a real store: SQLite and PostgreSQL alike.

Every test runs once per backend. Each test uses its own key name, so the shared dev token's
``recordings`` key (used by the data-plane tests) is never touched.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from threading import Barrier, Thread
from typing import Any

import pytest

from keybroker.adapters.catalog import CachedCatalog
from keybroker.adapters.hsm import Pkcs11Keks
from keybroker.adapters.keystore import SqlKeyStore
from keybroker.adapters.sqldb import Database, dialect_for
from keybroker.core.broker import GenerateRequest, KeyBroker
from keybroker.core.decision import Decision
from keybroker.core.identity import Principal
from keybroker.core.keys import VersionState
from keybroker.core.lifecycle import KeyLifecycle, LifecycleConfig
from keybroker.core.wrapped_key import KeyRef
from keybroker.devenv import DevEnv
from keybroker.errors import (
    FailedPreconditionError,
    InvalidRequestError,
    InvalidWrappedKeyError,
    KeybrokerError,
    NotFoundError,
)
from keybroker.server.app import connect_hsm
from tests.conftest import load_settings

S = VersionState
DAY = 86400
WHO = Principal(
    subject="storage",
    token_id="t",
    expires_at=2**40,
    scopes=frozenset({"keys:generate", "keys:unwrap", "keys:rewrap"}),
    purposes=frozenset({"support"}),
)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keks(devenv: DevEnv) -> Pkcs11Keks:
    return connect_hsm(load_settings(devenv))


class World:
    """One replica's view: store, lifecycle, catalog and data-plane broker over the real HSM."""

    def __init__(self, url: str, keks: Pkcs11Keks, clock: Clock, name: str) -> None:
        self.name = name
        self.keks = keks
        self.clock = clock
        db = Database(dialect_for(url, base=Path.cwd()))
        db.migrate()
        self.store = SqlKeyStore(db)
        self.events: list[Decision] = []
        self.life = KeyLifecycle(
            self.store,
            keks,
            clock=clock,
            config=LifecycleConfig(),
            record_event=self.events.append,
        )
        self.catalog = CachedCatalog(self.store)
        self.broker = KeyBroker(
            keks, self.catalog, clock=clock, default_key=name, default_retention_seconds=365 * DAY
        )

    def refresh(self) -> None:
        self.catalog.refresh()

    def generate(self, recording: str = "rec-1") -> bytes:
        self.refresh()
        request = GenerateRequest(recording, ["support"], ["subj"], None, self.name, {})
        return self.broker.generate(WHO, request, _decision()).wrapped_key

    def unwrap(self, blob: bytes, recording: str = "rec-1") -> KeyRef:
        self.refresh()
        out = self.broker.unwrap(
            WHO,
            recording_id=recording,
            wrapped_key=blob,
            purpose="support",
            context={},
            decision=_decision(),
        )
        return out.key

    def state(self, version: int) -> VersionState:
        found = self.life.get(self.name).version(version)
        assert found is not None
        return found.state

    def close(self) -> None:
        for ref in self.keks.versions_on_token():
            if ref.name == self.name:
                self.keks.destroy_version(ref)
        self.store.close()


def _decision() -> Decision:
    return Decision(service="keybroker.v1.KeyBroker", operation="test")


@pytest.fixture
def world(store_url: str, keks: Pkcs11Keks) -> Iterator[World]:
    w = World(store_url, keks, Clock(), f"t-{uuid.uuid4().hex[:10]}")
    w.life.create(w.name)
    yield w
    w.close()


def _reason(exc: pytest.ExceptionInfo[Any]) -> str:
    error: KeybrokerError = exc.value
    return error.reason


# -- creation and rotation ----------------------------------------------------------------------


def test_create_makes_version_one_current_in_store_and_hsm(world: World) -> None:
    key = world.life.get(world.name)
    assert key.current_version == 1
    assert [(v.version, v.state) for v in key.versions] == [(1, S.ENABLED)]
    assert KeyRef(world.name, 1) in world.keks.versions_on_token()
    with pytest.raises(FailedPreconditionError) as info:
        world.life.create(world.name)
    assert _reason(info) == "key_exists"


def test_rotation_wraps_under_the_new_version_and_old_ones_still_unwrap(world: World) -> None:
    old = world.generate()
    assert world.life.rotate(world.name) == KeyRef(world.name, 2)
    new = world.generate()
    assert world.unwrap(old) == KeyRef(world.name, 1)
    assert world.unwrap(new) == KeyRef(world.name, 2)
    key = world.life.get(world.name)
    assert key.current_version == 2
    assert [v.state for v in key.versions] == [S.ENABLED, S.ENABLED]


def test_rewrap_moves_a_key_to_the_current_version_keeping_it(world: World) -> None:
    old = world.generate()
    world.life.rotate(world.name)
    world.refresh()
    moved = world.broker.rewrap(WHO, recording_id="rec-1", wrapped_key=old, decision=_decision())
    assert moved.key == KeyRef(world.name, 2)
    assert world.unwrap(moved.wrapped_key) == KeyRef(world.name, 2)


# -- states and refusals -------------------------------------------------------------------------


def test_every_state_transition_and_its_effect_on_unwrap(world: World) -> None:
    blob = world.generate()
    world.life.rotate(world.name)
    world.life.set_state(world.name, 1, S.DECRYPT_ONLY)
    assert world.unwrap(blob).version == 1  # retired versions still unwrap
    world.life.set_state(world.name, 1, S.ENABLED)
    world.life.set_state(world.name, 1, S.DISABLED)
    with pytest.raises(FailedPreconditionError) as info:
        world.unwrap(blob)
    assert _reason(info) == "key_version_disabled"
    assert "re-enable" in info.value.message
    world.life.set_state(world.name, 1, S.DECRYPT_ONLY)  # disabled -> decrypt-only
    world.life.set_state(world.name, 1, S.DISABLED)
    world.life.set_state(world.name, 1, S.ENABLED)
    assert world.unwrap(blob).version == 1


def test_the_current_version_cannot_change_state(world: World) -> None:
    for target in (S.DISABLED, S.DECRYPT_ONLY):
        with pytest.raises(FailedPreconditionError) as info:
            world.life.set_state(world.name, 1, target)
        assert _reason(info) == "key_version_current"
    with pytest.raises(FailedPreconditionError) as info:
        world.life.schedule_destruction(world.name, 1)
    assert _reason(info) == "key_version_current"
    with pytest.raises(NotFoundError):
        world.life.set_state(world.name, 9, S.DISABLED)
    with pytest.raises(NotFoundError):
        world.life.get("no-such-key")


def test_scheduled_destruction_waits_can_be_cancelled_and_happens_once(world: World) -> None:
    blob = world.generate()
    world.life.rotate(world.name)
    with pytest.raises(InvalidRequestError) as bad:
        world.life.schedule_destruction(world.name, 1, window=3600)  # below the 1-day minimum
    assert _reason(bad) == "destruction_window_too_short"
    when = world.life.schedule_destruction(world.name, 1)
    assert when == pytest.approx(world.clock.now + 7 * DAY)
    with pytest.raises(FailedPreconditionError) as info:
        world.unwrap(blob)
    assert _reason(info) == "key_version_scheduled_for_destruction"
    with pytest.raises(FailedPreconditionError):
        world.life.set_state(world.name, 1, S.ENABLED)  # cancel first
    world.life.cancel_destruction(world.name, 1)
    assert world.state(1) is S.DISABLED
    with pytest.raises(FailedPreconditionError):
        world.life.cancel_destruction(world.name, 1)
    world.life.schedule_destruction(world.name, 1, window=2 * DAY)
    world.clock.now += 2 * DAY - 60
    assert world.life.run_due() == 0  # not yet
    assert KeyRef(world.name, 1) in world.keks.versions_on_token()
    world.clock.now += 120
    assert world.life.run_due() == 1
    assert world.life.run_due() == 0
    assert world.state(1) is S.DESTROYED
    assert KeyRef(world.name, 1) not in world.keks.versions_on_token()
    assert [e.operation for e in world.events] == ["ScheduledDestruction"]
    with pytest.raises(InvalidWrappedKeyError):
        world.unwrap(blob)  # no registry to show the blob was issued: reads like an unknown version
    for target in (S.ENABLED, S.DISABLED):
        with pytest.raises(FailedPreconditionError):
            world.life.set_state(world.name, 1, target)
    assert world.unwrap(world.generate()).version == 2  # the key itself lives on


def test_destruction_happens_exactly_once_with_replicas_racing(
    world: World, store_url: str, keks: Pkcs11Keks
) -> None:
    world.life.rotate(world.name)
    world.life.schedule_destruction(world.name, 1)
    world.clock.now += 8 * DAY
    replicas = [world] + [World(store_url, keks, world.clock, world.name) for _ in range(3)]
    barrier = Barrier(len(replicas))
    done: list[int] = []

    def race(replica: World) -> None:
        barrier.wait(10)
        done.append(replica.life.run_due())

    threads = [Thread(target=race, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == [0, 0, 0, 1]
    events = [e for r in replicas for e in r.events if e.operation == "ScheduledDestruction"]
    assert len(events) == 1
    assert world.state(1) is S.DESTROYED
    for r in replicas[1:]:
        r.store.close()


def test_minimum_decryption_version(world: World) -> None:
    old = world.generate()
    world.life.rotate(world.name)
    with pytest.raises(InvalidRequestError):
        world.life.set_policy(
            world.name, rotation_period=None, rotate_after_wraps=None, min_decryption_version=3
        )
    world.life.set_policy(
        world.name, rotation_period=None, rotate_after_wraps=None, min_decryption_version=2
    )
    with pytest.raises(FailedPreconditionError) as info:
        world.unwrap(old)
    assert _reason(info) == "key_version_below_minimum"
    world.life.set_policy(
        world.name, rotation_period=None, rotate_after_wraps=None, min_decryption_version=1
    )
    assert world.unwrap(old).version == 1


def test_unknown_version_reads_like_any_bad_blob(world: World) -> None:
    blob = bytearray(world.generate())
    # key name length (1 byte) sits after "KBW"+version; the u32 version follows the name
    offset = 5 + blob[4]
    blob[offset : offset + 4] = (7).to_bytes(4, "big")
    with pytest.raises(InvalidWrappedKeyError):
        world.unwrap(bytes(blob))


# -- schedules --------------------------------------------------------------------------------------


def test_scheduled_rotation_by_period_is_recorded(world: World) -> None:
    with pytest.raises(InvalidRequestError):
        world.life.set_policy(
            world.name, rotation_period=60, rotate_after_wraps=None, min_decryption_version=None
        )
    world.life.set_policy(
        world.name, rotation_period=3600, rotate_after_wraps=None, min_decryption_version=None
    )
    assert world.life.run_due() == 0
    world.clock.now += 3601
    assert world.life.run_due() == 1
    assert world.life.get(world.name).current_version == 2
    assert world.life.run_due() == 0
    [event] = world.events
    assert (event.operation, event.reason, event.key_version) == (
        "ScheduledRotation",
        "rotation_period_elapsed",
        2,
    )
    assert event.subject == "keybroker:scheduler"
    world.life.set_policy(
        world.name, rotation_period=0, rotate_after_wraps=None, min_decryption_version=None
    )
    world.clock.now += 10 * 3600
    assert world.life.run_due() == 0


def test_usage_is_counted_per_version_and_rotation_follows_the_wrap_limit(world: World) -> None:
    world.life.set_policy(
        world.name, rotation_period=None, rotate_after_wraps=3, min_decryption_version=None
    )
    blobs = [world.generate(f"rec-{i}") for i in range(3)]
    for i, blob in enumerate(blobs):
        world.unwrap(blob, f"rec-{i}")
    world.unwrap(blobs[0], "rec-0")
    v1 = world.life.get(world.name).version(1)
    assert v1 is not None
    assert (v1.wraps, v1.unwraps) == (0, 0)  # nothing reaches the store per call
    world.catalog.flush_usage()
    v1 = world.life.get(world.name).version(1)
    assert v1 is not None
    assert (v1.wraps, v1.unwraps) == (3, 4)
    assert v1.last_used_at is not None
    assert world.life.run_due() == 1
    assert world.events[-1].reason == "wrap_limit_reached"
    assert world.life.get(world.name).current_version == 2


# -- crash repair -----------------------------------------------------------------------------------


def test_reconcile_finishes_or_abandons_an_interrupted_rotation(world: World) -> None:
    # The HSM step happened, the store step did not (a crash in between).
    v2 = world.store.claim_version(world.name, world.clock(), None)
    assert v2 == 2
    world.keks.create_version(KeyRef(world.name, 2))
    # A claim whose HSM step never happened.
    v3 = world.store.claim_version(world.name, world.clock(), None)
    assert v3 == 3
    assert world.life.reconcile() == 0  # too recent: a live replica may be mid-rotation
    world.clock.now += 61
    assert world.life.reconcile() == 2
    key = world.life.get(world.name)
    assert key.current_version == 2
    assert [(v.version, v.state) for v in key.versions] == [(1, S.ENABLED), (2, S.ENABLED)]
    assert {e.reason for e in world.events} == {"rotation_completed", "rotation_abandoned"}
    world.life.rotate(world.name)
    assert world.life.get(world.name).current_version == 3


def test_reconcile_finishes_an_interrupted_destruction(world: World) -> None:
    world.life.rotate(world.name)
    world.life.schedule_destruction(world.name, 1)
    world.clock.now += 8 * DAY
    assert world.store.claim_destruction(world.name, 1, world.clock())  # then the crash
    world.clock.now += 61
    assert world.life.reconcile() == 1
    assert world.state(1) is S.DESTROYED
    assert KeyRef(world.name, 1) not in world.keks.versions_on_token()


def test_full_reconcile_adopts_hsm_objects_without_metadata(world: World) -> None:
    """Objects without metadata are adopted: a new version of a known key as enabled but never
    current (that takes make_current); a key nobody knew (`kek create --offline` before the
    first start) gets its version current."""
    world.keks.create_version(KeyRef(world.name, 2))  # found on the token
    orphan = f"o-{uuid.uuid4().hex[:8]}"
    world.keks.create_version(KeyRef(orphan, 1))
    try:
        assert world.life.reconcile(full=True) >= 2
        key = world.life.get(world.name)
        assert key.current_version == 1
        assert {v.version: v.state for v in key.versions}[2] is S.ENABLED
        assert world.life.get(orphan).current_version == 1
        reasons = {e.reason for e in world.events}
        assert {"adopted_from_hsm", "adopted_from_hsm_not_current"} <= reasons
        assert world.life.reconcile(full=True) == 0
        assert world.life.make_current(world.name, 2).current_version == 2
    finally:
        world.keks.destroy_version(KeyRef(orphan, 1))
