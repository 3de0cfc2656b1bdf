"""Privacy replay: re-apply erasures, legal holds and purpose withdrawals from the audit journal
to a metadata database that is behind it (restored from a backup). Pure: no I/O.

Every privacy change is journaled before it is applied (an ``intent`` record), then its decision
(``allow``, ``deny`` or ``error``). Replay reads those records (verified by the caller: see
keybroker.adapters.privacy_journal) and makes the database at least as strict as the journal says:

- an **erasure** that was allowed is re-applied as it was (no legal-hold check: the hold, if the
  database has one, was released before the erasure or placed on another target after it);
  one whose outcome is unknown (an intent with no decision, or an ``error``) is re-applied
  unless a legal hold now covers it (the original call would have been refused then);
- a **legal hold** whose last journaled change is a placement (allowed, or of unknown outcome)
  is placed again;
- a **purpose withdrawal** whose last journaled change withdrew it (an allowed AmendPurposes
  removing it and not giving it back, or one of unknown outcome asking to remove it) is stored
  again.

Replay never makes anything less strict: it does not erase a tombstone, release a hold or give a
purpose back, even when the journal shows a release or a restoration after the database's
backup; those are reported (:attr:`ReplayReport.kept`) for an operator to repeat through the
API. Replaying twice changes nothing the second time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from keybroker.core.decision import Decision, Outcome, record_intent
from keybroker.core.privacy import Erasure, Hold, Target
from keybroker.errors import FailedPreconditionError

PRIVACY_SERVICE = "keybroker.v1.Privacy"
REPLAY_SUBJECT = "keybroker:replay"
REPLAYED = "replayed"
CLOCK_SKEW_NS = 2_000_000_000
"""How far the clocks of two processes' journals may disagree (replicas on different hosts)."""
UNCHANGED = "unchanged"
"""Reason of a replay decision that found the change made meanwhile (another replica)."""
OP_ERASURE = "ReplayErasure"
OP_HOLD = "ReplayLegalHold"
OP_WITHDRAWAL = "ReplayPurposeWithdrawal"
_CHANGES = frozenset(
    {"EraseRecording", "EraseSubject", "PlaceLegalHold", "ReleaseLegalHold", "AmendPurposes"}
)


@dataclass(frozen=True, slots=True)
class JournaledDecision:
    """A verified decision record of the journal: where it is, its time (ns) and content."""

    where: str
    ts: int
    decision: Decision


@dataclass(frozen=True, slots=True)
class Change:
    """One privacy change call: its intent and its decision, as far as the journal has them."""

    where: str
    ts: int
    """Time of its first record (ns): the order of changes across chains."""
    decision: Decision
    """The call's decision, or its intent when no decision follows it."""

    @property
    def operation(self) -> str:
        return self.decision.operation

    @property
    def applied(self) -> bool | None:
        """True: allowed; False: refused; None: unknown (intent alone, or an error)."""
        outcome = self.decision.outcome
        if outcome is Outcome.ALLOW:
            return True
        if outcome is Outcome.DENY:
            return False
        return None

    def target(self) -> tuple[Target, str] | None:
        d = self.decision
        if self.operation in ("EraseRecording", "PlaceLegalHold", "ReleaseLegalHold") and (
            d.recording_id
        ):
            return Target.RECORDING, d.recording_id
        if d.subject_ids:
            return Target.SUBJECT, d.subject_ids[0]
        return None


def _call_key(d: Decision) -> tuple[object, ...]:
    return (d.started_ns, d.operation, d.subject, d.token_id, d.recording_id, d.subject_ids)


def changes(records: Iterable[JournaledDecision]) -> list[Change]:
    """Pair each privacy change's intent with its decision; oldest first."""
    calls: dict[tuple[object, ...], Change] = {}
    for rec in records:
        d = rec.decision
        if d.service != PRIVACY_SERVICE or d.operation not in _CHANGES:
            continue
        key = (rec.where.split("/", 1)[0], *_call_key(d))
        earlier = calls.get(key)
        if earlier is None:
            calls[key] = Change(rec.where, rec.ts, d)
        elif d.outcome is not Outcome.INTENT:  # the decision after the intent
            calls[key] = Change(earlier.where, earlier.ts, d)
    return sorted(calls.values(), key=lambda c: (c.ts, c.where))


@dataclass(frozen=True, slots=True)
class ErasureStep:
    kind: Target
    target: str
    reason: str
    by: str
    at: float
    certain: bool
    where: str


@dataclass(frozen=True, slots=True)
class HoldStep:
    hold: Hold
    where: str


@dataclass(frozen=True, slots=True)
class WithdrawalStep:
    recording_id: str
    purpose: str
    reason: str
    by: str
    at: float
    where: str


Step = ErasureStep | HoldStep | WithdrawalStep


