"""Backup and restore (docs/OPERATIONS.md): a metadata database restored from a backup taken
before an erasure, a legal hold and a purpose withdrawal does not bring any of them back. A real
broker (real HSM, real mTLS, real journal) on SQLite and PostgreSQL; the backup is SQLite's
online backup or ``pg_dump``, the restore a file copy or ``psql``."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from keybroker.adapters.journal import read_lines
from keybroker.cli.main import main as cli_main
from keybroker.core import journal as jf
from keybroker.core.privacy_replay import OP_ERASURE, OP_HOLD, OP_WITHDRAWAL, REPLAY_SUBJECT
from keybroker.devenv import DevEnv
from keybroker.errors import JournalUnavailableError
from keybroker.server.app import RunningBroker, create_server
from keybroker.settings import Settings
from keybroker.v1 import privacy_pb2 as ppb
from tests.conftest import load_settings
from tests.server.test_privacy import Calls, refused, rid
from tests.support.process import BrokerProcess, run_cli, stop_all

FAILED = grpc.StatusCode.FAILED_PRECONDITION
PostgresTool = Callable[..., None]


def _backup(url: str, target: Path) -> None:
    if url.startswith("sqlite:"):
        src, dst = sqlite3.connect(url.removeprefix("sqlite:")), sqlite3.connect(target)
        try:
            src.backup(dst)  # the online backup API: consistent while the broker runs
        finally:  # closed now: a connection left to the garbage collector keeps the old -shm
            src.close()
            dst.close()
        return
    subprocess.run(
        ["pg_dump", "--clean", "--if-exists", "--no-owner", "-f", str(target), url],
        check=True,
        timeout=60,
    )


def _restore(url: str, backup: Path) -> None:
    if url.startswith("sqlite:"):
        db = Path(url.removeprefix("sqlite:"))
        for extra in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            extra.unlink(missing_ok=True)
        shutil.copyfile(backup, db)
        return
    subprocess.run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(backup), url],
        check=True,
        timeout=60,
        capture_output=True,
    )


def _replays(journal: Path) -> list[tuple[str, str, str]]:
    """``(operation, outcome, target)`` of every replay decision in the journal."""
    out = []
    for chain in sorted(journal.glob("w*")):
        for _where, raw in read_lines(chain):
            body = jf.parse_line(raw)
            if body["kind"] != jf.KIND_DECISION or body["d"].get("subject") != REPLAY_SUBJECT:
                continue
            d = jf.decision_from_dict(body["d"])
            target = d.recording_id or ",".join(d.subject_ids)
            out.append((d.operation, d.outcome.value, target))
    return out


class Restart:
    def __init__(self, devenv: DevEnv, settings: Settings) -> None:
        self.devenv = devenv
        self.settings = settings
        self.broker: RunningBroker | None = None
        self.calls: Calls | None = None

    def start(self, *, replay: bool = True) -> Calls:
        self.broker = create_server(self.settings, replay=replay)
        self.calls = Calls(self.devenv, self.broker.port)
        return self.calls

    def stop(self) -> None:
        if self.calls is not None:
            self.calls.close()
            self.calls = None
        if self.broker is not None:
            self.broker.stop(1)
            self.broker = None


def test_a_restored_database_keeps_erasures_holds_and_withdrawals(
    devenv: DevEnv, store_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    settings = load_settings(devenv, state_url=store_url, audit_dir=str(journal))
    node = Restart(devenv, settings)
    calls = node.start()
    try:
        erased, of_subject, held, amended, later = rid(), rid(), rid(), rid(), rid()
        subject = f"subj-{rid()}"
        blobs = {rec: calls.generate(rec) for rec in (erased, held, amended)}
        blobs[of_subject] = calls.generate(of_subject, subjects=(subject,))
        blobs[amended] = calls.call(  # purposes support and qa
            "AmendPurposes",
            ppb.AmendPurposesRequest(
                recording_id=amended, wrapped_key=blobs[amended], add_purposes=["qa"], reason="c1"
            ),
        ).wrapped_key
        assert node.broker is not None and node.broker.privacy is not None
        node.broker.privacy.flush_registry()  # the registry is written behind the calls
        backup = tmp_path / "backup.db"
        _backup(store_url, backup)

        # after the backup: an erasure of each kind, a hold, a withdrawal, a new recording
        calls.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=erased, reason="r1"))
        calls.call("EraseSubject", ppb.EraseSubjectRequest(subject_id=subject, reason="r2"))
        calls.call("PlaceLegalHold", ppb.LegalHoldRequest(recording_id=held, reason="case 7"))
        calls.call(
            "AmendPurposes",
            ppb.AmendPurposesRequest(
                recording_id=amended, wrapped_key=blobs[amended], remove_purposes=["qa"],
                reason="consent withdrawn",
            ),
        )  # fmt: skip
        blobs[later] = calls.generate(later)

        def answers(c: Calls) -> dict[str, object]:
            return {
                "erased": refused(lambda: c.unwrap(erased, blobs[erased])),
                "of_subject": refused(lambda: c.unwrap(of_subject, blobs[of_subject])),
                "held": refused(
                    lambda: c.call(
                        "EraseRecording", ppb.EraseRecordingRequest(recording_id=held, reason="x")
                    )
                )[2],
                "withdrawn": refused(lambda: c.unwrap(amended, blobs[amended], "qa"))[2],
            }

        before = answers(calls)
        assert before["erased"] == (FAILED, "erased", "erased")
        assert before["of_subject"] == (FAILED, "erased", "erased")
        assert before["held"] == "legal_hold"
        assert before["withdrawn"] == "purpose_withdrawn"
        node.stop()

        _restore(store_url, backup)
        # the failure this guards against: without replay, the restored database forgets them
        calls = node.start(replay=False)
        assert len(calls.unwrap(erased, blobs[erased]).data_key) == 32
        assert len(calls.unwrap(amended, blobs[amended], "qa").data_key) == 32
        node.stop()

        calls = node.start()  # replays the journal before serving
        assert answers(calls) == before
        assert len(calls.unwrap(held, blobs[held]).data_key) == 32  # held, not erased
        assert len(calls.unwrap(amended, blobs[amended]).data_key) == 32  # support stays
        # a recording made after the backup: its wrapped key still opens (same KEK version),
        # but the restored registry has lost it (docs/OPERATIONS.md)
        assert len(calls.unwrap(later, blobs[later]).data_key) == 32
        assert node.broker is not None and node.broker.privacy is not None
        assert node.broker.privacy.store.recording(later) is None
        node.stop()

        replays = _replays(journal)
        assert sorted(r for r in replays if r[1] == "allow") == sorted(
            [
                (OP_ERASURE, "allow", erased),
                (OP_ERASURE, "allow", subject),
                (OP_HOLD, "allow", held),
                (OP_WITHDRAWAL, "allow", amended),
            ]
        )
        assert all(r[1] in ("allow", "intent") for r in replays)

        calls = node.start()  # a second start finds nothing to re-apply
        assert answers(calls) == before
        node.stop()
        assert _replays(journal) == replays
    finally:
        node.stop()


def test_a_forged_or_damaged_journal_stops_the_start(
    devenv: DevEnv,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replay trusts no journal that fails verification: the broker does not start (a missing
    erasure could be hidden past the defect), and says what to run."""
    journal = tmp_path / "journal"
    settings = load_settings(
        devenv, state_url=f"sqlite:{tmp_path / 'kb.db'}", audit_dir=str(journal)
    )
    node = Restart(devenv, settings)
    calls = node.start()
    rec = rid()
    calls.generate(rec)
    calls.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=rec, reason="r1"))
    node.stop()
    path = sorted((journal / "w0").glob("journal-*.jsonl"))[0]
    lines = path.read_bytes().splitlines(keepends=True)
    erase = next(i for i, line in enumerate(lines) if b'"EraseRecording"' in line)
    del lines[erase]  # someone removes the erasure's intent record
    path.write_bytes(b"".join(lines))
    with pytest.raises(JournalUnavailableError, match="fails verification") as info:
        node.start()
    assert "keybroker audit verify" in str(info.value)
    monkeypatch.setenv("KEYBROKER_AUDIT_DIR", str(journal))
    monkeypatch.setenv("KEYBROKER_STATE_URL", f"sqlite:{tmp_path / 'kb.db'}")
    code = cli_main(["privacy", "replay", "--config", str(devenv.config), "--dry-run"])
    assert code == 1
    assert "fails verification" in capsys.readouterr().err


