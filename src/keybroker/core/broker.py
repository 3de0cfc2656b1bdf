"""Data-plane use cases: generate, unwrap and rewrap per-recording data keys.

Pure: the HSM is behind :class:`~keybroker.core.ports.KeyEncryptionKeys`, time behind a clock. The
caller (the gRPC servicer) has already authenticated the token and checked the TLS peer; these
methods apply the scope, purpose and binding rules and annotate the call's :class:`Decision`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from keybroker.core import policy
from keybroker.core.decision import Decision
from keybroker.core.epochs import EpochKeyBudget, EpochScheme
from keybroker.core.identity import Principal
from keybroker.core.keys import KeySnapshot, VersionState
from keybroker.core.ports import Clock, KeyCatalog, KeyEncryptionKeys
from keybroker.core.privacy import (
    SCOPE_AMEND,
    PrivacyView,
    RecordingEntry,
    require_not_erased,
    validate_reason,
)
from keybroker.core.wrapped_key import (
    DATA_KEY_SIZE,
    Bindings,
    KeyRef,
    WrappedKey,
    validate_key_name,
)
from keybroker.errors import (
    FailedPreconditionError,
    InvalidRequestError,
    InvalidWrappedKeyError,
    KeyStateStaleError,
    NotFoundError,
    PermissionDeniedError,
    RetentionExpiredError,
)

#: Most items one RewrapDataKeys call may carry (the request must also fit
#: ``[server] max_message_bytes``).
MAX_REWRAP_BATCH = 256


def _loaded(snapshot: KeySnapshot, ref: KeyRef) -> bool:
    """Does ``snapshot`` know ``ref`` past its creation? (PENDING: a rotation still under way
    when it was read; a blob under it can only come from a newer state.)"""
    found = snapshot.index.get(ref)
    return found is not None and found[1].state is not VersionState.PENDING


class SecretBytes:
    """Plaintext key material. Its repr and str never show the bytes."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"<SecretBytes: {len(self._value)} bytes>"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    recording_id: str
    purposes: Sequence[str]
    subject_ids: Sequence[str]
    retain_until: int | None
    """Unix seconds; None means now + the default retention."""
    key_name: str
    context: Mapping[str, str]


def _entry(
    bindings: Bindings, key: KeyRef, now: float, wrapped: bytes, *, amendment: bool = False
) -> RecordingEntry:
    """The registry entry of a wrapped key the broker hands out (kept for holds and erasure)."""
    return RecordingEntry(
        bindings.recording_id,
        bindings.subject_ids,
        bindings.purposes,
        bindings.retain_until,
        key,
        now,
        wrapped_key=wrapped,
        amendment=amendment,
    )


class _KeyResult:
    """A use case's result: it carries a data key or a wrapped key, so its repr names only the
    key version (tests/core/test_wrapped_key.py checks each of them)."""

    __slots__ = ()
    key: KeyRef

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key})"


@dataclass(frozen=True, slots=True, repr=False)
class GeneratedKey(_KeyResult):
    data_key: SecretBytes
    wrapped_key: bytes
    key: KeyRef


@dataclass(frozen=True, slots=True, repr=False)
class UnwrappedKey(_KeyResult):
    data_key: SecretBytes
    key: KeyRef


@dataclass(frozen=True, slots=True, repr=False)
class RewrappedKey(_KeyResult):
    wrapped_key: bytes
    key: KeyRef