@dataclass
class ReplayPlan:
    """What the journal says the database must hold, in journal order."""

    steps: list[tuple[int, Step]] = field(default_factory=list)
    released: dict[tuple[Target, str], int] = field(default_factory=dict)
    """Holds whose last journaled change is an allowed release (time, ns)."""
    restored: dict[tuple[str, str], int] = field(default_factory=dict)
    """Withdrawals whose last journaled change gave the purpose back (time, ns)."""
    notes: list[str] = field(default_factory=list)


def plan(found: Sequence[Change]) -> ReplayPlan:
    out = ReplayPlan()
    erased: set[tuple[Target, str]] = set()
    holds: dict[tuple[Target, str], tuple[int, HoldStep] | None] = {}
    withdrawals: dict[tuple[str, str], tuple[int, WithdrawalStep] | None] = {}
    for change in found:
        d, applied = change.decision, change.applied
        if applied is False:
            continue  # refused: nothing changed
        when = change.ts / 1e9
        by = d.subject or ""
        reason = d.justification or ""
        if change.operation == "AmendPurposes":
            _amendment(out, change, withdrawals)
            continue
        target = change.target()
        if target is None:
            out.notes.append(f"{change.where}: {change.operation} names no target; skipped")
            continue
        if change.operation in ("EraseRecording", "EraseSubject"):
            if target not in erased or applied:
                erased.add(target)
                step = ErasureStep(*target, reason, by, when, bool(applied), change.where)
                out.steps.append((change.ts, step))
        elif change.operation == "PlaceLegalHold":
            holds[target] = (change.ts, HoldStep(Hold(*target, reason, by, when), change.where))
            out.released.pop(target, None)
        elif applied:  # an allowed release; one of unknown outcome keeps the hold (stricter)
            if _outlasts(change, holds.get(target)):
                holds[target] = None
                out.released[target] = change.ts
            else:
                out.notes.append(_too_close(change, f"release of the hold on {target[1]}"))
    out.steps += [item for item in holds.values() if item is not None]
    out.steps += [item for item in withdrawals.values() if item is not None]
    out.steps.sort(key=lambda item: item[0])
    return out


def _amendment(
    out: ReplayPlan,
    change: Change,
    withdrawals: dict[tuple[str, str], tuple[int, WithdrawalStep] | None],
) -> None:
    d = change.decision
    recording = d.recording_id
    if not recording:
        return
    if not d.purposes_removed and not d.purposes_added:
        out.notes.append(
            f"{change.where}: AmendPurposes of {recording} journaled without the purposes it "
            "added and removed (a version before privacy replay); its withdrawals cannot be "
            "re-applied: check the recording's purposes"
        )
        return
    result = set(d.purposes) if change.applied else set()
    for purpose in d.purposes_removed:
        if purpose not in result:
            step = WithdrawalStep(
                recording,
                purpose,
                d.justification or "",
                d.subject or "",
                change.ts / 1e9,
                change.where,
            )
            withdrawals[(recording, purpose)] = (change.ts, step)
            out.restored.pop((recording, purpose), None)
    if change.applied:
        for purpose in d.purposes_added:
            if purpose not in result:
                continue
            if _outlasts(change, withdrawals.get((recording, purpose))):
                withdrawals[(recording, purpose)] = None
                out.restored[(recording, purpose)] = change.ts
            else:
                out.notes.append(_too_close(change, f"{purpose} given back to {recording}"))


def _outlasts(change: Change, stricter: tuple[int, HoldStep | WithdrawalStep] | None) -> bool:
    """Does a release (or a purpose given back) surely come after the placement (withdrawal)
    before it? Within one chain the sequence orders them; across chains (replicas, workers) only
    their clocks do, so they must be further apart than those clocks may disagree."""
    if stricter is None:
        return True
    ts, step = stricter
    same_chain = step.where.split("/", 1)[0] == change.where.split("/", 1)[0]
    return same_chain or change.ts - ts > CLOCK_SKEW_NS


def _too_close(change: Change, what: str) -> str:
    return (
        f"{change.where}: {what} is within {CLOCK_SKEW_NS / 1e9:g} s of the change it undoes, "
        "journaled by another process: their order is unknown, replay keeps the stricter state"
    )


class ReplayStore(Protocol):
    """What replay needs from the privacy store: each method one transaction, idempotent."""

    def restore_erasure(
        self,
        kind: Target,
        target: str,
        *,
        reason: str,
        erased_by: str,
        erased_at: float,
        check_holds: bool,
    ) -> Erasure | None:
        """Record the tombstone unless it exists (None then). With ``check_holds``, raise
        FailedPreconditionError (``legal_hold``) as an erasure call would."""
        ...

    def restore_hold(self, hold: Hold) -> bool:
        """Place the hold unless it is there or its target is erased; True if placed."""
        ...

    def restore_withdrawal(
        self, recording_id: str, purpose: str, *, reason: str, by: str, at: float
    ) -> bool:
        """Store the withdrawal unless it is there; True if stored."""
        ...

    def holds(self) -> list[Hold]: ...

    def purpose_withdrawals(self) -> list[tuple[str, str]]: ...

    def erased_targets(self) -> set[tuple[str, str]]:
        """Every ``(kind, target)`` with a tombstone."""
        ...


