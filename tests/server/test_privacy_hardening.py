"""Privacy guarantees that callers with ordinary scopes used to be able to undermine (issue 14,
items 1, 3, 4 and 6), over real mTLS with the real HSM, on SQLite and PostgreSQL: a recording id
is registered once and keeps every wrapped key; AmendPurposes needs MFA and only adds granted,
well-formed purposes; retention is bounded; every privacy change is durable in the journal
before it is applied."""

# ruff: noqa: F811 - the fixtures imported from the sibling module are parameters here

from __future__ import annotations

import errno
import time
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from keybroker.adapters.privacy_cache import PrivacyCache
from keybroker.adapters.privacystore import SqlPrivacyStore
from keybroker.adapters.sqldb import Database, dialect_for
from keybroker.core.decision import Outcome
from keybroker.core.privacy import RecordingEntry
from keybroker.core.wrapped_key import KeyRef, WrappedKey
from keybroker.devenv import DevEnv, mint_token
from keybroker.errors import AlreadyExistsError
from keybroker.server.app import RunningBroker
from keybroker.v1 import admin_pb2 as apb
from keybroker.v1 import admin_pb2_grpc as apb_grpc
from keybroker.v1 import privacy_pb2 as ppb
from tests.server.test_privacy import (  # noqa: F401 - fixtures
    Calls,
    _decisions,
    calls,
    refused,
    rid,
    running,
)
from tests.support.clients import auth, channel, generate_request

YEAR = 365 * 86400


def _store(running: RunningBroker) -> SqlPrivacyStore:
    assert running.privacy is not None
    return running.privacy.store


def test_a_registered_recording_id_cannot_be_registered_again(
    calls: Calls, running: RunningBroker
) -> None:
    """A second GenerateDataKey with a registered id is ALREADY_EXISTS, whatever it binds: the
    registry keeps the first registration's wrapped key, subjects and purposes. So a held
    recording's evidence cannot be replaced by a caller's blob, and a recording cannot be tied
    to a held subject afterwards to block its erasure."""
    rec, held_subject = rid(), f"s-{uuid.uuid4().hex[:8]}"
    first = calls.generate(rec, ("subj-a",))
    code, _message, reason = refused(lambda: calls.generate(rec, (held_subject,)))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "recording_registered")
    assert refused(lambda: calls.generate(rec, ("subj-a",)))[0] == grpc.StatusCode.ALREADY_EXISTS
    assert running.privacy is not None
    running.privacy.flush_registry()
    store = _store(running)
    assert store.wrapped_keys(rec) == [first]
    entry = store.recording(rec)
    assert entry is not None and entry.subject_ids == ("subj-a",)

    calls.call(  # the held subject cannot block the recording's erasure
        "PlaceLegalHold", ppb.LegalHoldRequest(subject_id=held_subject, reason="case 9")
    )
    receipt = calls.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=rec, reason="x"))
    assert receipt.recordings == 1
    calls.call("ReleaseLegalHold", ppb.LegalHoldRequest(subject_id=held_subject))


def test_another_replica_refuses_an_id_registered_elsewhere(
    calls: Calls, running: RunningBroker, store_url: str, tmp_path: Any
) -> None:
    """Registered ids reach every replica's memory with the registry (no store read on the
    call): a fresh replica loads them all at start, a running one the new ones on refresh."""
    rec = rid()
    calls.generate(rec)
    assert running.privacy is not None
    running.privacy.flush_registry()
    db = Database(dialect_for(store_url, base=tmp_path))
    other = PrivacyCache(SqlPrivacyStore(db))
    try:
        other.refresh()  # the first load: every id in the registry
        with pytest.raises(AlreadyExistsError):
            other.require_unregistered(rec)
        later = rid()
        calls.generate(later)
        running.privacy.flush_registry()
        other.require_unregistered(later)  # not seen yet
        other.refresh()  # the next refresh brings it
        with pytest.raises(AlreadyExistsError):
            other.require_unregistered(later)
        other.require_unregistered(rid())
    finally:
        other.close()


def test_racing_registrations_keep_the_first_and_every_wrapped_key(
    running: RunningBroker,
) -> None:
    """Two replicas can only race on one id within a refresh interval; the registry then keeps
    the first registration's subjects and purposes, and both wrapped keys (append-only)."""
    store = _store(running)
    rec = rid()

    def entry(subject: str, blob: bytes, *, amendment: bool = False) -> RecordingEntry:
        return RecordingEntry(
            rec,
            (subject,),
            ("support",),
            time.time() + 3600,
            KeyRef("recordings", 1),
            time.time(),
            wrapped_key=blob,
            amendment=amendment,
        )

    assert store.register([entry("subj-1", b"first")]) == []
    assert store.register([entry("subj-held", b"second")]) == [rec]
    assert store.register([entry("subj-1", b"amended", amendment=True)]) == []
    assert store.wrapped_keys(rec) == [b"first", b"second", b"amended"]
    found = store.recording(rec)
    assert found is not None and found.subject_ids == ("subj-1",)


