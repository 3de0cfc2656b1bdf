"""keybroker.v1.Privacy over real mTLS with the real HSM, on SQLite and PostgreSQL: erasure (of a
recording and of a subject, restored backups included), legal holds, purpose amendment, subject
access, fail-closed staleness, and erasure across replica processes."""

from __future__ import annotations

import base64
import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker.adapters.privacy_cache import DigestSet
from keybroker.adapters.privacystore import SqlPrivacyStore
from keybroker.devenv import DevEnv, mint_token
from keybroker.server.app import RunningBroker, create_server, open_database
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import privacy_pb2 as ppb
from keybroker.v1 import privacy_pb2_grpc as ppb_grpc
from tests.conftest import load_settings
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, run_cli, stop_all

FAILED = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def running(devenv: DevEnv, store_url: str, tmp_path: Path) -> Iterator[RunningBroker]:
    broker = create_server(
        load_settings(devenv, state_url=store_url, audit_dir=str(tmp_path / "journal"))
    )
    yield broker
    broker.stop(1)


class Calls:
    """Data-plane and privacy stubs with tokens for each role."""

    def __init__(self, devenv: DevEnv, port: int) -> None:
        self._channel = channel(devenv, port, own_connection=True)
        self.kb = stub(self._channel)
        self.privacy = ppb_grpc.PrivacyStub(self._channel)  # type: ignore[no-untyped-call]
        self.data = mint_token(
            devenv,
            scopes=["keys:generate", "keys:unwrap", "keys:rewrap"],
            purposes=["support", "qa"],
        )
        self.dpo = mint_token(
            devenv,
            scopes=["privacy:erase", "privacy:hold", "privacy:amend", "audit:read"],
            purposes=["support", "qa"],  # AmendPurposes adds only purposes the token grants
            amr=["mfa"],
            subject="dpo-1",
        )

    def close(self) -> None:
        self._channel.close()

    def generate(self, recording: str, subjects: tuple[str, ...] = ("subj-a",)) -> bytes:
        out = self.kb.GenerateWrappedDataKey(
            generate_request(recording, subject_ids=subjects), metadata=auth(self.data)
        )
        wrapped: bytes = out.wrapped_key
        return wrapped

    def unwrap(self, recording: str, blob: bytes, purpose: str = "support") -> Any:
        request = pb.UnwrapDataKeyRequest(recording_id=recording, wrapped_key=blob, purpose=purpose)
        return self.kb.UnwrapDataKey(request, metadata=auth(self.data))

    def call(self, method: str, request: Any, token: str | None = None) -> Any:
        return getattr(self.privacy, method)(request, metadata=auth(token or self.dpo))


def refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    reason = dict(err.trailing_metadata() or ()).get("keybroker-reason", "")
    return err.code(), err.details(), reason


def rid() -> str:
    return f"rec-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def calls(devenv: DevEnv, running: RunningBroker) -> Iterator[Calls]:
    c = Calls(devenv, running.port)
    yield c
    c.close()


def test_erasing_a_recording_refuses_every_copy_of_its_key(
    calls: Calls, running: RunningBroker
) -> None:
    rec = rid()
    blob = calls.generate(rec)
    backup = bytes(blob)  # e.g. a copy in last month's backup
    assert len(calls.unwrap(rec, blob).data_key) == 32
    receipt = calls.call(
        "EraseRecording", ppb.EraseRecordingRequest(recording_id=rec, reason="art. 17 #1")
    )
    assert (receipt.kind, receipt.target, receipt.recordings) == ("recording", rec, 1)
    assert receipt.erased_by == "dpo-1"
    assert receipt.audit_reference.startswith("erasure:")
    assert not receipt.already_erased
    assert abs(receipt.erased_at.seconds - time.time()) < 60
    code, message, reason = refused(lambda: calls.unwrap(rec, backup))
    assert (code, message, reason) == (FAILED, "erased", "erased")
    rewrap = pb.RewrapDataKeyRequest(recording_id=rec, wrapped_key=backup)
    assert refused(lambda: calls.kb.RewrapDataKey(rewrap, metadata=auth(calls.data)))[0] == FAILED
    assert refused(lambda: calls.generate(rec))[2] == "erased"  # the id stays erased
    again = calls.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=rec, reason="x"))
    assert again.already_erased
    assert again.audit_reference == receipt.audit_reference
    assert (
        refused(lambda: calls.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=rec)))[
            0
        ]
        == grpc.StatusCode.INVALID_ARGUMENT
    )  # a reason is required
    assert (
        refused(
            lambda: calls.call(
                "EraseRecording",
                ppb.EraseRecordingRequest(recording_id=rid(), reason="x"),
                token=calls.data,
            )
        )[2]
        == "scope_missing"
    )