def test_privacy_replay_command(devenv: DevEnv, tmp_path: Path) -> None:
    """``keybroker privacy replay``: refused while a broker holds the journal; with it stopped,
    a dry run says what the restored database lacks, the real run re-applies and journals it,
    and a second run finds nothing."""
    journal, db = tmp_path / "journal", tmp_path / "kb.db"
    env = {"KEYBROKER_AUDIT_DIR": str(journal), "KEYBROKER_STATE_URL": f"sqlite:{db}"}
    settings = load_settings(devenv, state_url=f"sqlite:{db}", audit_dir=str(journal))
    node = Restart(devenv, settings)
    calls = node.start()
    try:
        rec = rid()
        blob = calls.generate(rec)
        _backup(f"sqlite:{db}", tmp_path / "backup.db")
        calls.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=rec, reason="r1"))
        config = ("--config", str(devenv.config))
        running = run_cli("privacy", "replay", *config, env=env)
        assert running.returncode == 2, running.stderr
        assert "journal" in running.stderr
        node.stop()
        _restore(f"sqlite:{db}", tmp_path / "backup.db")

        dry = run_cli("privacy", "replay", *config, "--dry-run", env=env)
        assert dry.returncode == 0, dry.stderr
        (line,) = dry.stdout.splitlines()
        assert line.startswith(f"would re-apply: erasure of recording {rec} (w0/journal-"), line
        applied = run_cli("privacy", "replay", *config, "--json", env=env)
        assert applied.returncode == 0, applied.stderr
        report = json.loads(applied.stdout)
        assert report["dry_run"] is False
        assert len(report["applied"]) == 1 and rec in report["applied"][0]
        again = run_cli("privacy", "replay", *config, env=env)
        assert again.stdout.startswith("the database holds every"), again.stdout
        assert (OP_ERASURE, "allow", rec) in _replays(journal)

        calls = node.start(replay=False)  # the command did the work
        assert refused(lambda: calls.unwrap(rec, blob)) == (FAILED, "erased", "erased")
    finally:
        node.stop()