class KeyBroker:
    """The data-plane rules, independent of transport and HSM library."""

    def __init__(
        self,
        keks: KeyEncryptionKeys,
        catalog: KeyCatalog,
        *,
        clock: Clock,
        default_key: str,
        default_retention_seconds: int,
        privacy: PrivacyView | None = None,
        epochs: EpochScheme | None = None,
        ensure_key: Callable[[str], None] | None = None,
        max_retention_seconds: int | None = None,
        epoch_key_budget: EpochKeyBudget | None = None,
    ) -> None:
        """``epochs``: wrap under retention-epoch keys of the requested key, made on first use
        by ``ensure_key(name)`` (see :mod:`keybroker.core.retention`), at most as often as
        ``epoch_key_budget`` allows. ``max_retention_seconds``: the furthest ``retain_until``
        may lie ahead."""
        self._privacy = privacy
        self._epochs = epochs
        self._ensure_key = ensure_key
        self._max_retention = max_retention_seconds
        self._epoch_budget = epoch_key_budget or EpochKeyBudget(clock=clock)
        self._keks = keks
        self._catalog = catalog
        self._clock = clock
        self._default_key = validate_key_name(default_key)
        self._default_retention = default_retention_seconds

    def generate(
        self, principal: Principal, request: GenerateRequest, decision: Decision
    ) -> GeneratedKey:
        """A fresh data key wrapped under the current version of the requested key."""
        decision.recording_id = request.recording_id
        decision.purposes = tuple(request.purposes)
        policy.require_scope(principal, policy.SCOPE_GENERATE)
        now = self._clock()
        retain_until = request.retain_until
        if retain_until is None:
            retain_until = int(now) + self._default_retention
        elif retain_until <= now:
            raise InvalidRequestError(
                "retain_until must be in the future", reason="bad_retain_until"
            )
        if self._max_retention is not None and retain_until > now + self._max_retention:
            raise InvalidRequestError(
                f"retain_until must be at most {self._max_retention // 86400} days ahead "
                "([keys] max_retention)",
                reason="bad_retain_until",
            )
        bindings = Bindings.create(
            recording_id=request.recording_id,
            purposes=request.purposes,
            subject_ids=request.subject_ids,
            retain_until=retain_until,
            context=request.context,
        )
        decision.subject_ids = bindings.subject_ids
        policy.require_purposes_granted(principal, bindings.purposes)
        if self._privacy is not None:
            require_not_erased(self._privacy, bindings.recording_id, bindings.subject_ids)
        name = validate_key_name(request.key_name) if request.key_name else self._default_key
        key = self._current_for(name, retain_until)
        decision.key_name = key.name
        decision.key_version = key.version
        data_key = self._keks.random(DATA_KEY_SIZE)
        wrapped = self._wrap(key, bindings, data_key)
        self._catalog.count(key, wraps=1)  # every encryption under the version counts
        if self._privacy is not None:  # claims the id (AlreadyExistsError if registered)
            self._privacy.register(_entry(bindings, key, now, wrapped))
        return GeneratedKey(SecretBytes(data_key), wrapped, key)

    def _current_for(self, name: str, retain_until: float) -> KeyRef:
        """The key version new wraps use: ``name``'s, or its retention epoch key's."""
        snapshot = self._catalog.snapshot()
        known = snapshot.keys.get(name)
        # Made a moment ago elsewhere, or read between CreateKey's two commits (the key without
        # a current version yet)? Decide on fresh state.
        if known is None or not known.current_version:
            snapshot = self._catalog.fresh_snapshot()
        snapshot.current(name)  # the requested key must exist either way
        if self._epochs is None:
            return snapshot.current(name)
        epoch_key = validate_key_name(self._epochs.key_for(name, retain_until))
        try:
            return snapshot.current(epoch_key)
        except NotFoundError:
            if self._ensure_key is None:
                raise
        self._epoch_budget.take(epoch_key)
        self._ensure_key(epoch_key)
        return self._catalog.snapshot().current(epoch_key)

    def unwrap(
        self,
        principal: Principal,
        *,
        recording_id: str,
        wrapped_key: bytes,
        purpose: str,
        context: Mapping[str, str],
        decision: Decision,
    ) -> UnwrappedKey:
        """The data key, if the token grants the purpose and every binding holds."""
        decision.recording_id = recording_id or None
        decision.purposes = (purpose,) if purpose else ()
        policy.require_scope(principal, policy.SCOPE_UNWRAP)
        if not purpose:
            raise InvalidRequestError("purpose is required", reason="bad_purposes")
        parsed, data_key = self._open(wrapped_key, decision)
        policy.require_recording(parsed.bindings, recording_id)
        self._require_not_erased(parsed.bindings)
        policy.require_purposes_granted(principal, (purpose,))
        policy.require_purpose_bound(parsed.bindings, purpose)
        if self._privacy is not None and self._privacy.is_withdrawn(recording_id, purpose):
            raise PermissionDeniedError(
                "purpose withdrawn for this recording", reason="purpose_withdrawn"
            )
        policy.require_context(parsed.bindings, context)
        try:
            policy.require_retention(parsed.bindings, self._clock())
        except RetentionExpiredError:
            bound = parsed.bindings
            if self._privacy is None or not self._privacy.is_held(
                bound.recording_id, bound.subject_ids
            ):
                raise
            decision.reference = "legal_hold"  # past retention, kept by a legal hold
        self._catalog.count(parsed.key, unwraps=1)
        return UnwrappedKey(SecretBytes(data_key), parsed.key)

    def rewrap(
        self, principal: Principal, *, recording_id: str, wrapped_key: bytes, decision: Decision
    ) -> RewrappedKey:
        """The same data key under the key's current version, every binding kept."""
        decision.recording_id = recording_id or None
        policy.require_scope(principal, policy.SCOPE_REWRAP)
        return self.rewrap_item(
            recording_id=recording_id, wrapped_key=wrapped_key, decision=decision
        )

    def authorize_rewrap_batch(self, principal: Principal, size: int) -> None:
        """Checks made once for a RewrapDataKeys call, before any item."""
        policy.require_scope(principal, policy.SCOPE_REWRAP)
        if not 1 <= size <= MAX_REWRAP_BATCH:
            raise InvalidRequestError(
                f"a batch holds 1..{MAX_REWRAP_BATCH} items", reason="bad_batch_size"
            )

    def rewrap_item(
        self, *, recording_id: str, wrapped_key: bytes, decision: Decision
    ) -> RewrappedKey:
        """One rewrap, once the caller is authorized (:meth:`authorize_rewrap_batch`)."""
        decision.recording_id = recording_id or None
        parsed, data_key = self._open(wrapped_key, decision)
        policy.require_recording(parsed.bindings, recording_id)
        self._require_not_erased(parsed.bindings)
        policy.require_retention(parsed.bindings, self._clock())
        current = self._catalog.snapshot().current(parsed.key.name)
        wrapped = self._wrap(current, parsed.bindings, data_key, parsed.parsed_bindings)
        self._catalog.count(parsed.key, unwraps=1)
        self._catalog.count(current, wraps=1)
        decision.key_version = current.version
        return RewrappedKey(wrapped, current)

    def amend_purposes(
        self,
        principal: Principal,
        *,
        recording_id: str,
        wrapped_key: bytes,
        add: Sequence[str],
        remove: Sequence[str],
        reason: str,
        decision: Decision,
    ) -> RewrappedKey:
        """The same data key with purposes added or removed (new consent, new lawful basis),
        under the key's current version; who and why are in the decision."""
        decision.recording_id = recording_id or None
        decision.justification = reason.strip() or None
        policy.require_scope(principal, SCOPE_AMEND)
        validate_reason(reason)
        if not add and not remove:
            raise InvalidRequestError("give purposes to add or remove", reason="bad_purposes")
        parsed, data_key = self._open(wrapped_key, decision)
        policy.require_recording(parsed.bindings, recording_id)
        self._require_not_erased(parsed.bindings)
        policy.require_retention(parsed.bindings, self._clock())
        bound = parsed.bindings
        purposes = [p for p in bound.purposes if p not in set(remove)]
        purposes += [p for p in add if p not in purposes]
        if not purposes:
            raise InvalidRequestError(
                "a recording keeps at least one purpose; erase it instead", reason="bad_purposes"
            )
        bindings = Bindings.create(
            recording_id=bound.recording_id,
            purposes=purposes,
            subject_ids=bound.subject_ids,
            retain_until=bound.retain_until,
            context=bound.context_map,
        )
        decision.purposes = bindings.purposes
        current = self._catalog.snapshot().current(parsed.key.name)
        wrapped = self._wrap(current, bindings, data_key)
        self._catalog.count(parsed.key, unwraps=1)
        self._catalog.count(current, wraps=1)
        decision.key_version = current.version
        if self._privacy is not None:
            self._privacy.change_purposes(
                bindings.recording_id,
                # what the caller asked for, whatever the blob in hand carries: adding a
                # purpose back through an old copy that still lists it lifts its withdrawal too
                withdrawn=[p for p in remove if p not in bindings.purposes],
                restored=[p for p in add if p in bindings.purposes],
                reason=decision.justification or "",
                by=principal.subject,
            )
            self._privacy.register(
                _entry(bindings, current, self._clock(), wrapped, amendment=True)
            )
        return RewrappedKey(wrapped, current)

    def _hold_copy(self, parsed: WrappedKey) -> WrappedKey | None:
        """The copy under the hold key of a wrapped key whose epoch key is destroyed, if its
        recording was under legal hold then. It must carry exactly the same bindings."""
        if self._privacy is None:
            return None
        bound = parsed.bindings.encode()
        for raw in self._privacy.hold_copies(parsed.bindings.recording_id):
            held = WrappedKey.parse(raw)
            if held.bindings.encode() == bound:
                return held
        return None

    def move_to_hold(self, wrapped_key: bytes, hold_key_name: str) -> bytes:
        """Rewrap a registry copy to the hold key (retention shredding; no caller involved)."""
        parsed = WrappedKey.parse(wrapped_key)
        data_key = self._keks.decrypt(parsed.key, parsed.nonce, parsed.ciphertext, parsed.aad)
        current = self._catalog.snapshot().current(hold_key_name)
        wrapped = self._wrap(current, parsed.bindings, data_key)
        self._catalog.count(parsed.key, unwraps=1)
        self._catalog.count(current, wraps=1)
        return wrapped

    def _require_not_erased(self, bindings: Bindings) -> None:
        if self._privacy is not None:
            require_not_erased(self._privacy, bindings.recording_id, bindings.subject_ids)

    def _open(self, wrapped_key: bytes, decision: Decision) -> tuple[WrappedKey, bytes]:
        """Parse and authenticate a wrapped key before any of its bindings is trusted.

        Authenticating first means every defect of a blob, whichever byte it touches, ends in the
        same InvalidWrappedKeyError: the error is no oracle. The KEK version's state is checked
        around it: an unknown version is just a bad blob; a destroyed one cannot be tried; a
        disabled one (or one below the key's minimum) is refused only once the blob is genuine.

        "Unknown" is decided on fresh state only: a version this replica has not loaded (made a
        moment ago by another replica or worker), or one the HSM has no object for, first makes
        the catalog reload (:meth:`KeyCatalog.fresh_snapshot`); if it cannot, the answer is
        KeyStateStaleError (UNAVAILABLE, retryable), never "invalid".
        """
        parsed = WrappedKey.parse(wrapped_key)
        decision.key_name = parsed.key.name
        decision.key_version = parsed.key.version
        snapshot = self._catalog.snapshot()
        if not _loaded(snapshot, parsed.key):
            snapshot = self._catalog.fresh_snapshot()
        parsed = self._with_material(snapshot, parsed, wrapped_key, decision)
        try:
            data_key = self._keks.decrypt(parsed.key, parsed.nonce, parsed.ciphertext, parsed.aad)
        except KeyStateStaleError:
            # The catalog let the version through but the HSM has no object for it: one of the
            # two is behind. Reload; a version destroyed meanwhile is now said to be destroyed.
            snapshot = self._catalog.fresh_snapshot()
            parsed = self._with_material(snapshot, parsed, wrapped_key, decision)
            data_key = self._keks.decrypt(parsed.key, parsed.nonce, parsed.ciphertext, parsed.aad)
        decision.subject_ids = parsed.bindings.subject_ids  # trusted only once authenticated
        snapshot.require_usable(parsed.key)
        return parsed, data_key

    def _with_material(
        self, snapshot: KeySnapshot, parsed: WrappedKey, wrapped_key: bytes, decision: Decision
    ) -> WrappedKey:
        """``parsed``, or its legal-hold copy when its own version is destroyed.

        A blob under a destroyed version can no longer be authenticated by the HSM. It is told
        genuine only if the registry keeps it byte for byte (the broker issued it): then the
        caller learns the version is destroyed, or gets the recording's legal-hold copy. Any
        other blob naming a destroyed version reads like one naming an unknown version
        (InvalidWrappedKeyError): no oracle for which versions existed, and no hold copy for a
        blob forged from a held recording's (public) bindings.
        """
        try:
            snapshot.require_material(parsed.key)
        except FailedPreconditionError as exc:
            if exc.reason != "key_version_destroyed":
                raise
            if not self._issued(parsed.bindings.recording_id, wrapped_key):
                raise InvalidWrappedKeyError from None
            held = self._hold_copy(parsed)
            if held is None:
                raise
            decision.key_name, decision.key_version = held.key.name, held.key.version
            snapshot.require_material(held.key)
            return held
        return parsed

    def _issued(self, recording_id: str, wrapped_key: bytes) -> bool:
        return self._privacy is not None and self._privacy.issued(recording_id, wrapped_key)

    def _wrap(
        self, key: KeyRef, bindings: Bindings, data_key: bytes, encoded: bytes = b""
    ) -> bytes:
        """A wrapped key in the current format (v2): the AAD is fixed first, the HSM's
        encryption gives the nonce it used, and the blob is built from both. ``encoded``: the
        bindings' encoding, when known (a parsed key's)."""
        aad = WrappedKey.aad_v2(key, bindings, encoded)
        nonce, ciphertext = self._keks.encrypt(key, data_key, aad)
        return WrappedKey.join_v2(aad, nonce, ciphertext)
