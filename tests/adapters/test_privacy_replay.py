"""Privacy replay's rules (keybroker.core.privacy_replay) on a real journal (keybroker.adapters
.journal, verified by keybroker.adapters.privacy_journal) and a real SQLite store: what is
re-applied, what is never loosened, what an unknown outcome does, and that a journal that fails
verification is refused whatever the defect."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from keybroker.adapters.journal import Journal, JournalConfig
from keybroker.adapters.privacy_journal import _fast, privacy_decisions
from keybroker.adapters.privacystore import SqlPrivacyStore
from keybroker.adapters.sqldb import Database, dialect_for
from keybroker.core import journal as jf
from keybroker.core.decision import Decision, Outcome, record_intent
from keybroker.core.privacy import Hold, Target
from keybroker.core.privacy_replay import (
    OP_ERASURE,
    PRIVACY_SERVICE,
    REPLAY_SUBJECT,
    changes,
    plan,
    replay,
)
from keybroker.errors import FailedPreconditionError

KEY = bytes(range(32))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlPrivacyStore]:
    db = Database(dialect_for(f"sqlite:{tmp_path / 'kb.db'}", base=tmp_path))
    db.migrate()
    s = SqlPrivacyStore(db)
    yield s
    s.close()


class Log:
    """A real journal chain ``w0`` and the privacy calls it records."""

    def __init__(self, root: Path, chain: str = "w0") -> None:
        self.root = root
        self.journal = Journal(
            JournalConfig(root / chain, KEY, Ed25519PrivateKey.generate(), fsync=False)
        )

    def call(
        self,
        operation: str,
        outcome: Outcome | None,
        *,
        recording: str | None = None,
        subject: str | None = None,
        added: tuple[str, ...] = (),
        removed: tuple[str, ...] = (),
        result: tuple[str, ...] = (),
    ) -> None:
        """An intent, then (unless ``outcome`` is None: the broker stopped) the decision."""
        d = Decision(
            service=PRIVACY_SERVICE,
            operation=operation,
            subject="dpo-1",
            token_id=os.urandom(4).hex(),
            recording_id=recording,
            subject_ids=(subject,) if subject else (),
            justification=f"why {operation}",
            purposes_added=added,
            purposes_removed=removed,
            started_ns=time.time_ns(),
        )
        record_intent(self.journal.record, d)
        if outcome is not None:
            self.journal.record(
                dataclasses.replace(d, outcome=outcome, reason="ok", purposes=result)
            )

    def replay(self, store: SqlPrivacyStore, *, dry_run: bool = False) -> list[str]:
        found = changes(privacy_decisions(self.root, KEY))
        return replay(plan(found), store, record=self.journal.record, dry_run=dry_run).applied


ALLOW, DENY, ERROR = Outcome.ALLOW, Outcome.DENY, Outcome.ERROR


def test_allowed_erasures_are_reapplied_even_where_a_hold_now_is(
    tmp_path: Path, store: SqlPrivacyStore
) -> None:
    log = Log(tmp_path)
    log.call("EraseRecording", ALLOW, recording="rec-1")
    log.call("EraseSubject", ALLOW, subject="subj-1")
    log.call("EraseRecording", DENY, recording="rec-refused")
    store.place_hold(Hold(Target.RECORDING, "rec-1", "restored from the backup", "x", 1.0))
    applied = log.replay(store)
    assert len(applied) == 2
    assert store.erased_targets() == {("recording", "rec-1"), ("subject", "subj-1")}
    assert log.replay(store) == []  # idempotent


def test_an_erasure_of_unknown_outcome_is_reapplied_unless_held(
    tmp_path: Path, store: SqlPrivacyStore
) -> None:
    log = Log(tmp_path)
    log.call("EraseRecording", None, recording="rec-crash")  # intent, then the broker stopped
    log.call("EraseRecording", ERROR, recording="rec-error")
    log.call("EraseRecording", None, recording="rec-held")
    store.place_hold(Hold(Target.RECORDING, "rec-held", "case", "x", 1.0))
    log.replay(store)
    assert store.erased_targets() == {("recording", "rec-crash"), ("recording", "rec-error")}
    with pytest.raises(FailedPreconditionError):  # and the hold is untouched
        store.erase(Target.RECORDING, "rec-held", reason="r", erased_by="x", now=1.0)


def test_holds_come_back_and_releases_are_never_replayed(
    tmp_path: Path, store: SqlPrivacyStore
) -> None:
    log = Log(tmp_path)
    log.call("PlaceLegalHold", ALLOW, recording="rec-1")
    log.call("PlaceLegalHold", ALLOW, subject="subj-1")
    log.call("ReleaseLegalHold", ALLOW, subject="subj-1")  # released later: not re-placed
    log.call("PlaceLegalHold", ALLOW, recording="rec-2")
    log.call("ReleaseLegalHold", None, recording="rec-2")  # release of unknown outcome: kept
    log.call("PlaceLegalHold", DENY, recording="rec-3")
    store.place_hold(Hold(Target.RECORDING, "rec-4", "in the backup", "x", 1.0))
    log.call("ReleaseLegalHold", ALLOW, recording="rec-4")  # released after the backup
    found = changes(privacy_decisions(tmp_path, KEY))
    report = replay(plan(found), store, record=None)
    assert {(h.kind.value, h.target) for h in store.holds()} == {
        ("recording", "rec-1"),
        ("recording", "rec-2"),
        ("recording", "rec-4"),  # replay never releases: an operator does (report.kept)
    }
    assert any("rec-4" in line and "released" in line for line in report.kept)


def test_withdrawals_come_back_and_restorations_are_never_replayed(
    tmp_path: Path, store: SqlPrivacyStore
) -> None:
    log = Log(tmp_path)
    log.call("AmendPurposes", ALLOW, recording="rec-1", removed=("qa",), result=("support",))
    log.call("AmendPurposes", ALLOW, recording="rec-2", removed=("qa",), result=("support",))
    log.call("AmendPurposes", ALLOW, recording="rec-2", added=("qa",), result=("qa", "support"))
    log.call("AmendPurposes", None, recording="rec-3", removed=("a", "b"), added=("c",))
    log.call("AmendPurposes", DENY, recording="rec-4", removed=("qa",))
    # removed through an old copy that still lists it: it stays in the result, no withdrawal
    log.call("AmendPurposes", ALLOW, recording="rec-5", removed=("qa",), result=("qa",))
    store.change_purposes("rec-6", withdrawn=["qa"], restored=[], reason="backup", by="x", now=1)
    log.call("AmendPurposes", ALLOW, recording="rec-6", added=("qa",), result=("qa",))
    found = changes(privacy_decisions(tmp_path, KEY))
    report = replay(plan(found), store, record=None)
    assert sorted(store.purpose_withdrawals()) == [
        ("rec-1", "qa"),
        ("rec-3", "a"),
        ("rec-3", "b"),
        ("rec-6", "qa"),
    ]
    assert any("rec-6" in line for line in report.kept)


def test_amendments_journaled_without_their_purposes_are_reported(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.call("AmendPurposes", ALLOW, recording="rec-old", result=("support",))
    found = changes(privacy_decisions(tmp_path, KEY))
    assert any("rec-old" in note for note in plan(found).notes)


def test_every_chain_is_read_and_the_replay_is_journaled(
    tmp_path: Path, store: SqlPrivacyStore
) -> None:
    w0, w1 = Log(tmp_path, "w0"), Log(tmp_path, "w1")
    w0.call("EraseRecording", ALLOW, recording="rec-0")
    w1.call("EraseRecording", ALLOW, recording="rec-1")
    assert len(w0.replay(store, dry_run=True)) == 2
    assert store.erased_targets() == set()  # a dry run changes nothing
    w0.replay(store)
    assert store.erased_targets() == {("recording", "rec-0"), ("recording", "rec-1")}
    w0.journal.close()
    replays = [
        r.decision for r in privacy_decisions(tmp_path, KEY) if r.decision.subject == REPLAY_SUBJECT
    ]
    assert [(d.operation, d.outcome) for d in replays] == [
        (OP_ERASURE, Outcome.INTENT),
        (OP_ERASURE, Outcome.ALLOW),
    ] * 2
    assert all(d.reference and d.reference.startswith("erasure:") for d in replays[1::2])


def test_across_chains_a_release_too_close_to_its_placement_keeps_the_hold(
    tmp_path: Path, store: SqlPrivacyStore
) -> None:
    """Two replicas' records are ordered by their clocks only: a release journaled by another
    process within the clock margin of the placement may have come first. The hold stays; in
    one chain, the sequence orders them and the release counts."""
    w0, w1 = Log(tmp_path, "w0"), Log(tmp_path, "w1")
    w0.call("PlaceLegalHold", ALLOW, recording="rec-1")
    w1.call("ReleaseLegalHold", ALLOW, recording="rec-1")
    w0.call("PlaceLegalHold", ALLOW, recording="rec-2")
    w0.call("ReleaseLegalHold", ALLOW, recording="rec-2")
    w0.call("AmendPurposes", ALLOW, recording="rec-3", removed=("qa",), result=("support",))
    w1.call("AmendPurposes", ALLOW, recording="rec-3", added=("qa",), result=("qa", "support"))
    found = changes(privacy_decisions(tmp_path, KEY))
    steps = plan(found)
    assert len([n for n in steps.notes if "order is unknown" in n]) == 2
    replay(steps, store, record=None)
    assert [(h.kind.value, h.target) for h in store.holds()] == [("recording", "rec-1")]
    assert store.purpose_withdrawals() == [("rec-3", "qa")]


def _lines(root: Path) -> tuple[Path, list[bytes]]:
    path = sorted((root / "w0").glob("journal-*.jsonl"))[0]
    return path, path.read_bytes().rstrip(b"\0").splitlines(keepends=True)


@pytest.mark.parametrize("defect", ["remove", "reorder", "modify", "forge", "chain"])
def test_a_journal_that_fails_verification_is_refused(tmp_path: Path, defect: str) -> None:
    log = Log(tmp_path)
    log.call("PlaceLegalHold", ALLOW, recording="rec-1")
    log.call("EraseRecording", ALLOW, recording="rec-2")
    log.journal.close()
    path, lines = _lines(tmp_path)
    erase = next(i for i, line in enumerate(lines) if b"EraseRecording" in line)
    if defect == "chain":  # a whole worker's chain removed
        Log(tmp_path, "w1").journal.close()
        shutil.rmtree(tmp_path / "w1")
    elif defect == "remove":
        del lines[erase]
    elif defect == "reorder":
        lines[erase - 1], lines[erase] = lines[erase], lines[erase - 1]
    elif defect == "modify":
        lines[erase] = lines[erase].replace(b"rec-2", b"rec-3")
    else:  # a record made with another key, linked in properly
        other = Decision(service=PRIVACY_SERVICE, operation="ReleaseLegalHold", outcome=ALLOW)
        body = jf.parse_line(lines[erase])
        _mac, line = jf.decision_line(
            os.urandom(32), seq=body["seq"], ts=body["ts"], prev=body["prev"], decision=other
        )
        lines[erase] = line
    path.write_bytes(b"".join(lines))
    with pytest.raises(jf.ChainError):
        list(privacy_decisions(tmp_path, KEY))


def test_an_archived_start_and_a_torn_tail_are_accepted(tmp_path: Path) -> None:
    log = Log(tmp_path)
    for i in range(3):
        log.call("EraseRecording", ALLOW, recording=f"rec-{i}")
    log.journal.close()
    path, lines = _lines(tmp_path)
    path.write_bytes(b"".join(lines[2:]) + lines[-1][:40])  # two records archived; a torn write
    found = [r.decision.recording_id for r in privacy_decisions(tmp_path, KEY)]
    assert found == ["rec-1", "rec-1", "rec-2", "rec-2"]


text = st.text(max_size=30)


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        Decision,
        service=text,
        operation=text,
        outcome=st.sampled_from(list(Outcome)),
        reason=text,
        subject=st.none() | text,
        recording_id=st.none() | text,
        purposes=st.lists(text, max_size=3).map(tuple),
        purposes_removed=st.lists(text, max_size=3).map(tuple),
        justification=st.none() | text,
        trace_context=st.dictionaries(text, text, max_size=2),
        aggregated=st.dictionaries(text, st.integers(0, 9), max_size=2),
    ),
    st.integers(1, 2**40),
)
def test_the_fast_check_accepts_every_record_the_journal_writes(d: Decision, seq: int) -> None:
    prev = os.urandom(32).hex()
    mac, line = jf.decision_line(KEY, seq=seq, ts=7, prev=prev, decision=d)
    assert _fast(KEY, line) == (seq, prev, mac)
    checkpoint = jf.checkpoint_record(KEY, lambda m: b"s" * 64, seq=seq, ts=7, prev=prev)
    assert _fast(KEY, checkpoint.line()) == (seq, prev, checkpoint.mac)
    assert _fast(os.urandom(32), line) is None


def test_what_was_verified_is_not_read_again(tmp_path: Path) -> None:
    """privacy-replay.json: the next replay verifies only what follows the last verified record,
    keeps the privacy records of files archived since, and is ignored when it was tampered
    with (the chains are then read in full)."""
    log = Log(tmp_path)
    log.call("EraseRecording", ALLOW, recording="rec-1")
    assert [r.decision.recording_id for r in privacy_decisions(tmp_path, KEY)] == ["rec-1"] * 2
    log.call("EraseRecording", ALLOW, recording="rec-2")
    log.journal.close()
    path, lines = _lines(tmp_path)
    first = next(i for i, line in enumerate(lines) if b"rec-1" in line)
    damaged = [*lines]
    damaged[first] = damaged[first].replace(b"rec-1", b"rec-9")  # before the verified point
    path.write_bytes(b"".join(damaged))
    found = [r.decision.recording_id for r in privacy_decisions(tmp_path, KEY)]
    assert found == ["rec-1", "rec-1", "rec-2", "rec-2"]  # what was verified, then the rest
    state = tmp_path / "privacy-replay.json"
    assert state.stat().st_mode & 0o777 == 0o600
    saved = state.read_bytes()
    state.write_bytes(saved.replace(b"rec-1", b"rec-8"))  # its MAC no longer matches
    with pytest.raises(jf.ChainError):  # read in full: the damaged record is found
        privacy_decisions(tmp_path, KEY)
    path.write_bytes(b"".join(lines))
    state.write_bytes(saved)
    path.unlink()  # the file archived away: its privacy records are still known
    assert [r.decision.recording_id for r in privacy_decisions(tmp_path, KEY)] == found


def test_a_verified_point_that_changed_is_not_trusted(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.call("EraseRecording", ALLOW, recording="rec-1")
    privacy_decisions(tmp_path, KEY)
    log.journal.close()
    path, lines = _lines(tmp_path)
    last = next(i for i, line in enumerate(lines) if b"rec-1" in line) + 1  # the decision
    lines[last] = lines[last].replace(b'"allow"', b'"deny!"')
    path.write_bytes(b"".join(lines))
    with pytest.raises(jf.ChainError):
        privacy_decisions(tmp_path, KEY)