def test_erasing_a_subject_covers_all_their_recordings(
    calls: Calls, running: RunningBroker
) -> None:
    subject, other = f"s-{uuid.uuid4().hex[:8]}", f"s-{uuid.uuid4().hex[:8]}"
    recs = [rid() for _ in range(3)]
    blobs = [
        calls.generate(recs[0], (subject,)),
        calls.generate(recs[1], (subject, other)),
        calls.generate(recs[2], (subject,)),
    ]
    kept = rid()
    kept_blob = calls.generate(kept, (other,))
    assert running.privacy is not None
    running.privacy.flush_registry()
    receipt = calls.call(
        "EraseSubject", ppb.EraseSubjectRequest(subject_id=subject, reason="art. 17 #2")
    )
    assert (receipt.kind, receipt.recordings) == ("subject", 3)
    for rec, blob in zip(recs, blobs, strict=True):
        assert refused(lambda rec=rec, blob=blob: calls.unwrap(rec, blob))[2] == "erased"
    assert len(calls.unwrap(kept, kept_blob).data_key) == 32
    assert refused(lambda: calls.generate(rid(), (subject,)))[2] == "erased"


def test_legal_holds_block_erasure_until_released(calls: Calls) -> None:
    subject = f"s-{uuid.uuid4().hex[:8]}"
    rec, rec2 = rid(), rid()
    calls.generate(rec, (subject,))
    calls.generate(rec2, (subject,))
    hold = ppb.LegalHoldRequest(recording_id=rec, reason="case 2026-17")
    placed = calls.call("PlaceLegalHold", hold)
    assert (placed.kind, placed.target, placed.placed_by) == ("recording", rec, "dpo-1")
    assert refused(lambda: calls.call("PlaceLegalHold", hold))[2] == "already_held"
    erase = ppb.EraseRecordingRequest(recording_id=rec, reason="art. 17")
    code, message, reason = refused(lambda: calls.call("EraseRecording", erase))
    assert (code, reason) == (FAILED, "legal_hold")
    assert "release the hold" in message
    time.sleep(0.7)  # the registry (buffered) now knows rec belongs to the subject
    erase_subject = ppb.EraseSubjectRequest(subject_id=subject, reason="art. 17")
    assert refused(lambda: calls.call("EraseSubject", erase_subject))[2] == "legal_hold"
    calls.call("ReleaseLegalHold", ppb.LegalHoldRequest(recording_id=rec))
    assert (
        refused(lambda: calls.call("ReleaseLegalHold", ppb.LegalHoldRequest(recording_id=rec)))[2]
        == "not_held"
    )
    subject_hold = ppb.LegalHoldRequest(subject_id=subject, reason="case 2026-18")
    calls.call("PlaceLegalHold", subject_hold)
    erase2 = ppb.EraseRecordingRequest(recording_id=rec2, reason="art. 17")
    assert refused(lambda: calls.call("EraseRecording", erase2))[2] == "legal_hold"
    calls.call("ReleaseLegalHold", ppb.LegalHoldRequest(subject_id=subject))
    assert calls.call("EraseSubject", erase_subject).recordings == 2
    erased_hold = ppb.LegalHoldRequest(subject_id=subject, reason="too late")
    assert refused(lambda: calls.call("PlaceLegalHold", erased_hold))[2] == "erased"


def test_holds_need_mfa(calls: Calls, devenv: DevEnv) -> None:
    no_mfa = mint_token(devenv, scopes=["privacy:hold"])
    hold = ppb.LegalHoldRequest(recording_id=rid(), reason="case")
    assert refused(lambda: calls.call("PlaceLegalHold", hold, token=no_mfa))[2] == "mfa_required"


