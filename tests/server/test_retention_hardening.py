"""Retention and legal hold against the ways round them (issue 14, items 2, 4 and 5), on the
real HSM with a controllable clock, on SQLite and PostgreSQL: KeyAdmin cannot destroy or rotate
away a version that wraps held recordings; epoch keys are not made on the data plane faster than
a bounded rate; a hold placed while its epoch key is being shredded is never lost.

One-day epochs and a key of the test's own, as in tests/server/test_retention.py."""

# ruff: noqa: F811 - the fixtures imported from the sibling module are parameters here

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from keybroker.core.privacy import Hold, Target
from keybroker.core.retention import EPOCH_KEYS_PER_MINUTE, EpochKeyBudget, EpochScheme
from keybroker.devenv import DevEnv, mint_token
from keybroker.errors import UnavailableError
from keybroker.server.app import RunningBroker
from keybroker.v1 import admin_pb2 as apb
from keybroker.v1 import admin_pb2_grpc as apb_grpc
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import privacy_pb2 as ppb
from keybroker.v1 import privacy_pb2_grpc as ppb_grpc
from tests.conftest import Clock
from tests.server.test_retention import DAY, base_key, clock, running  # noqa: F401 - fixtures
from tests.support.clients import auth, channel, generate_request, stub

SCHEME = EpochScheme(DAY, 3600)


class Client:
    def __init__(self, devenv: DevEnv, running: RunningBroker, clock: Clock, base: str) -> None:
        self._ch = channel(devenv, running.port, own_connection=True)
        self.kb = stub(self._ch)
        self.privacy = ppb_grpc.PrivacyStub(self._ch)  # type: ignore[no-untyped-call]
        self.admin = apb_grpc.KeyAdminStub(self._ch)  # type: ignore[no-untyped-call]
        self._devenv, self._clock, self._base = devenv, clock, base

    def token(self, scopes: list[str], **kwargs: Any) -> str:
        return mint_token(self._devenv, scopes=scopes, **kwargs)

    def generate(self, recording: str, retain_days: float) -> Any:
        request = generate_request(recording, key_name=self._base)
        request.retain_until.CopyFrom(Timestamp(seconds=int(self._clock() + retain_days * DAY)))
        token = self.token(["keys:generate"], purposes=["support"])
        return self.kb.GenerateWrappedDataKey(request, metadata=auth(token))

    def unwrap(self, recording: str, blob: bytes) -> Any:
        token = self.token(["keys:unwrap"], purposes=["support"])
        request = pb.UnwrapDataKeyRequest(
            recording_id=recording, wrapped_key=blob, purpose="support"
        )
        return self.kb.UnwrapDataKey(request, metadata=auth(token))

    def hold(self, method: str, recording: str) -> Any:
        token = self.token(["privacy:hold"], amr=["mfa"])
        request = ppb.LegalHoldRequest(recording_id=recording, reason="case 14")
        return getattr(self.privacy, method)(request, metadata=auth(token))

    def admin_call(self, method: str, request: Any) -> Any:
        token = self.token(["keys:admin"], amr=["mfa"])
        return getattr(self.admin, method)(request, metadata=auth(token))

    def close(self) -> None:
        self._ch.close()


def refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    reason = dict(err.trailing_metadata() or ()).get("keybroker-reason", "")
    return err.code(), err.details(), reason


def rec() -> str:
    return f"rec-{uuid.uuid4().hex[:10]}"


def test_key_admin_cannot_destroy_or_rotate_versions_wrapping_held_recordings(
    devenv: DevEnv, running: RunningBroker, clock: Clock, base_key: str
) -> None:
    client = Client(devenv, running, clock, base_key)
    try:
        held = rec()
        generated = client.generate(held, 0.5)
        epoch_key = generated.key_ref.key_name
        rotate = apb.RotateKeyRequest(name=epoch_key)
        client.admin_call("RotateKey", rotate)  # not held yet
        assert client.admin_call("RotateKey", rotate).current_version == 3
        client.hold("PlaceLegalHold", held)
        assert running.privacy is not None
        running.privacy.flush_registry()
        destroy = apb.ScheduleKeyVersionDestructionRequest(
            name=epoch_key, version=1, window_seconds=2 * DAY
        )
        code, message, reason = refused(
            lambda: client.admin_call("ScheduleKeyVersionDestruction", destroy)
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "legal_hold")
        assert "legal hold" in message
        other = apb.ScheduleKeyVersionDestructionRequest(
            name=epoch_key, version=2, window_seconds=2 * DAY
        )  # no held blob under v2 in the registry, but a rewrapped copy could be
        assert refused(lambda: client.admin_call("ScheduleKeyVersionDestruction", other))[2] == (
            "legal_hold"
        )
        assert refused(lambda: client.admin_call("RotateKey", rotate))[2] == "legal_hold"
        assert running.lifecycle is not None
        key = running.lifecycle.get(epoch_key)
        assert key.current_version == 3  # nothing changed
        assert {v.state.value for v in key.versions} == {"enabled"}

        client.hold("ReleaseLegalHold", held)  # released: both are allowed again
        assert client.admin_call("RotateKey", rotate).current_version == 4
        client.admin_call("ScheduleKeyVersionDestruction", destroy)
    finally:
        client.close()


