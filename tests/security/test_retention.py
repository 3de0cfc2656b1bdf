"""Regression tests for the fixes of retention and legal holds: crypto-shredding must never take
held evidence, and must take what is no longer held (see tests/security/README.md for how each
test names the CHANGELOG entry it guards). One-day epochs on a base key of the test's own."""

from __future__ import annotations

import os
import time
from functools import partial

import grpc

from keybroker.core.privacy import Hold, Target
from keybroker.core.retention import EPOCH_KEYS_PER_MINUTE, EpochScheme
from keybroker.core.wrapped_key import CIPHERTEXT_SIZE, NONCE_SIZE, KeyRef, WrappedKey
from keybroker.devenv import DevEnv
from keybroker.server.app import RunningBroker
from keybroker.v1 import admin_pb2 as apb
from keybroker.v1 import privacy_pb2 as ppb
from tests.conftest import Clock
from tests.security.conftest import DAY_EPOCHS, Start
from tests.security.support import Caller, days_ahead, new_id, refused

DAY = 86400
SCHEME = EpochScheme(DAY, 3600)


def _past_shredding(clock: Clock, epoch_key: str) -> None:
    """Move the broker's clock just past the moment ``epoch_key`` is due to be shredded."""
    epoch = SCHEME.parse(epoch_key)
    assert epoch is not None
    clock.offset = SCHEME.shred_after(epoch[1]) - time.time() + 60


def _on_token(broker: RunningBroker, name: str) -> bool:
    return any(ref.name == name for ref in broker.keks.versions_on_token())


def test_key_admin_cannot_destroy_or_rotate_away_a_version_wrapping_held_recordings(
    devenv: DevEnv, start: Start, own_clock: Clock, base_key: str
) -> None:
    """Unreleased, Security: "KeyAdmin could destroy held evidence:
    `ScheduleKeyVersionDestruction` of a version that wraps held recordings, and `RotateKey` of
    such an epoch or hold key, are FAILED_PRECONDITION `legal_hold`".

    A recording under an epoch key is held: scheduling the destruction of the key's version and
    rotating the key are both refused ``legal_hold`` and the key is unchanged."""
    broker = start(**DAY_EPOCHS)
    caller = Caller(devenv, broker.port)
    try:
        rec = new_id()
        epoch_key = caller.generate(
            rec, key_name=base_key, retain_until=days_ahead(own_clock, 0.5)
        ).key_ref.key_name
        caller.admin_call("RotateKey", apb.RotateKeyRequest(name=epoch_key))  # v2, not held yet
        caller.privacy_call("PlaceLegalHold", ppb.LegalHoldRequest(recording_id=rec, reason="c"))
        assert broker.privacy is not None and broker.lifecycle is not None
        broker.privacy.flush_registry()
        destroy = apb.ScheduleKeyVersionDestructionRequest(
            name=epoch_key, version=1, window_seconds=2 * DAY
        )
        for method, request in (
            ("ScheduleKeyVersionDestruction", destroy),
            ("RotateKey", apb.RotateKeyRequest(name=epoch_key)),
        ):
            code, _message, reason = refused(partial(caller.admin_call, method, request))
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "legal_hold"), method
        key = broker.lifecycle.get(epoch_key)
        assert key.current_version == 2
        assert {v.state.value for v in key.versions} == {"enabled"}
    finally:
        caller.close()


def test_a_hold_placed_while_the_shredder_runs_is_not_lost_with_the_key(
    devenv: DevEnv, start: Start, own_clock: Clock, base_key: str
) -> None:
    """Unreleased, Security: "A legal hold placed while the shredder ran (after it listed the held
    recordings, before it claimed the epoch key) was lost with the key".

    The hold arrives exactly between the shredder's two steps: the epoch key is not destroyed,
    and the next run moves the recording to the hold key, so it stays readable."""
    broker = start(**DAY_EPOCHS)
    caller = Caller(devenv, broker.port)
    try:
        rec = new_id()
        made = caller.generate(rec, key_name=base_key, retain_until=days_ahead(own_clock, 0.5))
        epoch_key = made.key_ref.key_name
        assert broker.privacy is not None and broker.shredder is not None
        broker.privacy.flush_registry()
        _past_shredding(own_clock, epoch_key)
        store = broker.privacy.store

        def hold_now(key_name: str) -> None:
            if key_name == epoch_key:
                store.place_hold(Hold(Target.RECORDING, rec, "case 15", "dpo", own_clock()))

        broker.shredder.between_steps = hold_now
        broker.shredder.run_due()
        broker.shredder.between_steps = None
        assert _on_token(broker, epoch_key)
        broker.privacy.refresh()
        broker.shredder.run_due()
        out = caller.unwrap(rec, made.wrapped_key)
        assert out.key_ref.key_name == f"{epoch_key}.hold"
    finally:
        caller.close()


