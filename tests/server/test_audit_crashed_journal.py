"""The auditors' tools on a journal a crash left behind (issue #20, item 5): `audit query` and
`audit report` read it, skipping the torn last record with a note, and `audit verify` tells that
torn tail apart from tampering in the middle of the chain."""

from __future__ import annotations

import json
from pathlib import Path

from keybroker import settings as settings_mod
from keybroker.adapters.journal import Journal, JournalConfig, journal_files
from keybroker.core import journal as jf
from keybroker.core.decision import Decision, Outcome
from keybroker.devenv import DevEnv
from tests.support.process import run_cli


def _decision(i: int) -> Decision:
    return Decision(
        service="keybroker.v1.KeyBroker",
        operation="UnwrapDataKey",
        outcome=Outcome.ALLOW,
        reason="ok",
        subject="storage-eu",
        recording_id=f"rec-{i}",
        purposes=("support",),
    )


def crashed_journal(devenv: DevEnv, root: Path, decisions: int = 6) -> Path:
    """A chain as a crash mid-write leaves it: whole records, then half of the next record's line
    written into the preallocated zeros, and no final checkpoint or cut-back."""
    key, signing = settings_mod.load(devenv.config, environ={}).audit.load_keys()
    chain = root / "w0"
    journal = Journal(JournalConfig(chain, key, signing))
    for i in range(decisions):
        journal.record(_decision(i))
    [path] = journal_files(chain)
    data = path.read_bytes()
    end = data.rstrip(b"\0").rfind(b"\n") + 1
    assert data[end:] and not data[end:].strip(b"\0"), "expected preallocated zeros"
    _, line = jf.decision_line(
        key, seq=decisions + 1, ts=1, prev="0" * 64, decision=_decision(decisions)
    )
    with path.open("r+b") as fh:  # the torn write: only its first half reached the disk
        fh.seek(end)
        fh.write(line[: len(line) // 2])
    # the process "crashed": its descriptor is dropped without close() (no checkpoint, no cut)
    return chain


def _cli(devenv: DevEnv, *args: str) -> tuple[int, str, str]:
    out = run_cli("audit", *args, "--config", str(devenv.config))
    return out.returncode, out.stdout, out.stderr


def test_query_reads_a_journal_torn_by_a_crash(devenv: DevEnv, tmp_path: Path) -> None:
    """`audit query` lists every whole record and notes the skipped torn one (no traceback)."""
    crashed_journal(devenv, tmp_path)
    code, out, err = _cli(devenv, "query", "--dir", str(tmp_path), "--json")
    assert code == 0, err
    assert "Traceback" not in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["recording_id"] for r in rows] == [f"rec-{i}" for i in range(6)]
    assert "note: w0/journal-000000000001.jsonl:7: skipped a torn last record" in err


def test_report_reads_a_journal_torn_by_a_crash(devenv: DevEnv, tmp_path: Path) -> None:
    """`audit report` summarises the whole records and notes the torn one."""
    crashed_journal(devenv, tmp_path)
    code, out, err = _cli(devenv, "report", "--dir", str(tmp_path), "--json")
    assert code == 0, err
    assert json.loads(out)["totals"]["allow"] == 6
    assert "note: w0/journal-000000000001.jsonl:7: skipped a torn last record" in err


def test_verify_reports_a_torn_tail_as_a_crash_not_tampering(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """A torn last record passes verification with a note; after a restart the note is gone."""
    chain = crashed_journal(devenv, tmp_path)
    code, out, err = _cli(devenv, "verify", "--dir", str(tmp_path))
    assert code == 0, out + err
    assert "w0: OK: records 1..6 intact" in out
    assert "journal-000000000001.jsonl:7: torn last record" in out
    assert "TAMPERED" not in out

    key, signing = settings_mod.load(devenv.config, environ={}).audit.load_keys()
    Journal(JournalConfig(chain, key, signing)).close()  # the next start cuts the torn record
    code, out, _ = _cli(devenv, "verify", "--dir", str(tmp_path))
    assert code == 0
    assert "w0: OK: records 1..7 intact, 1 signed checkpoints" in out
    assert "torn" not in out


def test_a_cut_record_in_the_middle_is_tampering(devenv: DevEnv, tmp_path: Path) -> None:
    """A record cut short anywhere but at the very end is not a crash: verify, query and report
    all fail with exit 1 and name the place (never a traceback)."""
    chain = crashed_journal(devenv, tmp_path)
    [path] = journal_files(chain)
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:40]
    path.write_bytes(b"\n".join(lines))
    code, out, _ = _cli(devenv, "verify", "--dir", str(tmp_path))
    assert code == 1
    assert "w0: TAMPERED at journal-000000000001.jsonl:3: unreadable record" in out
    for command in ("query", "report"):
        code, _, err = _cli(devenv, command, "--dir", str(tmp_path))
        assert code == 1, command
        assert "Traceback" not in err
        assert "w0/journal-000000000001.jsonl:3: unreadable record" in err


def test_an_unterminated_line_in_an_older_file_is_tampering(devenv: DevEnv, tmp_path: Path) -> None:
    """Only the newest file can end in a torn record: a crash never leaves one in a file the
    journal has rotated away from."""
    chain = crashed_journal(devenv, tmp_path)
    [path] = journal_files(chain)
    data = path.read_bytes().rstrip(b"\0")
    whole = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
    path.write_bytes(b"".join(whole[:3]) + whole[3][:30])
    (chain / "journal-000000000005.jsonl").write_bytes(b"".join(whole[4:]))
    code, out, _ = _cli(devenv, "verify", "--dir", str(tmp_path))
    assert code == 1
    assert "w0: TAMPERED at journal-000000000001.jsonl:4: unreadable record" in out
