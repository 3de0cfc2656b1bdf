"""Regression tests for the fixes of the audit trail: who is named, what a caller can make it
hold, who may write it, what `audit verify` sees, and what "durable" means (see
tests/security/README.md for how each test names the CHANGELOG entry it guards)."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from keybroker import settings as settings_mod
from keybroker.adapters.audit_reader import decisions
from keybroker.adapters.journal import Journal, JournalConfig, journal_files
from keybroker.core.decision import Decision, Outcome
from keybroker.devenv import DevEnv
from keybroker.errors import ConfigurationError, JournalUnavailableError
from keybroker.server.app import RunningBroker
from keybroker.server.limits import AGGREGATE_REASON
from keybroker.v1 import keybroker_pb2 as pb
from tests.security.conftest import Start
from tests.security.support import Caller, new_id, refused
from tests.support.clients import auth, generate_request
from tests.support.process import run_cli


def _journal(broker: RunningBroker) -> list[Decision]:
    assert broker.journal is not None
    return [d for _ts, d in decisions(broker.journal.directory.parent)]


def test_a_caller_cannot_flood_the_journal(devenv: DevEnv, start: Start) -> None:
    """Unreleased, Security: "The journal cannot be flooded (issue 14, item 8)".

    With ``[limits]`` set (2 calls in a burst, then one per 10 s), a token subject over its rate
    is RESOURCE_EXHAUSTED ``rate_limited``; that denial and 30 calls without a token, with a
    threshold of 5 denials a minute per certificate, leave 5 records of their own and one
    aggregate record counting the other 26."""
    broker = start(limits_subject_rate="0.1", limits_burst="20", limits_denials_per_minute="5")
    caller = Caller(devenv, broker.port)
    try:
        busy = caller.token(["keys:generate"], subject="busy")
        codes = []
        for _ in range(3):
            try:
                caller.generate(new_id(), token=busy)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        for _ in range(30):
            refused(lambda: caller.kb.GenerateDataKey(generate_request()))  # no token
    finally:
        caller.close()
    broker.stop(0)  # journals the minute's open aggregate
    records = [d for d in _journal(broker) if d.outcome is Outcome.DENY]
    assert sum(d.reason == "rate_limited" for d in records) == 1
    missing = [d for d in records if d.reason == "token_missing"]
    [aggregate] = [d for d in records if d.reason == AGGREGATE_REASON]
    assert len(missing) == 4  # the 5th denial of the minute is the rate-limited call
    assert aggregate.aggregated == {"GenerateDataKey/token_missing": 26}


def test_a_denial_names_its_target_and_caller(devenv: DevEnv, start: Start) -> None:
    """Unreleased, Security: "Denials name their target and caller (issue 14, item 7)".

    An unwrap refused for a token that verified but has expired: the journal record carries the
    requested recording id, the key named in the blob, the peer, the client certificate, and the
    token's ``sub``/``jti``/``client_id`` (never the token)."""
    broker = start()
    caller = Caller(devenv, broker.port)
    try:
        rec = new_id()
        made = caller.generate(rec)
        late = caller.token(
            ["keys:unwrap"], subject="late-storage", now=time.time() - 7200, lifetime=600
        )
        request = pb.UnwrapDataKeyRequest(
            recording_id=rec, wrapped_key=made.wrapped_key, purpose="support"
        )
        code, _message, reason = refused(
            lambda: caller.kb.UnwrapDataKey(request, metadata=auth(late))
        )
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "token_expired")
    finally:
        caller.close()
    [denial] = [
        d for d in _journal(broker) if d.recording_id == rec and d.operation == "UnwrapDataKey"
    ]
    assert (denial.subject, denial.client_id) == ("late-storage", "dev-storage")
    assert denial.token_id
    assert denial.key_name == made.key_ref.key_name
    assert denial.cert_identity == "spiffe://keybroker.dev/storage/dev"
    assert denial.peer_address and "127.0.0.1" in denial.peer_address
    assert late not in repr(denial)


def test_trace_headers_are_capped_before_a_decision_keeps_them(
    devenv: DevEnv, start: Start
) -> None:
    """Unreleased, Security: "Trace headers are capped to their W3C sizes before a decision keeps
    them".

    A caller sending a 5 KB ``tracestate`` and an over-long ``traceparent`` gets a journal
    record holding at most 512 characters of trace state and no traceparent."""
    broker = start()
    caller = Caller(devenv, broker.port)
    try:
        rec = new_id()
        token = caller.token(["keys:generate"])
        huge = ",".join(f"v{i}=" + "x" * 200 for i in range(25))  # 5 KB (gRPC takes 8)
        parent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01" + "f" * 500
        caller.kb.GenerateDataKey(
            generate_request(rec),
            metadata=auth(token, [("tracestate", huge), ("traceparent", parent)]),
        )
    finally:
        caller.close()
    [record] = [d for d in _journal(broker) if d.recording_id == rec]
    assert "traceparent" not in record.trace_context
    assert 0 < len(record.trace_context.get("tracestate", "")) <= 512