def test_a_released_hold_is_crypto_shredded_once_its_epoch_is_over(
    devenv: DevEnv, start: Start, own_clock: Clock, base_key: str
) -> None:
    """Unreleased, Fixed: "Released legal holds were only refused, never crypto-shredded".

    A held recording survives its epoch on the hold key; once the hold is released the next
    shredder run destroys the hold key in the HSM, so no copy of the blob opens any more."""
    broker = start(**DAY_EPOCHS)
    caller = Caller(devenv, broker.port)
    try:
        rec = new_id()
        made = caller.generate(rec, key_name=base_key, retain_until=days_ahead(own_clock, 0.5))
        epoch_key, hold_key = made.key_ref.key_name, f"{made.key_ref.key_name}.hold"
        caller.privacy_call("PlaceLegalHold", ppb.LegalHoldRequest(recording_id=rec, reason="c"))
        assert broker.privacy is not None and broker.shredder is not None
        broker.privacy.flush_registry()
        _past_shredding(own_clock, epoch_key)
        broker.privacy.refresh()
        broker.shredder.run_due()
        assert not _on_token(broker, epoch_key) and _on_token(broker, hold_key)
        caller.privacy_call("ReleaseLegalHold", ppb.LegalHoldRequest(recording_id=rec))
        broker.privacy.refresh()
        broker.shredder.run_due()
        assert not _on_token(broker, hold_key)
        code, message, _reason = refused(lambda: caller.unwrap(rec, made.wrapped_key))
        assert (code, message) == (grpc.StatusCode.FAILED_PRECONDITION, "key version destroyed")
    finally:
        caller.close()


def test_the_data_plane_cannot_make_epoch_keys_without_bound(
    devenv: DevEnv, start: Start, own_clock: Clock, base_key: str
) -> None:
    """Unreleased, Changed: "GenerateDataKey creates at most 6 retention-epoch keys per minute per
    process on its own calls".

    Each ``retain_until`` in another epoch makes an HSM key; after the budget the call is
    UNAVAILABLE ``epoch_key_rate_limited`` and no key is made on the token."""
    broker = start(**DAY_EPOCHS)
    caller = Caller(devenv, broker.port)
    try:
        for day in range(EPOCH_KEYS_PER_MINUTE):
            caller.generate(
                new_id(), key_name=base_key, retain_until=days_ahead(own_clock, day + 0.5)
            )
        beyond = days_ahead(own_clock, EPOCH_KEYS_PER_MINUTE + 0.5)
        code, _message, reason = refused(
            lambda: caller.generate(new_id(), key_name=base_key, retain_until=beyond)
        )
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "epoch_key_rate_limited")
        assert not _on_token(broker, SCHEME.key_for(base_key, beyond))
    finally:
        caller.close()


def test_a_blob_forged_under_a_destroyed_version_is_just_invalid(
    devenv: DevEnv, start: Start, own_clock: Clock, base_key: str
) -> None:
    """Unreleased, Security: "A blob naming a destroyed KEK version no longer tells the caller
    that the version existed, and cannot reach a legal-hold copy".

    A held and a plain recording under an epoch key that is then shredded. A blob forged from the
    held recording's (public) bindings under the destroyed version, with a nonce and ciphertext of
    the forger's choosing, is INVALID_ARGUMENT like one naming a version that never existed, and
    never yields the hold copy's data key; the blobs the broker issued still get their answers
    (the hold copy's data key; ``key version destroyed``)."""
    broker = start(**DAY_EPOCHS)
    caller = Caller(devenv, broker.port)
    try:
        held, plain = new_id(), new_id()
        retain = days_ahead(own_clock, 0.5)
        held_blob = caller.generate(held, key_name=base_key, retain_until=retain).wrapped_key
        plain_blob = caller.generate(plain, key_name=base_key, retain_until=retain).wrapped_key
        caller.privacy_call("PlaceLegalHold", ppb.LegalHoldRequest(recording_id=held, reason="c"))
        assert broker.privacy is not None and broker.shredder is not None
        broker.privacy.flush_registry()
        genuine = WrappedKey.parse(held_blob)
        _past_shredding(own_clock, genuine.key.name)
        broker.privacy.refresh()
        broker.shredder.run_due()
        assert not _on_token(broker, genuine.key.name)
        invalid = (
            grpc.StatusCode.INVALID_ARGUMENT,
            "wrapped key is invalid",
            "wrapped_key_invalid",
        )
        for ref in (genuine.key, KeyRef(genuine.key.name, genuine.key.version + 1000)):
            forged = WrappedKey.join_v2(
                WrappedKey.aad_v2(ref, genuine.bindings),
                os.urandom(NONCE_SIZE),
                os.urandom(CIPHERTEXT_SIZE),
            )
            assert refused(partial(caller.unwrap, held, forged)) == invalid, ref
        assert caller.unwrap(held, held_blob).key_ref.key_name == f"{genuine.key.name}.hold"
        code, message, _reason = refused(partial(caller.unwrap, plain, plain_blob))
        assert (code, message) == (grpc.StatusCode.FAILED_PRECONDITION, "key version destroyed")
    finally:
        caller.close()
