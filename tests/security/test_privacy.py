"""Regression tests for the fixes of the privacy plane: erasure, purpose withdrawal, legal holds,
registration and amendment (see tests/security/README.md for how each test names the CHANGELOG
entry it guards)."""

from __future__ import annotations

import errno
import json
import time
from functools import partial
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keybroker.adapters.export import JournalExporter, Pseudonymizer
from keybroker.adapters.privacy_cache import PrivacyCache
from keybroker.adapters.privacystore import SqlPrivacyStore
from keybroker.adapters.sqldb import Database, dialect_for
from keybroker.devenv import DevEnv
from keybroker.errors import UnavailableError
from keybroker.server.app import RunningBroker
from keybroker.v1 import privacy_pb2 as ppb
from tests.security.conftest import Start
from tests.security.support import Caller, new_id, refused

YEAR = 365 * 86400


def test_a_stalled_replica_cannot_serve_a_key_erased_after_the_call_returns(
    devenv: DevEnv, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unreleased, Security: "Erasure across replicas: a stalled or partitioned replica could
    serve an erased key for up to ~3 s after `EraseRecording`/`EraseSubject` returned".

    Two brokers on one store; B is cut off from the store (its refreshes fail) just before a
    recording is erased through A. B may still serve on its last state for ``max_staleness``
    (3 s here), so the erasure must not return before then: the moment it returns, B refuses
    the key. (Before the fix the call stopped waiting once B had been silent for 2 s.)"""
    staleness = 3.0
    a = start("a", store="shared", state_max_staleness=str(staleness))
    b = start("b", store="shared", state_max_staleness=str(staleness))
    via_a, via_b = Caller(devenv, a.port), Caller(devenv, b.port)
    try:
        rec = new_id()
        blob = via_b.generate(rec).wrapped_key
        time.sleep(1.5)  # both have refreshed and acknowledged since
        assert len(via_b.unwrap(rec, blob).data_key) == 32
        assert b.privacy is not None

        def partitioned() -> int:
            raise UnavailableError("state store unreachable", reason="store_unavailable")

        monkeypatch.setattr(b.privacy.store, "generation", partitioned)
        cut = time.monotonic()
        via_a.privacy_call(
            "EraseRecording", ppb.EraseRecordingRequest(recording_id=rec, reason="r")
        )
        returned = time.monotonic() - cut
        code, _message, reason = refused(lambda: via_b.unwrap(rec, blob))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "privacy_state_stale"), returned
        assert returned >= staleness - 0.5
    finally:
        via_a.close()
        via_b.close()


def test_a_withdrawn_purpose_is_refused_for_every_copy_of_the_wrapped_key(
    devenv: DevEnv, start: Start
) -> None:
    """Unreleased, Security: "A purpose removed by `AmendPurposes` (consent withdrawn) stayed
    usable through older copies of the wrapped key".

    The original blob and a backup copy of it, which still bind the purpose, are refused for it
    (PERMISSION_DENIED ``purpose_withdrawn``), as is the amended blob; the purpose kept still
    works."""
    caller = Caller(devenv, start().port)
    try:
        rec = new_id()
        original = caller.generate(rec, purposes=("qa", "support")).wrapped_key
        backup = bytes(original)
        amended = caller.privacy_call(
            "AmendPurposes",
            ppb.AmendPurposesRequest(
                recording_id=rec, wrapped_key=original, remove_purposes=["qa"], reason="consent"
            ),
        ).wrapped_key
        for blob in (original, backup):  # they still bind qa
            code, _message, reason = refused(partial(caller.unwrap, rec, blob, "qa"))
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "purpose_withdrawn")
        code, _message, reason = refused(lambda: caller.unwrap(rec, amended, "qa"))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "purpose_not_bound")
        assert len(caller.unwrap(rec, original, "support").data_key) == 32
    finally:
        caller.close()


def test_generate_cannot_reregister_a_held_recording(devenv: DevEnv, start: Start) -> None:
    """Unreleased, Security: "Legal hold and erasure could be undermined through GenerateDataKey:
    re-registering a held recording's id replaced the wrapped key the hold move used".

    A held recording's id given to GenerateDataKey again is ALREADY_EXISTS and the registry keeps
    the first wrapped key; an unheld recording cannot be tied to a held subject that way, so its
    erasure still goes through."""
    broker = start()
    caller = Caller(devenv, broker.port)
    try:
        held, free, held_subject = new_id(), new_id(), new_id("subject")
        first = caller.generate(held).wrapped_key
        caller.generate(free, subjects=("subj-1",))
        caller.privacy_call("PlaceLegalHold", ppb.LegalHoldRequest(recording_id=held, reason="c1"))
        caller.privacy_call(
            "PlaceLegalHold", ppb.LegalHoldRequest(subject_id=held_subject, reason="c2")
        )
        for rec, subjects in ((held, ("subj-1",)), (free, (held_subject,))):
            code, _message, reason = refused(partial(caller.generate, rec, subjects=subjects))
            assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "recording_registered")
        assert broker.privacy is not None
        broker.privacy.flush_registry()
        assert broker.privacy.store.wrapped_keys(held) == [first]
        receipt = caller.privacy_call(
            "EraseRecording", ppb.EraseRecordingRequest(recording_id=free, reason="art. 17")
        )
        assert receipt.recordings == 1
    finally:
        caller.close()


def test_amend_purposes_needs_mfa_and_adds_only_granted_purposes(
    devenv: DevEnv, start: Start
) -> None:
    """Unreleased, Changed: "`AmendPurposes` needs MFA (`amr` with `mfa`, like legal holds); it
    only adds purposes the caller's own token grants".

    Without ``mfa`` in ``amr``: PERMISSION_DENIED ``mfa_required``; with MFA, a purpose the token
    does not grant: PERMISSION_DENIED ``purpose_not_granted``; nothing was amended."""
    broker = start()
    caller = Caller(devenv, broker.port)
    try:
        rec = new_id()
        blob = caller.generate(rec).wrapped_key
        request = ppb.AmendPurposesRequest(
            recording_id=rec, wrapped_key=blob, add_purposes=["marketing"], reason="consent"
        )
        scopes = ["privacy:amend"]
        no_mfa = caller.token(scopes, ("support", "marketing"))
        narrow = caller.token(scopes, ("support",), amr=["mfa"])
        for token, reason in ((no_mfa, "mfa_required"), (narrow, "purpose_not_granted")):
            code, _message, got = refused(
                partial(caller.privacy_call, "AmendPurposes", request, token=token)
            )
            assert (code, got) == (grpc.StatusCode.PERMISSION_DENIED, reason)
        assert broker.privacy is not None
        broker.privacy.flush_registry()
        assert broker.privacy.store.wrapped_keys(rec) == [blob]
    finally:
        caller.close()


def test_retain_until_beyond_max_retention_is_invalid_argument(
    devenv: DevEnv, start: Start
) -> None:
    """Unreleased, Added: "`[keys] max_retention` (default `3650d`): a `retain_until` further
    ahead is INVALID_ARGUMENT".

    A caller cannot make a data key (and its epoch key) that lives for ever: eleven years ahead is
    refused by default, and a broker with ``max_retention = 30d`` refuses 31 days."""
    caller = Caller(devenv, start().port)
    short = Caller(
        devenv, start("short", keys_max_retention="30d", keys_default_retention="7d").port
    )
    try:
        for who, ahead in ((caller, 11 * YEAR), (short, 31 * 86400)):
            code, message, _reason = refused(
                partial(who.generate, new_id(), retain_until=time.time() + ahead)
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_retention" in message
        assert short.generate(new_id(), retain_until=time.time() + 29 * 86400).wrapped_key
    finally:
        caller.close()
        short.close()


def test_privacy_changes_are_journaled_before_they_are_applied(
    devenv: DevEnv, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unreleased, Security: "Admin and privacy changes were applied before their journal record;
    if the journal then failed the change stood while the caller was told UNAVAILABLE".

    With the journal's writes failing, a legal hold and an erasure answer UNAVAILABLE and neither
    exists afterwards; a key rotation answers UNAVAILABLE and the key keeps its version."""
    broker = start()
    caller = Caller(devenv, broker.port)
    try:
        held, erased = new_id(), new_id()
        blob = caller.generate(erased).wrapped_key
        caller.generate(held)
        key = caller.generate(new_id()).key_ref.key_name
        assert broker.lifecycle is not None and broker.privacy is not None
        before = broker.lifecycle.get(key).current_version
        with monkeypatch.context() as patch:
            _fail_writes(broker, patch)
            for call in (
                lambda: caller.privacy_call(
                    "PlaceLegalHold", ppb.LegalHoldRequest(recording_id=held, reason="c3")
                ),
                lambda: caller.privacy_call(
                    "EraseRecording", ppb.EraseRecordingRequest(recording_id=erased, reason="r")
                ),
                lambda: caller.admin_call("RotateKey", _rotate(key)),
            ):
                code, _message, reason = refused(call)
                assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "journal_unavailable")
        assert held not in {h.target for h in broker.privacy.store.holds()}
        assert broker.lifecycle.get(key).current_version == before
        assert len(caller.unwrap(erased, blob).data_key) == 32  # not erased
    finally:
        caller.close()


