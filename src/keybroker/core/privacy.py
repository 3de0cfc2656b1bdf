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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeVar

from keybroker.core import policy
from keybroker.core.decision import Decision, IntentRecorder, record_intent
from keybroker.core.identity import Principal
from keybroker.core.ports import Clock
from keybroker.core.wrapped_key import MAX_PURPOSES, KeyRef
from keybroker.errors import FailedPreconditionError, InvalidRequestError, PermissionDeniedError

SCOPE_ERASE = "privacy:erase"
SCOPE_HOLD = "privacy:hold"
SCOPE_AMEND = "privacy:amend"
SCOPE_AUDIT_READ = "audit:read"
MAX_REASON = 1024
_ID = re.compile(r"[^\x00-\x1f\x7f]{1,255}")
_PURPOSE = re.compile(r"[a-z0-9][a-z0-9._:-]{0,63}")  # the wrapped-key format's rule
T = TypeVar("T")


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
    amendment: bool = False
    """A new wrapped key of a recording registered before (AmendPurposes), not a registration."""
    seq: int = 0
    """The registry's number of this wrapped key (entries read back from the store)."""


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

    def store_hold_copy(self, seq: int, wrapped_key: bytes) -> None:
        """Keep the hold copy of the registry's wrapped key number ``seq``."""
        ...

    def held_under(self, key_name: str, version: int | None) -> int:
        """How many wrapped keys under ``key_name`` (``version``, or any) belong to recordings
        under legal hold; for a hold key, how many hold copies it keeps for held recordings."""
        ...

    def claim_shred_unless_held(self, key_name: str, now: float) -> list[int] | None:
        """Claim every live version of an epoch key for destruction (as
        :meth:`KeyStore.claim_shred`), atomically with the check that every held recording under
        it has its hold copy; None (nothing claimed) if one has not."""
        ...

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

    def hold_copies(self, recording_id: str) -> Sequence[bytes]:
        """The wrapped keys moved to the hold key when their epoch key was destroyed (rare
        path: may read the store)."""
        ...

    def issued(self, recording_id: str, wrapped_key: bytes) -> bool:
        """Is ``wrapped_key``, byte for byte, one the registry keeps for the recording (rare path:
        reads the store)? The only way left to tell a genuine blob from a forged one once the
        KEK version that would authenticate it is destroyed."""
        ...

    def require_unregistered(self, recording_id: str) -> None:
        """Raise AlreadyExistsError if the recording id is registered already (in memory)."""
        ...

    def register(self, entry: RecordingEntry) -> None:
        """Add to the registry (buffered: never a synchronous write on the call). A new
        registration (not ``amendment``) of an id already registered raises AlreadyExistsError."""
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
    """Erasure, legal-hold and purpose-amendment use cases (authorization, validation,
    decision annotations, durable intent before each change)."""

    def __init__(
        self,
        store: PrivacyStore,
        view: PrivacyView,
        *,
        clock: Clock,
        mfa_required: bool,
        intent: IntentRecorder | None = None,
    ) -> None:
        self._store = store
        self._view = view
        self._clock = clock
        self._mfa = mfa_required
        self._intent = intent

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
        target = _identifier(target, f"{kind.value} id")
        reason = validate_reason(reason)
        record_intent(self._intent, decision)
        erasure = self._store.erase(
            kind, target, reason=reason, erased_by=principal.subject, now=self._clock()
        )
        decision.reference = erasure.reference
        self._view.erased_locally(erasure)
        return erasure

    def place_hold(
        self, principal: Principal, decision: Decision, kind: Target, target: str, reason: str
    ) -> Hold:
        _annotate(decision, kind, target)
        decision.justification = reason.strip() or None
        self._require_mfa(principal, SCOPE_HOLD, "legal holds")
        hold = Hold(
            kind,
            _identifier(target, f"{kind.value} id"),
            validate_reason(reason),
            principal.subject,
            self._clock(),
        )
        record_intent(self._intent, decision)
        self._store.place_hold(hold)
        return hold

    def release_hold(
        self, principal: Principal, decision: Decision, kind: Target, target: str
    ) -> Hold:
        _annotate(decision, kind, target)
        self._require_mfa(principal, SCOPE_HOLD, "legal holds")
        target = _identifier(target, f"{kind.value} id")
        record_intent(self._intent, decision)
        return self._store.release_hold(kind, target)

    def amend_purposes(
        self,
        principal: Principal,
        decision: Decision,
        *,
        recording_id: str,
        add: Sequence[str],
        remove: Sequence[str],
        reason: str,
        apply: Callable[[], T],
    ) -> T:
        """Authorize a purpose amendment, record the intent, then ``apply`` it (the broker's
        rewrap, see :meth:`keybroker.core.broker.KeyBroker.amend_purposes`).

        Like a hold it needs MFA; every purpose added must be granted by the caller's own token
        (nobody widens a recording's use beyond what they may use themselves); every value
        added or removed must be a well-formed purpose."""
        decision.recording_id = recording_id or None
        decision.justification = reason.strip() or None
        self._require_mfa(principal, SCOPE_AMEND, "purpose amendments")
        validate_reason(reason)
        if not add and not remove:
            raise InvalidRequestError("give purposes to add or remove", reason="bad_purposes")
        validate_purposes(add, "add_purposes")
        validate_purposes(remove, "remove_purposes")
        policy.require_purposes_granted(principal, add)
        decision.purposes_added, decision.purposes_removed = tuple(add), tuple(remove)
        record_intent(self._intent, decision)
        return apply()

    def _require_mfa(self, principal: Principal, scope: str, what: str) -> None:
        policy.require_scope(principal, scope)
        if self._mfa and policy.MFA_METHOD not in principal.amr:
            raise PermissionDeniedError(
                f"{what} need multi-factor authentication (amr must contain 'mfa')",
                reason="mfa_required",
            )

    def recordings_of(
        self, principal: Principal, decision: Decision, subject_id: str
    ) -> list[RecordingEntry]:
        """For a subject access report: the registry's recordings of one subject."""
        _annotate(decision, Target.SUBJECT, subject_id)
        policy.require_scope(principal, SCOPE_AUDIT_READ)
        return self._store.recordings_of(_identifier(subject_id, "subject id"))


def validate_purposes(values: Sequence[str], what: str) -> None:
    """Each value a purpose as the wrapped-key format allows (docs/FORMAT.md), at most
    MAX_PURPOSES of them."""
    if len(values) > MAX_PURPOSES:
        raise InvalidRequestError(
            f"{what} must hold at most {MAX_PURPOSES} entries", reason="bad_purposes"
        )
    for value in values:
        if not _PURPOSE.fullmatch(value):
            raise InvalidRequestError(
                f"each of {what} must be 1..64 characters of a-z, 0-9, '.', '_', ':', '-'",
                reason="bad_purposes",
            )


def _annotate(decision: Decision, kind: Target, target: str) -> None:
    if kind is Target.RECORDING:
        decision.recording_id = target or None
    else:
        decision.subject_ids = (target,) if target else ()
