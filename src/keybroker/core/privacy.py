"""Privacy controls as key operations: erasure, legal hold, purpose amendment, subject access.

Rules, in the terms a data-protection officer uses (docs/PRIVACY.md):

- **Erasure** of a recording, or of a data subject (every recording bound to them), is a durable
  tombstone. Every unwrap checks the recording id and the bound subject ids of the (authenticated)
  wrapped key against the tombstones in memory, so a wrapped key restored from any backup is
  refused too. Erasing twice returns the first receipt.
- **Legal hold** on a recording or a subject blocks erasure (and retention shredding) until
  released. Conflicts are FAILED_PRECONDITION with a reason saying which.
- Identifiers are the callers' pseudonymous ids; the broker never sees names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from keybroker.core import policy
from keybroker.core.decision import Decision
from keybroker.core.identity import Principal
from keybroker.core.ports import Clock
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import FailedPreconditionError, InvalidRequestError, PermissionDeniedError

SCOPE_ERASE = "privacy:erase"
SCOPE_HOLD = "privacy:hold"
SCOPE_AMEND = "privacy:amend"
SCOPE_AUDIT_READ = "audit:read"
MAX_REASON = 1024
_ID = re.compile(r"[^\x00-\x1f\x7f]{1,255}")


class Target(StrEnum):
    RECORDING = "recording"
    SUBJECT = "subject"


@dataclass(frozen=True, slots=True)
class Erasure:
    """An erasure receipt."""

    seq: int
    kind: Target
    target: str
    reason: str
    erased_by: str
    erased_at: float
    recordings: int
    """Recordings the registry knows this erasure covers (at least 1 for a recording)."""
    already_erased: bool = False

    @property
    def reference(self) -> str:
        """Audit reference: the decision of the erasing call carries it."""
        return f"erasure:{self.seq}"


@dataclass(frozen=True, slots=True)
class Hold:
    kind: Target
    target: str
    reason: str
    placed_by: str
    placed_at: float


@dataclass(frozen=True, slots=True)
class RecordingEntry:
    """What the registry keeps about a recording: pseudonymous identifiers only, no key."""

    recording_id: str
    subject_ids: tuple[str, ...]
    purposes: tuple[str, ...]
    retain_until: float
    key: KeyRef
    created_at: float
    erased_at: float | None = None
    wrapped_key: bytes = field(default=b"", repr=False)
    """Kept so a held recording can be moved to the hold key before its epoch key goes."""


class PrivacyStore(Protocol):
    """Durable privacy state, shared by every replica. Each method is one transaction."""

    def erase(
        self, kind: Target, target: str, *, reason: str, erased_by: str, now: float
    ) -> Erasure:
        """Record the tombstone (or return the existing one). Raises FailedPreconditionError
        with reason ``legal_hold`` if the target, or a recording or subject it covers, is held."""
        ...

    def place_hold(self, hold: Hold) -> None:
        """Raises FailedPreconditionError (``already_held``, ``erased``)."""
        ...

    def release_hold(self, kind: Target, target: str) -> Hold:
        """Raises FailedPreconditionError (``not_held``)."""
        ...

    def recordings_of(self, subject_id: str) -> list[RecordingEntry]: ...

    def held_recordings(self, key_name: str) -> list[RecordingEntry]:
        """Held, not erased recordings under ``key_name`` not yet copied to the hold key."""
        ...

    def store_hold_copy(self, recording_id: str, wrapped_key: bytes) -> None: ...

    def drop_released_hold_copies(self, key_name: str) -> int:
        """Delete the hold copies of recordings under ``key_name`` that are no longer held (or
        erased); returns how many were deleted."""
        ...

    def count_hold_copies(self, key_name: str) -> int:
        """Hold copies still kept for recordings under ``key_name``."""
        ...


class PrivacyView(Protocol):
    """The in-memory privacy state the hot path reads, plus the registry's write buffer."""

    def require_current(self) -> None:
        """Raise UnavailableError if this replica's privacy state is too old to trust."""
        ...

    def is_erased(self, recording_id: str, subject_ids: Sequence[str]) -> bool: ...

    def is_held(self, recording_id: str, subject_ids: Sequence[str]) -> bool:
        """Under legal hold (the recording or one of its subjects)?"""
        ...

    def hold_copy(self, recording_id: str) -> bytes | None:
        """The wrapped key moved to the hold key when its epoch key was destroyed (rare path:
        may read the store)."""
        ...

    def register(self, entry: RecordingEntry) -> None:
        """Add to the registry (buffered: never a synchronous write on the call)."""
        ...

    def erased_locally(self, erasure: Erasure) -> None:
        """This replica refuses at once; then wait (bounded) until every live replica does."""
        ...

    def is_withdrawn(self, recording_id: str, purpose: str) -> bool:
        """Was ``purpose`` withdrawn from this recording (AmendPurposes) and not given back?"""
        ...

    def change_purposes(
        self,
        recording_id: str,
        *,
        withdrawn: Sequence[str],
        restored: Sequence[str],
        reason: str,
        by: str,
    ) -> None:
        """Store the change; this replica applies it at once, then wait (bounded) until every
        replica that may still serve does."""
        ...