def test_amend_purposes_adds_and_removes_with_a_recorded_reason(
    calls: Calls, running: RunningBroker
) -> None:
    rec = rid()
    blob = calls.generate(rec)
    assert refused(lambda: calls.unwrap(rec, blob, "qa"))[2] == "purpose_not_bound"
    amend = ppb.AmendPurposesRequest(
        recording_id=rec, wrapped_key=blob, add_purposes=["qa"], reason="consent 2026-11-22"
    )
    out = calls.call("AmendPurposes", amend)
    assert list(out.purposes) == ["qa", "support"]
    assert len(calls.unwrap(rec, out.wrapped_key, "qa").data_key) == 32
    removed = calls.call(
        "AmendPurposes",
        ppb.AmendPurposesRequest(
            recording_id=rec,
            wrapped_key=out.wrapped_key,
            remove_purposes=["support"],
            reason="consent withdrawn",
        ),
    )
    assert list(removed.purposes) == ["qa"]
    assert refused(lambda: calls.unwrap(rec, removed.wrapped_key))[2] == "purpose_not_bound"
    # consent withdrawn holds for every copy: wrapped keys made before the removal are refused too
    for old in (blob, out.wrapped_key):
        code, message, reason = refused(lambda old=old: calls.unwrap(rec, old))
        assert (code, message, reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "purpose withdrawn for this recording",
            "purpose_withdrawn",
        )
    assert len(calls.unwrap(rec, out.wrapped_key, "qa").data_key) == 32  # the others stay
    restored = calls.call(
        "AmendPurposes",
        ppb.AmendPurposesRequest(
            recording_id=rec,
            wrapped_key=removed.wrapped_key,
            add_purposes=["support"],
            reason="consent given again",
        ),
    )
    assert list(restored.purposes) == ["qa", "support"]
    assert len(calls.unwrap(rec, blob).data_key) == 32  # given back: old copies work again
    again = ppb.AmendPurposesRequest(
        recording_id=rec, wrapped_key=blob, remove_purposes=["support"], add_purposes=["qa"],
        reason="consent withdrawn again",
    )  # fmt: skip
    calls.call("AmendPurposes", again)
    assert refused(lambda: calls.unwrap(rec, blob))[2] == "purpose_withdrawn"
    through_old = ppb.AmendPurposesRequest(
        recording_id=rec, wrapped_key=blob, add_purposes=["support"], reason="consent again"
    )  # blob still lists support: adding it back through this copy lifts the withdrawal
    calls.call("AmendPurposes", through_old)
    assert len(calls.unwrap(rec, blob).data_key) == 32
    for bad in (
        ppb.AmendPurposesRequest(recording_id=rec, wrapped_key=blob, add_purposes=["qa"]),
        ppb.AmendPurposesRequest(
            recording_id=rec, wrapped_key=blob, remove_purposes=["support"], reason="all gone"
        ),
    ):
        code = refused(lambda bad=bad: calls.call("AmendPurposes", bad))[0]
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(lambda: calls.call("AmendPurposes", amend, token=calls.data))[2] == (
        "scope_missing"
    )
    records = [d for _ts, d in _decisions(running) if d.operation == "AmendPurposes"]
    assert records[0].justification == "consent 2026-11-22"
    assert records[0].subject == "dpo-1"


def test_subject_access_report_lists_recordings_and_decisions(
    calls: Calls, running: RunningBroker
) -> None:
    subject = f"s-{uuid.uuid4().hex[:8]}"
    rec = rid()
    blob = calls.generate(rec, (subject,))
    calls.unwrap(rec, blob)
    refused(lambda: calls.unwrap(rec, blob, "marketing"))
    assert running.privacy is not None
    running.privacy.flush_registry()
    report = calls.call("SubjectAccessReport", ppb.SubjectAccessReportRequest(subject_id=subject))
    assert [r.recording_id for r in report.recordings] == [rec]
    assert list(report.recordings[0].purposes) == ["support"]
    rows = [(d.operation, d.outcome, list(d.purposes)) for d in report.decisions]
    assert rows == [
        ("KeyBroker/GenerateWrappedDataKey", "allow", ["support"]),
        ("KeyBroker/UnwrapDataKey", "allow", ["support"]),
        ("KeyBroker/UnwrapDataKey", "deny", ["marketing"]),
    ]
    assert all(d.principal == "dev-storage" for d in report.decisions)
    request = ppb.SubjectAccessReportRequest(subject_id=subject)
    code, _message, reason = refused(
        lambda: calls.call("SubjectAccessReport", request, token=calls.data)
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "scope_missing")  # audit:read


