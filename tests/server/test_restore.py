"""Backup and restore (docs/OPERATIONS.md): a metadata database restored from a backup taken
before an erasure, a legal hold and a purpose withdrawal does not bring any of them back. A real
broker (real HSM, real mTLS, real journal) on SQLite and PostgreSQL; the backup is SQLite's
online backup or ``pg_dump``, the restore a file copy or ``psql``."""

from __future__ import annotations

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

FAILED = grpc.StatusCode.FAILED_PRECONDITION
PostgresTool = Callable[..., None]


def _backup(url: str, target: Path) -> None:
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:")) as src, sqlite3.connect(target) as dst:
            src.backup(dst)  # the online backup API: consistent while the broker runs
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