def _rotate(name: str) -> object:
    from keybroker.v1 import admin_pb2 as apb

    return apb.RotateKeyRequest(name=name)


def _fail_writes(broker: RunningBroker, patch: pytest.MonkeyPatch) -> None:
    assert broker.journal is not None

    def fail(*_args: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    patch.setattr(broker.journal, "_write", fail)


def test_the_justification_leaves_the_host_only_as_a_pseudonym(
    devenv: DevEnv, start: Start
) -> None:
    """Unreleased, Security: "The justification of an erasure, hold, release or purpose amendment
    (free text that may name the person) is pseudonymised in exported spans".

    A hold and an erasure through the broker, their journal exported as OTLP spans: the free
    text never appears, its keyed pseudonym does."""
    broker = start()
    caller = Caller(devenv, broker.port)
    try:
        rec, other = new_id(), new_id()
        caller.generate(rec)
        caller.generate(other)
        caller.privacy_call(
            "PlaceLegalHold",
            ppb.LegalHoldRequest(recording_id=other, reason="dispute of Jane Roe, case 12"),
        )
        caller.privacy_call(
            "EraseRecording",
            ppb.EraseRecordingRequest(recording_id=rec, reason="art. 17 request from Jane Doe"),
        )
    finally:
        caller.close()
    assert broker.journal is not None
    pseudonymize = Pseudonymizer(bytes.fromhex(devenv.pseudonym_key.read_text()))
    memory = InMemorySpanExporter()
    exporter = JournalExporter(
        broker.journal.directory, memory, Resource.create(), pseudonymize=pseudonymize
    )
    assert exporter.export_once() > 0
    exported = [dict(s.attributes or {}) for s in memory.get_finished_spans()]
    assert "Jane" not in json.dumps(exported)
    justifications = {a.get("keybroker.justification") for a in exported} - {None}
    assert justifications == {
        pseudonymize("justification", "dispute of Jane Roe, case 12"),
        pseudonymize("justification", "art. 17 request from Jane Doe"),
    }


def test_state_is_as_old_as_its_read_not_its_refresh(tmp_path: Path) -> None:
    """Unreleased, Security: "A replica paused in the middle of a refresh of its privacy state".

    A refresh paused after it read the store (SIGSTOP, a frozen VM: here, a slow
    registry read) gives state as old as that read: once it is older than max_staleness the
    replica refuses, even though the refresh has only just returned. It used to count the state
    from the refresh's end, and a replica resumed after a pause served a key erased meanwhile."""
    db = Database(dialect_for(f"sqlite:{tmp_path / 'kb.db'}", base=tmp_path))
    db.migrate()
    store = SqlPrivacyStore(db)
    cache = PrivacyCache(store, max_staleness=0.3)
    cache.refresh()
    cache.require_current()
    registrations_since = store.registrations_since

    def paused(seq: int, limit: int) -> list[tuple[int, str]]:
        time.sleep(0.5)  # longer than max_staleness, after the erasures were read
        return registrations_since(seq, limit)

    store.registrations_since = paused  # type: ignore[method-assign]
    cache.refresh()
    with pytest.raises(UnavailableError) as info:
        cache.require_current()
    assert info.value.reason == "privacy_state_stale"
    store.registrations_since = registrations_since  # type: ignore[method-assign]
    cache.refresh()
    cache.require_current()