def test_a_replica_that_cannot_refresh_refuses_unwraps(devenv: DevEnv, tmp_path: Path) -> None:
    running = create_server(
        load_settings(
            devenv,
            state_url=f"sqlite:{tmp_path / 'kb.db'}",
            audit_dir=str(tmp_path / "journal"),
            state_max_staleness="0.5",
            state_refresh_interval="60",  # the loop will not refresh in time
        )
    )
    try:
        c = Calls(devenv, running.port)
        rec = rid()
        assert running.privacy is not None
        running.privacy.refresh()  # a loaded machine may take more than 0.5 s to get here
        blob = c.generate(rec)
        time.sleep(0.7)
        code, _message, reason = refused(lambda: c.unwrap(rec, blob))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "privacy_state_stale")
        health = health_pb2_grpc.HealthStub(c._channel)
        serving = health_pb2.HealthCheckResponse.SERVING

        def status() -> int:
            response = health.Check(health_pb2.HealthCheckRequest(service=""))
            code: int = response.status
            return code

        deadline = time.monotonic() + 5
        while status() == serving and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status() != serving  # load balancers route around a stale replica
        assert running.privacy is not None
        running.privacy.refresh()
        assert len(c.unwrap(rec, blob).data_key) == 32
        assert status() == serving
        c.close()
    finally:
        running.stop(1)


def test_erasure_through_one_replica_is_in_force_on_the_other_when_it_returns(
    devenv: DevEnv, tmp_path: Path, store_url: str
) -> None:
    procs = [
        BrokerProcess(
            devenv,
            tmp_path / f"r{i}.log",
            {"KEYBROKER_STATE_URL": store_url, "KEYBROKER_AUDIT_DIR": str(tmp_path / f"j{i}")},
        )
        for i in range(2)
    ]
    try:
        a, b = (Calls(devenv, p.wait_listening()) for p in procs)
        time.sleep(1.0)  # both replicas have acknowledged once: they are known to be alive
        recs = [rid() for _ in range(5)]
        blobs = [b.generate(rec) for rec in recs]
        for rec, blob in zip(recs, blobs, strict=True):
            a.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=rec, reason="r"))
            # no waiting: from the moment the call returns, replica B refuses
            assert refused(lambda rec=rec, blob=blob: b.unwrap(rec, blob))[2] == "erased"
        rec = rid()
        blob = b.generate(rec)
        withdraw = ppb.AmendPurposesRequest(
            recording_id=rec, wrapped_key=blob, add_purposes=["qa"], remove_purposes=["support"],
            reason="consent withdrawn",
        )  # fmt: skip
        a.call("AmendPurposes", withdraw)
        # no waiting: replica B refuses the old copy for the withdrawn purpose at once
        assert refused(lambda: b.unwrap(rec, blob))[2] == "purpose_withdrawn"
        held = rid()
        b.generate(held)
        b.call("PlaceLegalHold", ppb.LegalHoldRequest(recording_id=held, reason="case"))
        erase = ppb.EraseRecordingRequest(recording_id=held, reason="r")
        assert refused(lambda: a.call("EraseRecording", erase))[2] == "legal_hold"
        a.close()
        b.close()
    finally:
        assert stop_all(procs) == [0, 0]


def _wait_registered(devenv: DevEnv, store_url: str, recording_id: str) -> None:
    """Until ``recording_id``'s registration is committed in the database (at most 10 s)."""
    store = SqlPrivacyStore(
        open_database(load_settings(devenv, state_url=store_url), migrate=False)
    )
    try:
        deadline = time.monotonic() + 10
        while not store.is_registered(recording_id):
            assert time.monotonic() < deadline, f"{recording_id} never registered"
            time.sleep(0.05)
    finally:
        store.close()