@dataclass
class ReplayReport:
    applied: list[str] = field(default_factory=list)
    """What the database lacked and replay re-applied (or, dry run, would)."""
    kept: list[str] = field(default_factory=list)
    """What replay left stricter than the journal, or could not re-apply: for an operator."""

    @property
    def changed(self) -> bool:
        return bool(self.applied)


def replay(
    steps: ReplayPlan,
    store: ReplayStore,
    *,
    record: Callable[[Decision], object] | None,
    dry_run: bool = False,
) -> ReplayReport:
    """Re-apply what the database lacks. Each re-application is journaled through ``record``
    (intent, then an ``allow`` decision of operation ``Replay…``) before and after it."""
    report = ReplayReport(kept=list(steps.notes))
    erased = store.erased_targets()
    held = {(h.kind, h.target) for h in store.holds()}
    withdrawn = set(store.purpose_withdrawals())
    for _ts, step in steps.steps:
        if isinstance(step, ErasureStep):
            if (step.kind.value, step.target) in erased:
                continue
            _erasure(step, store, record, report, dry_run)
            erased.add((step.kind.value, step.target))
        elif isinstance(step, HoldStep):
            key = (step.hold.kind, step.hold.target)
            if key in held or (key[0].value, key[1]) in erased:
                continue
            what = f"legal hold on {key[0].value} {key[1]} ({step.where})"
            decision = _decision(OP_HOLD, key[0], key[1], step.hold.reason)
            if dry_run or _apply(record, decision, partial(store.restore_hold, step.hold)):
                report.applied.append(what)
                held.add(key)
        else:
            pair = (step.recording_id, step.purpose)
            if pair in withdrawn:
                continue
            decision = _decision(OP_WITHDRAWAL, Target.RECORDING, step.recording_id, step.reason)
            decision.purposes_removed = (step.purpose,)
            if dry_run or _apply(
                record,
                decision,
                partial(
                    store.restore_withdrawal,
                    step.recording_id,
                    step.purpose,
                    reason=step.reason,
                    by=step.by,
                    at=step.at,
                ),
            ):
                report.applied.append(
                    f"purpose {step.purpose} withdrawn from recording {step.recording_id} "
                    f"({step.where})"
                )
                withdrawn.add(pair)
    for kind, target in sorted(steps.released.keys() & held):
        report.kept.append(
            f"legal hold on {kind.value} {target} was released after this database's backup; "
            "replay keeps it (release it again if that still holds)"
        )
    for recording, purpose in sorted(steps.restored.keys() & withdrawn):
        report.kept.append(
            f"purpose {purpose} of recording {recording} was given back after this database's "
            "backup; replay keeps it withdrawn (amend again if that still holds)"
        )
    return report


def _erasure(
    step: ErasureStep,
    store: ReplayStore,
    record: Callable[[Decision], object] | None,
    report: ReplayReport,
    dry_run: bool,
) -> None:
    what = f"erasure of {step.kind.value} {step.target} ({step.where})"
    if not step.certain:
        what += ", outcome unknown (intent without decision)"
    if dry_run:
        report.applied.append(what)
        return
    decision = _decision(OP_ERASURE, step.kind, step.target, step.reason)
    record_intent(record, decision)
    try:
        erasure = store.restore_erasure(
            step.kind,
            step.target,
            reason=step.reason,
            erased_by=step.by,
            erased_at=step.at,
            check_holds=not step.certain,
        )
    except FailedPreconditionError:
        report.kept.append(f"{what}: not re-applied, a legal hold covers it now")
        _finish(record, decision, Outcome.DENY, "legal_hold")
        return
    if erasure is None:
        _finish(record, decision, Outcome.DENY, UNCHANGED)
        return
    decision.reference = erasure.reference
    _finish(record, decision, Outcome.ALLOW, REPLAYED)
    report.applied.append(what)


def _decision(operation: str, kind: Target, target: str, reason: str) -> Decision:
    now = time.time_ns()
    return Decision(
        service=PRIVACY_SERVICE,
        operation=operation,
        subject=REPLAY_SUBJECT,
        recording_id=target if kind is Target.RECORDING else None,
        subject_ids=(target,) if kind is Target.SUBJECT else (),
        justification=reason or None,
        started_ns=now,
    )


def _apply(
    record: Callable[[Decision], object] | None, decision: Decision, change: Callable[[], bool]
) -> bool:
    record_intent(record, decision)
    done = change()
    _finish(record, decision, *((Outcome.ALLOW, REPLAYED) if done else (Outcome.DENY, UNCHANGED)))
    return done


def _finish(
    record: Callable[[Decision], object] | None, decision: Decision, outcome: Outcome, reason: str
) -> None:
    if record is None:
        return
    record(dataclasses.replace(decision, outcome=outcome, reason=reason, ended_ns=time.time_ns()))