def require_not_erased(view: PrivacyView, recording_id: str, subject_ids: Sequence[str]) -> None:
    view.require_current()
    if view.is_erased(recording_id, subject_ids):
        raise FailedPreconditionError("erased", reason="erased")


def _identifier(value: str, what: str) -> str:
    if not _ID.fullmatch(value) or len(value.encode()) > 255:
        raise InvalidRequestError(f"{what} must be 1..255 bytes without control characters")
    return value


def validate_reason(value: str) -> str:
    value = value.strip()
    if not value or len(value) > MAX_REASON:
        raise InvalidRequestError(f"reason is required (1..{MAX_REASON} characters)")
    if any(ord(c) < 0x20 and c not in "\t" for c in value):
        raise InvalidRequestError("reason must not contain control characters")
    return value


class PrivacyService:
    """Erasure and legal-hold use cases (authorization, validation, decision annotations)."""

    def __init__(
        self, store: PrivacyStore, view: PrivacyView, *, clock: Clock, mfa_required: bool
    ) -> None:
        self._store = store
        self._view = view
        self._clock = clock
        self._mfa = mfa_required

    def erase(
        self,
        principal: Principal,
        decision: Decision,
        kind: Target,
        target: str,
        reason: str,
    ) -> Erasure:
        _annotate(decision, kind, target)
        decision.justification = reason.strip() or None
        policy.require_scope(principal, SCOPE_ERASE)
        erasure = self._store.erase(
            kind,
            _identifier(target, f"{kind.value} id"),
            reason=validate_reason(reason),
            erased_by=principal.subject,
            now=self._clock(),
        )
        decision.reference = erasure.reference
        self._view.erased_locally(erasure)
        return erasure

    def place_hold(
        self, principal: Principal, decision: Decision, kind: Target, target: str, reason: str
    ) -> Hold:
        _annotate(decision, kind, target)
        decision.justification = reason.strip() or None
        self._authorize_hold(principal)
        hold = Hold(
            kind,
            _identifier(target, f"{kind.value} id"),
            validate_reason(reason),
            principal.subject,
            self._clock(),
        )
        self._store.place_hold(hold)
        return hold

    def release_hold(
        self, principal: Principal, decision: Decision, kind: Target, target: str
    ) -> Hold:
        _annotate(decision, kind, target)
        self._authorize_hold(principal)
        return self._store.release_hold(kind, _identifier(target, f"{kind.value} id"))

    def _authorize_hold(self, principal: Principal) -> None:
        policy.require_scope(principal, SCOPE_HOLD)
        if self._mfa and policy.MFA_METHOD not in principal.amr:
            raise PermissionDeniedError(
                "legal holds need multi-factor authentication (amr must contain 'mfa')",
                reason="mfa_required",
            )

    def recordings_of(
        self, principal: Principal, decision: Decision, subject_id: str
    ) -> list[RecordingEntry]:
        """For a subject access report: the registry's recordings of one subject."""
        _annotate(decision, Target.SUBJECT, subject_id)
        policy.require_scope(principal, SCOPE_AUDIT_READ)
        return self._store.recordings_of(_identifier(subject_id, "subject id"))


def _annotate(decision: Decision, kind: Target, target: str) -> None:
    if kind is Target.RECORDING:
        decision.recording_id = target or None
    else:
        decision.subject_ids = (target,) if target else ()
