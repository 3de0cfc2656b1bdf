"""Retention with real crypto-shredding, the whole cycle, on the real HSM with a controllable
clock: epoch keys made on first use, destroyed once the epoch and its grace period are over,
held recordings moved to the hold key first; on SQLite and PostgreSQL.

The broker here uses one-day epochs (labels ``e<YYYYMMDD>``) and its own base key, so it can
never touch the month-epoch keys other tests make on the shared dev token.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from keybroker.adapters.audit_reader import decisions
from keybroker.core.retention import EpochScheme
from keybroker.core.wrapped_key import CIPHERTEXT_SIZE, NONCE_SIZE, KeyRef, WrappedKey
from keybroker.devenv import DevEnv, mint_token
from keybroker.server.app import RunningBroker, connect_hsm, create_server
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import privacy_pb2 as ppb
from keybroker.v1 import privacy_pb2_grpc as ppb_grpc
from tests.conftest import HSM_MODULES, Clock, load_settings
from tests.support.clients import auth, channel, generate_request, stub

DAY = 86400


@pytest.fixture
def base_key(devenv: DevEnv, hsm_settings: dict[str, str]) -> Iterator[str]:
    """A key of this test's own, version 1 made offline on the test's token (the broker
    adopts it)."""
    keks = connect_hsm(load_settings(devenv, **hsm_settings))
    name = f"ret-{uuid.uuid4().hex[:8]}"
    keks.create_version(KeyRef(name, 1))
    yield name
    for ref in keks.versions_on_token():
        if ref.name.startswith(name):
            keks.destroy_version(ref)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def running(
    devenv: DevEnv,
    store_url: str,
    tmp_path: Path,
    clock: Clock,
    base_key: str,
    hsm_settings: dict[str, str],
) -> Iterator[RunningBroker]:
    settings = load_settings(
        devenv,
        **hsm_settings,
        state_url=store_url,
        audit_dir=str(tmp_path / "journal"),
        keys_retention_epoch="1d",
        keys_retention_grace="1h",
        state_scheduler_interval="3600",  # this test drives the shredder itself
    )
    broker = create_server(settings, clock=clock)
    yield broker
    broker.stop(1)


@pytest.mark.parametrize("hsm_settings", HSM_MODULES, indirect=True)
def test_epoch_keys_are_destroyed_and_held_recordings_survive(
    devenv: DevEnv, running: RunningBroker, clock: Clock, base_key: str
) -> None:
    scheme = EpochScheme(DAY, 3600)
    assert running.shredder is not None and running.privacy is not None
    assert running.catalog is not None

    def tokens() -> tuple[str, str]:  # signatures and expiry are checked against real time
        data = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
        dpo = mint_token(devenv, scopes=["privacy:hold", "privacy:erase"], amr=["mfa"])
        return data, dpo

    data, dpo = tokens()
    ch = channel(devenv, running.port, own_connection=True)
    kb, privacy = stub(ch), ppb_grpc.PrivacyStub(ch)  # type: ignore[no-untyped-call]

    def generate(recording: str, retain_days: float, subject: str) -> Any:
        request = generate_request(recording, subject_ids=[subject], key_name=base_key)
        request.retain_until.CopyFrom(Timestamp(seconds=int(clock() + retain_days * DAY)))
        return kb.GenerateWrappedDataKey(request, metadata=auth(data))

    def unwrap(recording: str, blob: bytes) -> Any:
        request = pb.UnwrapDataKeyRequest(
            recording_id=recording, wrapped_key=blob, purpose="support"
        )
        return kb.UnwrapDataKey(request, metadata=auth(data))

    plain, held, by_subject, later = (f"rec-{i}-{uuid.uuid4().hex[:6]}" for i in range(4))
    held_subject = f"subj-{uuid.uuid4().hex[:6]}"
    g_plain = generate(plain, 0.5, "subj-x")
    g_held = generate(held, 0.5, "subj-y")
    g_subject = generate(by_subject, 0.5, held_subject)
    g_later = generate(later, 5, "subj-z")
    epoch_key = scheme.key_for(base_key, clock() + 0.5 * DAY)
    assert g_plain.key_ref.key_name == epoch_key  # made on first use
    assert g_held.key_ref.key_name == epoch_key
    assert g_later.key_ref.key_name == scheme.key_for(base_key, clock() + 5 * DAY)
    privacy.PlaceLegalHold(
        ppb.LegalHoldRequest(recording_id=held, reason="case 1"), metadata=auth(dpo)
    )
    privacy.PlaceLegalHold(
        ppb.LegalHoldRequest(subject_id=held_subject, reason="case 2"), metadata=auth(dpo)
    )
    running.privacy.flush_registry()

    epoch = scheme.parse(epoch_key)
    assert epoch is not None
    clock.offset = scheme.shred_after(epoch[1]) - time.time() - 60
    assert running.shredder.run_due() == 0  # the grace period is not over yet
    clock.offset += 120
    running.privacy.refresh()  # holds in memory (the scheduler loop would do this)
    assert running.shredder.run_due() == 1
    assert running.shredder.run_due() == 0  # exactly once
    keks = running.keks
    assert not any(ref.name == epoch_key for ref in keks.versions_on_token())
    key = running.lifecycle.get(epoch_key)  # type: ignore[union-attr]
    assert {v.state.value for v in key.versions} == {"destroyed"}

    data, dpo = tokens()
    with pytest.raises(grpc.RpcError) as info:
        unwrap(plain, g_plain.wrapped_key)  # gone, in every backup
    err: Any = info.value
    assert (err.code(), err.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "key version destroyed",
    )
    # Before a blob is authenticated, a destroyed version reads like an unknown one: a blob not
    # issued by the broker that names the destroyed version is just invalid, and one forged from
    # a held recording's bindings (which are not secret) never gets the hold copy's data key.
    for recording, gen in ((plain, g_plain), (held, g_held)):
        genuine = WrappedKey.parse(gen.wrapped_key)
        unknown_version = KeyRef(genuine.key.name, genuine.key.version + 1000)
        for ref in (genuine.key, unknown_version):
            aad = WrappedKey.aad_v2(ref, genuine.bindings)
            forged = WrappedKey.join_v2(aad, os.urandom(NONCE_SIZE), os.urandom(CIPHERTEXT_SIZE))
            with pytest.raises(grpc.RpcError) as info:
                unwrap(recording, forged)
            err = info.value
            assert (err.code(), err.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "wrapped key is invalid",
            )
    for recording, gen in ((held, g_held), (by_subject, g_subject)):
        out = unwrap(recording, gen.wrapped_key)  # the old blob still works: moved to the hold key
        assert len(out.data_key) == 32
        assert out.key_ref.key_name == f"{epoch_key}.hold"
    assert len(unwrap(later, g_later.wrapped_key).data_key) == 32  # a later epoch is untouched
    erase = ppb.EraseRecordingRequest(recording_id=held, reason="art. 17")
    with pytest.raises(grpc.RpcError) as info:
        privacy.EraseRecording(erase, metadata=auth(dpo))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # held: not erasable
    privacy.ReleaseLegalHold(ppb.LegalHoldRequest(recording_id=held), metadata=auth(dpo))
    running.privacy.refresh()
    with pytest.raises(grpc.RpcError) as info:
        unwrap(held, g_held.wrapped_key)
    err = info.value
    assert err.details() == "retention expired"  # released: its retention applies again
    hold_key = f"{epoch_key}.hold"
    assert running.shredder.run_due() == 0  # by_subject is still held: the hold key stays
    with pytest.raises(grpc.RpcError) as info:
        unwrap(held, g_held.wrapped_key)  # but the released recording's hold copy is gone
    assert info.value.details() == "key version destroyed"
    assert len(unwrap(by_subject, g_subject.wrapped_key).data_key) == 32
    privacy.ReleaseLegalHold(ppb.LegalHoldRequest(subject_id=held_subject), metadata=auth(dpo))
    running.privacy.refresh()
    assert running.shredder.run_due() == 1  # the last hold of the epoch released: shredded
    assert running.shredder.run_due() == 0  # exactly once
    assert not any(ref.name == hold_key for ref in keks.versions_on_token())
    assert {v.state.value for v in running.lifecycle.get(hold_key).versions} == {"destroyed"}  # type: ignore[union-attr]
    for recording, gen in ((held, g_held), (by_subject, g_subject)):
        with pytest.raises(grpc.RpcError) as info:
            unwrap(recording, gen.wrapped_key)  # gone, in every backup of blob and registry
        err = info.value
        assert (err.code(), err.details()) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "key version destroyed",
        )
    ch.close()

    assert running.journal is not None
    events = [
        (d.operation, d.reason, d.recording_id)
        for _ts, d in decisions(running.journal.directory.parent)
        if d.subject == "keybroker:scheduler"
    ]
    assert ("RetentionShred", "retention_epoch_ended", None) in events
    assert ("RetentionShred", "legal_holds_released", None) in events
    assert ("RetentionHoldMove", "legal_hold", held) in events
    assert ("RetentionHoldMove", "legal_hold", by_subject) in events
    assert ("CreateKey", "retention_epoch_key", None) in events


@pytest.mark.parametrize("hsm_settings", HSM_MODULES, indirect=True)
def test_the_scheduler_shreds_an_epoch_key_on_its_own(
    devenv: DevEnv,
    store_url: str,
    tmp_path: Path,
    clock: Clock,
    base_key: str,
    hsm_settings: dict[str, str],
) -> None:
    """Nobody calls the shredder: the broker's own scheduler destroys the epoch key once the
    clock passes the end of its epoch and grace period, and its wrapped keys stop unwrapping."""
    settings = load_settings(
        devenv,
        **hsm_settings,
        state_url=store_url,
        audit_dir=str(tmp_path / "journal"),
        keys_retention_epoch="1d",
        keys_retention_grace="1h",
        state_scheduler_interval="0.2",
    )
    running = create_server(settings, clock=clock)
    try:
        assert running.lifecycle is not None
        data = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
        ch = channel(devenv, running.port, own_connection=True)
        kb = stub(ch)
        recording = f"rec-{uuid.uuid4().hex[:8]}"
        request = generate_request(recording, key_name=base_key)
        request.retain_until.CopyFrom(Timestamp(seconds=int(clock() + DAY / 2)))
        generated = kb.GenerateWrappedDataKey(request, metadata=auth(data))
        epoch_key = generated.key_ref.key_name
        unwrap = pb.UnwrapDataKeyRequest(
            recording_id=recording, wrapped_key=generated.wrapped_key, purpose="support"
        )
        time.sleep(1.0)  # several scheduler ticks: nothing is due yet
        assert len(kb.UnwrapDataKey(unwrap, metadata=auth(data)).data_key) == 32
        epoch = EpochScheme(DAY, 3600).parse(epoch_key)
        assert epoch is not None
        clock.offset = EpochScheme(DAY, 3600).shred_after(epoch[1]) - time.time() + 1
        deadline = time.monotonic() + 15
        states: set[str] = set()
        while time.monotonic() < deadline:
            states = {v.state.value for v in running.lifecycle.get(epoch_key).versions}
            if states == {"destroyed"}:
                break
            time.sleep(0.1)
        assert states == {"destroyed"}
        assert not any(ref.name == epoch_key for ref in running.keks.versions_on_token())
        with pytest.raises(grpc.RpcError) as info:
            kb.UnwrapDataKey(unwrap, metadata=auth(data))
        assert info.value.details() == "key version destroyed"
        ch.close()
    finally:
        running.stop(1)