def test_a_scheduled_destruction_waits_while_a_hold_came_in_after_it(
    devenv: DevEnv, running: RunningBroker, clock: Clock, base_key: str
) -> None:
    """A hold placed during a destruction window: the due destruction does not happen."""
    client = Client(devenv, running, clock, base_key)
    try:
        recording = rec()
        epoch_key = client.generate(recording, 0.5).key_ref.key_name
        client.admin_call("RotateKey", apb.RotateKeyRequest(name=epoch_key))
        client.admin_call(
            "ScheduleKeyVersionDestruction",
            apb.ScheduleKeyVersionDestructionRequest(name=epoch_key, version=1, window_seconds=DAY),
        )
        client.hold("PlaceLegalHold", recording)
        assert running.privacy is not None and running.lifecycle is not None
        running.privacy.flush_registry()
        clock.offset = DAY + 60
        running.lifecycle.run_due()
        states = {v.version: v.state.value for v in running.lifecycle.get(epoch_key).versions}
        assert states[1] == "scheduled_for_destruction"
        assert any(r.name == epoch_key and r.version == 1 for r in running.keks.versions_on_token())
    finally:
        client.close()


def test_the_data_plane_makes_epoch_keys_at_a_bounded_rate(
    devenv: DevEnv, running: RunningBroker, clock: Clock, base_key: str
) -> None:
    """Each retain_until in another epoch would make an HSM key on the call: beyond
    EPOCH_KEYS_PER_MINUTE a minute the call is UNAVAILABLE (retryable) and nothing is made."""
    client = Client(devenv, running, clock, base_key)
    try:
        made = [
            client.generate(rec(), days + 0.5).key_ref.key_name
            for days in range(EPOCH_KEYS_PER_MINUTE)
        ]
        assert len(set(made)) == EPOCH_KEYS_PER_MINUTE
        code, _message, reason = refused(
            lambda: client.generate(rec(), EPOCH_KEYS_PER_MINUTE + 0.5)
        )
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "epoch_key_rate_limited")
        extra = SCHEME.key_for(base_key, clock() + (EPOCH_KEYS_PER_MINUTE + 0.5) * DAY)
        assert all(ref.name != extra for ref in running.keks.versions_on_token())
        assert client.generate(rec(), 0.5).key_ref.key_name == made[0]  # existing: no limit
    finally:
        client.close()


def test_epoch_key_budget_refills_over_a_minute() -> None:
    now = [0.0]
    budget = EpochKeyBudget(3, clock=lambda: now[0])
    for _ in range(3):
        budget.take("k")
    with pytest.raises(UnavailableError):
        budget.take("k")
    now[0] += 20.0  # one token per 20 s
    budget.take("k")
    with pytest.raises(UnavailableError):
        budget.take("k")


def test_a_hold_placed_while_the_epoch_key_is_shredded_is_never_lost(
    devenv: DevEnv, running: RunningBroker, clock: Clock, base_key: str
) -> None:
    """The hold arrives after the shredder read which recordings are held (and moved them) and
    before it claims the epoch key: the key is kept, the next run moves the recording to the
    hold key and then shreds; the recording stays readable past its retention."""
    client = Client(devenv, running, clock, base_key)
    try:
        recording, other = rec(), rec()
        generated = client.generate(recording, 0.5)
        client.generate(other, 0.5)
        epoch_key = generated.key_ref.key_name
        assert running.privacy is not None and running.shredder is not None
        running.privacy.flush_registry()
        epoch = SCHEME.parse(epoch_key)
        assert epoch is not None
        clock.offset = SCHEME.shred_after(epoch[1]) - time.time() + 60

        def hold_now(key_name: str) -> None:
            if key_name == epoch_key:
                assert running.privacy is not None
                running.privacy.store.place_hold(
                    Hold(Target.RECORDING, recording, "case 15", "dpo", clock())
                )

        running.shredder.between_steps = hold_now
        assert running.shredder.run_due() == 0  # kept: the hold came in between
        running.shredder.between_steps = None
        assert any(ref.name == epoch_key for ref in running.keks.versions_on_token())
        running.privacy.refresh()
        assert running.shredder.run_due() == 1  # moved, then shredded
        assert not any(ref.name == epoch_key for ref in running.keks.versions_on_token())
        out = client.unwrap(recording, generated.wrapped_key)
        assert out.key_ref.key_name == f"{epoch_key}.hold"
        assert len(out.data_key) == 32
    finally:
        client.close()


def test_a_hold_that_comes_after_the_claim_is_refused_not_lost(
    devenv: DevEnv, running: RunningBroker, clock: Clock, base_key: str
) -> None:
    """The other order: the shredder claimed the epoch key first. The hold cannot protect the
    recording any more, and says so (FAILED_PRECONDITION ``shredded``) instead of answering OK
    while the key is destroyed."""
    client = Client(devenv, running, clock, base_key)
    try:
        recording = rec()
        epoch_key = client.generate(recording, 0.5).key_ref.key_name
        assert running.privacy is not None and running.shredder is not None
        running.privacy.flush_registry()
        epoch = SCHEME.parse(epoch_key)
        assert epoch is not None
        clock.offset = SCHEME.shred_after(epoch[1]) - time.time() + 60
        store = running.privacy.store
        claim = store.claim_shred_unless_held
        outcome: list[tuple[grpc.StatusCode, str, str]] = []

        def claim_then_hold(name: str, now: float) -> list[int] | None:
            claimed = claim(name, now)
            outcome.append(refused(lambda: client.hold("PlaceLegalHold", recording)))
            return claimed

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(store, "claim_shred_unless_held", claim_then_hold)
            assert running.shredder.run_due() == 1
        code, _message, reason = outcome[0]
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "shredded")
        assert recording not in {h.target for h in store.holds()}
    finally:
        client.close()