def test_two_brokers_cannot_write_one_journal_and_dev_tokens_are_owner_only(
    devenv: DevEnv, start: Start, tmp_path: Path
) -> None:
    """Unreleased, Security: "Two brokers on one `[audit] dir` (a restart by hand while the old
    one still runs, two pods on one volume) both wrote `journal/w0` and corrupted the hash chain".

    A second broker on a running broker's journal refuses to start, naming the lock; and
    ``keybroker dev token --output`` over an existing 0644 file leaves it 0600."""
    first = start("one")
    assert first.journal is not None
    with pytest.raises(ConfigurationError, match="in use by another keybroker"):
        start("two", audit_dir=str(first.journal.directory.parent))
    out = tmp_path / "client.token"
    out.write_text("old\n")
    out.chmod(0o644)
    done = run_cli(
        "dev", "token", "--state-dir", str(devenv.root), "--scope", "keys:unwrap",
        "--purpose", "support", "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600


def _rotated_journal(devenv: DevEnv, root: Path, chain: str) -> Path:
    key, signing = settings_mod.load(devenv.config, environ={}).audit.load_keys()
    journal = Journal(JournalConfig(root / chain, key, signing, max_file_bytes=2048))
    for i in range(40):
        journal.record(Decision("keybroker.v1.KeyBroker", "UnwrapDataKey", Outcome.ALLOW, "ok",
                                recording_id=f"rec-{i}"))  # fmt: skip
        if i % 10 == 9:
            journal.checkpoint()
    journal.close()
    assert len(journal_files(root / chain)) >= 3
    return root / chain


def test_audit_verify_sees_removed_files_and_missing_workers(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """Unreleased, Security: "`keybroker audit verify` had blind spots: a chain whose oldest files
    were removed passed silently, a worker's whole directory could disappear unseen".

    Both now fail verification (exit 1); removing old files the documented way (``audit archive
    --delete``) leaves a signed record, and verify passes."""
    root = tmp_path / "journal"
    chain = _rotated_journal(devenv, root, "w0")
    _rotated_journal(devenv, root, "w1")

    def verify() -> tuple[int, str]:
        done = run_cli("audit", "verify", "--config", str(devenv.config), "--dir", str(root))
        return done.returncode, done.stdout

    assert verify()[0] == 0
    shutil.rmtree(root / "w1")
    code, out = verify()
    assert code == 1 and "w1: MISSING" in out
    _rotated_journal(devenv, root, "w1")
    files = journal_files(chain)
    saved = files[0].read_bytes()
    files[0].unlink()
    code, out = verify()
    assert code == 1 and "missing" in out, out
    files[0].write_bytes(saved)
    archived = run_cli(
        "audit", "archive", "--config", str(devenv.config), "--dir", str(root),
        "--before", "2999-01-01T00:00:00+00:00", "--delete",
    )  # fmt: skip
    assert archived.returncode == 0, archived.stderr
    assert verify()[0] == 0


def test_a_caller_told_durable_is_in_the_journal_even_when_a_later_flush_fails(
    devenv: DevEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unreleased, Fixed: "Audit journal: a caller whose decision had been made durable could still
    get `UNAVAILABLE` if a later flush failed before it looked".

    Four writers while every fifth flush fails: the records whose writers were told "durable" are
    exactly the records on disk, and every other writer was told the journal is unavailable."""
    real = os.fdatasync
    flushes = [0]
    lock = threading.Lock()

    def flaky(fd: int) -> None:
        with lock:
            flushes[0] += 1
            failing = flushes[0] % 5 == 0
        time.sleep(0.001)
        if failing:
            raise OSError(errno.EIO, "I/O error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", flaky)
    key, signing = settings_mod.load(devenv.config, environ={}).audit.load_keys()
    journal = Journal(JournalConfig(tmp_path / "w0", key, signing))
    durable: list[str] = []
    unavailable: list[str] = []

    def writer(n: int) -> Callable[[], None]:
        def work() -> None:
            for i in range(25):
                rec = f"rec-{n}-{i}"
                try:
                    journal.record(Decision("s", "UnwrapDataKey", Outcome.ALLOW, "ok",
                                            recording_id=rec))  # fmt: skip
                except JournalUnavailableError:
                    unavailable.append(rec)
                else:
                    durable.append(rec)

        return work

    threads = [threading.Thread(target=writer(n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    journal.close()
    on_disk = [d.recording_id or "" for _ts, d in decisions(tmp_path)]
    assert unavailable, "no flush failed: the test proves nothing"
    assert sorted(on_disk) == sorted(durable)
    assert len(durable) + len(unavailable) == 100