def test_amended_wrapped_keys_are_appended_and_all_survive_a_hold(
    calls: Calls, running: RunningBroker
) -> None:
    """AmendPurposes (the audited way to change a registered recording) appends its wrapped
    key; the first one stays in the registry unchanged."""
    rec = rid()
    blob = calls.generate(rec)
    amended = calls.call(
        "AmendPurposes",
        ppb.AmendPurposesRequest(
            recording_id=rec, wrapped_key=blob, add_purposes=["qa"], reason="consent"
        ),
    )
    assert running.privacy is not None
    running.privacy.flush_registry()
    store = _store(running)
    assert store.wrapped_keys(rec) == [blob, amended.wrapped_key]
    entry = store.recording(rec)
    assert entry is not None and entry.purposes == ("qa", "support")
    calls.call("PlaceLegalHold", ppb.LegalHoldRequest(recording_id=rec, reason="case 3"))
    held = store.held_recordings(WrappedKey.parse(blob).key.name)
    assert [e.wrapped_key for e in held if e.recording_id == rec] == [blob, amended.wrapped_key]
    calls.call("ReleaseLegalHold", ppb.LegalHoldRequest(recording_id=rec))


def test_amend_purposes_needs_mfa_and_only_adds_granted_purposes(
    calls: Calls, devenv: DevEnv
) -> None:
    rec = rid()
    blob = calls.generate(rec)

    def amend(token: str, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> Any:
        request = ppb.AmendPurposesRequest(
            recording_id=rec,
            wrapped_key=blob,
            add_purposes=list(add),
            remove_purposes=list(remove),
            reason="consent",
        )
        return calls.call("AmendPurposes", request, token=token)

    no_mfa = mint_token(devenv, scopes=["privacy:amend"], purposes=["support", "qa"])
    code, _message, reason = refused(lambda: amend(no_mfa, add=("qa",)))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "mfa_required")
    narrow = mint_token(devenv, scopes=["privacy:amend"], purposes=["support"], amr=["mfa"])
    code, message, reason = refused(lambda: amend(narrow, add=("marketing",)))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "purpose_not_granted")
    assert "marketing" in message
    for bad in ("Not A Purpose", "", "x" * 65):
        code, _message, reason = refused(lambda bad=bad: amend(narrow, remove=(bad,)))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "bad_purposes")
    too_many = tuple(f"p{i}" for i in range(17))
    assert refused(lambda: amend(narrow, remove=too_many))[2] == "bad_purposes"
    assert list(amend(narrow, remove=("qa",)).purposes) == ["support"]  # nothing to remove: kept


def test_retain_until_is_bounded_by_max_retention(calls: Calls) -> None:
    """``[keys] max_retention`` (10 years by default) bounds ``retain_until``."""
    request = generate_request(rid())
    request.retain_until.CopyFrom(Timestamp(seconds=int(time.time() + 11 * YEAR)))
    with pytest.raises(grpc.RpcError) as info:
        calls.kb.GenerateWrappedDataKey(request, metadata=auth(calls.data))
    err: Any = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_retention" in err.details()