def test_several_processes_replay_once_before_serving(devenv: DevEnv, tmp_path: Path) -> None:
    """``serve`` with two worker processes: the supervisor replays before any worker serves."""
    db = tmp_path / "kb.db"
    journal = tmp_path / "broker.journal"  # BrokerProcess's journal for log broker.log
    settings = load_settings(devenv, state_url=f"sqlite:{db}", audit_dir=str(journal))
    node = Restart(devenv, settings)
    calls = node.start()
    try:
        rec = rid()
        blob = calls.generate(rec)
        _backup(f"sqlite:{db}", tmp_path / "backup.db")
        calls.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=rec, reason="r1"))
    finally:
        node.stop()
    _restore(f"sqlite:{db}", tmp_path / "backup.db")
    proc = BrokerProcess(
        devenv,
        tmp_path / "broker.log",
        {"KEYBROKER_STATE_URL": f"sqlite:{db}", "KEYBROKER_SERVER_PROCESSES": "2"},
    )
    try:
        port = proc.wait_listening(count=2, timeout=90)
        calls = Calls(devenv, port)
        try:
            for _ in range(4):  # whichever worker answers
                assert refused(lambda: calls.unwrap(rec, blob))[2] == "erased"
        finally:
            calls.close()
    finally:
        assert stop_all([proc]) == [0]
    out = proc.output()
    assert out.count("privacy replay: the database lacked it, re-applied") == 1, out
    assert [r for r in _replays(journal) if r[1] == "allow"] == [(OP_ERASURE, "allow", rec)]


def test_two_replicas_each_replay_their_own_journal(
    devenv: DevEnv, postgres_url: str, tmp_path: Path
) -> None:
    """Two replicas on one PostgreSQL database, each with its own journal: after a restore, each
    re-applies the changes it took, and one both journaled is re-applied once."""
    nodes = [
        Restart(
            devenv,
            load_settings(devenv, state_url=postgres_url, audit_dir=str(tmp_path / f"j{i}")),
        )
        for i in (0, 1)
    ]
    a, b = (node.start() for node in nodes)
    try:
        on_a, on_b, both = rid(), rid(), rid()
        blobs = {rec: a.generate(rec) for rec in (on_a, on_b, both)}
        _backup(postgres_url, tmp_path / "backup.sql")
        a.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=on_a, reason="r1"))
        b.call("PlaceLegalHold", ppb.LegalHoldRequest(recording_id=on_b, reason="case 9"))
        a.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=both, reason="r2"))
        b.call("EraseRecording", ppb.EraseRecordingRequest(recording_id=both, reason="r2"))
        for node in nodes:
            node.stop()
        _restore(postgres_url, tmp_path / "backup.sql")
        a = nodes[0].start()  # replays its own journal
        assert refused(lambda: a.unwrap(on_a, blobs[on_a]))[2] == "erased"
        assert refused(lambda: a.unwrap(both, blobs[both]))[2] == "erased"
        b = nodes[1].start()
        for calls in (a, b):
            refusal = refused(
                lambda c=calls: c.call(
                    "EraseRecording", ppb.EraseRecordingRequest(recording_id=on_b, reason="x")
                )
            )
            assert refusal[2] == "legal_hold"
        # b found its erasure of `both` in the database already (a re-applied it): nothing to do
        assert _replays(tmp_path / "j1") == [(OP_HOLD, "intent", on_b), (OP_HOLD, "allow", on_b)]
        assert [r for r in _replays(tmp_path / "j0") if r[1] == "allow"] == [
            (OP_ERASURE, "allow", on_a),
            (OP_ERASURE, "allow", both),
        ]
    finally:
        for node in nodes:
            node.stop()