def test_a_frozen_replica_never_serves_a_key_erased_meanwhile(
    devenv: DevEnv, tmp_path: Path, store_url: str
) -> None:
    """Replica B is frozen (SIGSTOP) when a recording is erased through A: the erasure waits until
    B can no longer serve on its stale state (not merely until B's heartbeat looks old), and once
    B is resumed it refuses the key (erased, or stale until it has refreshed)."""
    staleness = 2.0
    procs = [
        BrokerProcess(
            devenv,
            tmp_path / f"r{i}.log",
            {
                "KEYBROKER_STATE_URL": store_url,
                "KEYBROKER_STATE_MAX_STALENESS": str(staleness),
                "KEYBROKER_AUDIT_DIR": str(tmp_path / f"j{i}"),
            },
        )
        for i in range(2)
    ]
    try:
        a, b = (Calls(devenv, p.wait_listening()) for p in procs)
        time.sleep(1.0)  # both replicas have acknowledged once
        rec = rid()
        blob = b.generate(rec)
        assert len(b.unwrap(rec, blob).data_key) == 32
        # B registers the recording from its refresh thread, under the database's privacy lock.
        # Frozen in that transaction, B would hold the lock until PostgreSQL ends its session
        # (30 s idle in a transaction), and A's erasure would be refused UNAVAILABLE after 10 s
        # (lock_timeout, seen once in a clean-clone run): another scenario than this test's.
        _wait_registered(devenv, store_url, rec)
        procs[1].proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            a.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=rec, reason="r"))
            waited = time.monotonic() - started
        finally:
            procs[1].proc.send_signal(signal.SIGCONT)
        # B may serve for max_staleness after its last refresh; it acknowledged at most ~1.25 s
        # before it froze; the erasure waits 4.25 s after that acknowledgement (max_staleness +
        # 1 s heartbeat + 1 s clock-skew margin + one refresh interval). Before the fix it
        # stopped waiting once B's acknowledgement was 2 s old.
        assert staleness + 0.5 <= waited <= staleness + 5.0
        code, _, reason = refused(lambda: b.unwrap(rec, blob))
        assert (code, reason) in {
            (grpc.StatusCode.FAILED_PRECONDITION, "erased"),
            (grpc.StatusCode.UNAVAILABLE, "privacy_state_stale"),
        }
        deadline = time.monotonic() + 10
        while reason != "erased" and time.monotonic() < deadline:  # once refreshed: erased
            time.sleep(0.1)
            code, _, reason = refused(lambda: b.unwrap(rec, blob))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "erased")
        a.close()
        b.close()
    finally:
        assert stop_all(procs) == [0, 0]


def test_digest_set_has_no_false_negatives_and_grows() -> None:
    values = DigestSet()
    numbers = [(i * 0x9E3779B97F4A7C15) % 2**64 or 1 for i in range(1, 100_001)]
    for n in numbers:
        values.add(n)
    values.add(numbers[0])
    assert len(values) == 100_000
    assert all(n in values for n in numbers)
    assert sum((n + 1) in values for n in numbers[:1000]) <= 2
    assert values.memory_bytes <= 100_000 * 8 / 0.3


def _decisions(running: RunningBroker) -> list[tuple[int, Any]]:
    from keybroker.adapters.audit_reader import decisions

    assert running.journal is not None
    return list(decisions(running.journal.directory.parent))


def test_privacy_cli_holds_erases_amends_and_reports(devenv: DevEnv, tmp_path: Path) -> None:
    running = create_server(
        load_settings(
            devenv,
            state_url=f"sqlite:{tmp_path / 'kb.db'}",
            audit_dir=str(tmp_path / "journal"),
        )
    )
    try:
        c = Calls(devenv, running.port)
        token = tmp_path / "dpo.token"
        token.write_text(c.dpo)
        env = {"KEYBROKER_CLIENT_TARGET": f"127.0.0.1:{running.port}"}

        def privacy(*args: str, code: int = 0) -> str:
            out = run_cli(
                "privacy", *args, "--config", str(devenv.config), "--token-file", str(token),
                env=env,
            )  # fmt: skip
            assert out.returncode == code, out.stderr
            return out.stdout if code == 0 else out.stderr

        subject = f"s-{uuid.uuid4().hex[:8]}"
        rec, other = rid(), rid()
        c.generate(rec, (subject,))
        blob = c.generate(other, (subject,))
        assert "legal hold placed: recording" in privacy(
            "hold", "--recording", rec, "--reason", "c1"
        )
        assert "legal hold" in privacy("erase-recording", rec, "--reason", "art. 17", code=1)
        assert "released" in privacy("release", "--recording", rec)
        receipt = privacy("erase-recording", rec, "--reason", "art. 17")
        assert f"erased: recording {rec}" in receipt
        assert "audit reference     erasure:" in receipt
        amended = json.loads(
            privacy(
                "amend",
                "--recording-id",
                other,
                "--wrapped-key",
                base64.b64encode(blob).decode(),
                "--add",
                "qa",
                "--reason",
                "consent",
                "--json",
            )
        )
        assert amended["purposes"] == ["qa", "support"]
        new_blob = base64.b64decode(amended["wrapped_key"])
        assert len(c.unwrap(other, new_blob, "qa").data_key) == 32
        assert running.privacy is not None
        running.privacy.flush_registry()
        report = privacy("report", subject)
        assert f"subject {subject}: 2 recordings" in report
        assert "KeyBroker/UnwrapDataKey" in report
        c.close()
    finally:
        running.stop(1)