def _failing_journal(running: RunningBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    assert running.journal is not None

    def fail(*_args: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(running.journal, "_write", fail)


def test_privacy_changes_are_not_applied_when_their_intent_cannot_be_journaled(
    calls: Calls, running: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durable intent before effect: with the journal failing, hold, release, erase and amend
    answer UNAVAILABLE and change nothing; once it works, each change is preceded in the journal
    by its intent record."""
    placed, held, erased, amended = rid(), rid(), rid(), rid()
    for rec in (placed, held, erased):
        calls.generate(rec)
    blob = calls.generate(amended)
    calls.call("PlaceLegalHold", ppb.LegalHoldRequest(recording_id=held, reason="case 1"))
    assert running.privacy is not None
    running.privacy.flush_registry()
    store = _store(running)

    def holds() -> set[str]:
        return {h.target for h in store.holds()}

    amend = ppb.AmendPurposesRequest(
        recording_id=amended, wrapped_key=blob, remove_purposes=["support"], reason="withdrawn"
    )
    amend.add_purposes.append("qa")
    changes = {
        "PlaceLegalHold": ppb.LegalHoldRequest(recording_id=placed, reason="case 2"),
        "ReleaseLegalHold": ppb.LegalHoldRequest(recording_id=held),
        "EraseRecording": ppb.EraseRecordingRequest(recording_id=erased, reason="art. 17"),
        "AmendPurposes": amend,
    }
    with monkeypatch.context() as patch:
        _failing_journal(running, patch)
        for method, request in changes.items():
            code, _message, reason = refused(lambda m=method, r=request: calls.call(m, r))
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "journal_unavailable"), method
        running.privacy.flush_registry()
        assert held in holds() and placed not in holds()
        assert all(
            target != erased for _seq, _kind, target in store.erasure_targets_since(0, 10**6)
        )
        assert (amended, "support") not in store.purpose_withdrawals()
        assert store.wrapped_keys(amended) == [blob]
    for method, request in changes.items():
        calls.call(method, request)
    records = [
        (d.operation, d.outcome)
        for _ts, d in _decisions(running)
        if d.operation in changes and d.recording_id in (placed, held, erased, amended)
    ]
    for method in changes:
        mine = [outcome for operation, outcome in records if operation == method]
        assert Outcome.INTENT in mine, method
        assert mine[-2:] == [Outcome.INTENT, Outcome.ALLOW], method


def test_a_failed_hold_is_refused_before_anything_changes(
    calls: Calls, running: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the code before durable intents, the hold was placed and only its reply failed."""
    rec = rid()
    calls.generate(rec)
    with monkeypatch.context() as patch:
        _failing_journal(running, patch)
        hold = ppb.LegalHoldRequest(recording_id=rec, reason="case 4")
        assert refused(lambda: calls.call("PlaceLegalHold", hold))[0] == grpc.StatusCode.UNAVAILABLE
    assert rec not in {h.target for h in _store(running).holds()}
    release = ppb.LegalHoldRequest(recording_id=rec)
    assert refused(lambda: calls.call("ReleaseLegalHold", release))[2] == "not_held"


def test_admin_changes_are_not_applied_when_their_intent_cannot_be_journaled(
    devenv: DevEnv, running: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotate, disable, schedule and cancel destruction: with the journal failing each answers
    UNAVAILABLE and the key is exactly as before; once it works each is applied after its
    durable intent."""
    ch = channel(devenv, running.port, own_connection=True)
    admin = apb_grpc.KeyAdminStub(ch)  # type: ignore[no-untyped-call]
    token = mint_token(devenv, scopes=["keys:admin"], amr=["mfa"])
    name = f"intent-{uuid.uuid4().hex[:8]}"
    try:
        admin.CreateKey(apb.CreateKeyRequest(name=name), metadata=auth(token))
        admin.RotateKey(apb.RotateKeyRequest(name=name), metadata=auth(token))
        assert running.lifecycle is not None

        def state() -> list[tuple[int, str]]:
            key = running.lifecycle.get(name)  # type: ignore[union-attr]
            return [(v.version, v.state.value) for v in key.versions]

        before = state()
        changes: list[tuple[str, Any]] = [
            ("RotateKey", apb.RotateKeyRequest(name=name)),
            ("DisableKeyVersion", apb.DisableKeyVersionRequest(name=name, version=1)),
            (
                "ScheduleKeyVersionDestruction",
                apb.ScheduleKeyVersionDestructionRequest(
                    name=name, version=1, window_seconds=86400
                ),
            ),
            ("CancelKeyVersionDestruction", apb.KeyVersionRequest(name=name, version=1)),
        ]
        with monkeypatch.context() as patch:
            _failing_journal(running, patch)
            for method, request in changes:
                code, _message, reason = refused(
                    lambda m=method, r=request: getattr(admin, m)(r, metadata=auth(token))
                )
                assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "journal_unavailable")
                assert state() == before, method
        for method, request in changes:
            getattr(admin, method)(request, metadata=auth(token))
        assert state() == [(1, "disabled"), (2, "enabled"), (3, "enabled")]
        ops = [(d.operation, d.outcome) for _ts, d in _decisions(running) if d.key_name == name]
        for method, _request in changes:
            mine = [outcome for operation, outcome in ops if operation == method]
            assert mine[-2:] == [Outcome.INTENT, Outcome.ALLOW], method
    finally:
        ch.close()


def test_a_raced_registration_is_journaled_as_a_registry_decision() -> None:
    """What the broker records for a registration refused after the call (see
    tests/adapters/test_privacy_registry.py for when it happens)."""
    from keybroker.core.decision import Decision
    from keybroker.server.app import registry_conflict_recorder

    recorded: list[Decision] = []
    registry_conflict_recorder(recorded.append)("rec-7")
    (decision,) = recorded
    assert (decision.operation, decision.outcome, decision.reason, decision.recording_id) == (
        "RegistryConflict",
        Outcome.DENY,
        "recording_registered",
        "rec-7",
    )
    assert decision.subject == "keybroker:registry"
