"""Key-encryption-key versions, their states, and the rules the data plane applies to them.

A key (e.g. ``recordings``) has numbered versions. Exactly one version is *current*: new wraps
use it. Every version is in one :class:`VersionState`; the allowed moves between states live in
:data:`TRANSITIONS`. The data plane reads an immutable :class:`KeySnapshot` (kept fresh by the
catalog adapter) and never touches the store on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import FailedPreconditionError, InvalidWrappedKeyError, NotFoundError

#: AES-GCM with random 96-bit nonces: NIST SP 800-38D allows at most 2^32 encryptions per key.
#: Versions rotate automatically long before: 2^28 wraps keeps the nonce-collision probability
#: below 2^-40.
DEFAULT_ROTATE_AFTER_WRAPS = 2**28
MAX_ROTATE_AFTER_WRAPS = 2**31


class VersionState(StrEnum):
    PENDING = "pending"
    """Internal: number claimed, HSM object being created. Never used for crypto."""
    ENABLED = "enabled"
    """Unwraps; the current version also wraps."""
    DECRYPT_ONLY = "decrypt_only"
    """Retired by an administrator: still unwraps (and rewraps away), never current again."""
    DISABLED = "disabled"
    """Refused for every use until enabled again."""
    SCHEDULED_FOR_DESTRUCTION = "scheduled_for_destruction"
    """Refused; its HSM object is destroyed at ``destroy_after`` unless cancelled."""
    DESTROYING = "destroying"
    """Internal: one replica has claimed the destruction and is destroying the HSM object."""
    DESTROYED = "destroyed"
    """The HSM object is gone: every key wrapped under it is unrecoverable."""


S = VersionState

#: Administrative moves between states. The current version never moves (rotate first).
TRANSITIONS: Mapping[VersionState, frozenset[VersionState]] = {
    S.ENABLED: frozenset({S.DECRYPT_ONLY, S.DISABLED, S.SCHEDULED_FOR_DESTRUCTION}),
    S.DECRYPT_ONLY: frozenset({S.ENABLED, S.DISABLED, S.SCHEDULED_FOR_DESTRUCTION}),
    S.DISABLED: frozenset({S.ENABLED, S.DECRYPT_ONLY, S.SCHEDULED_FOR_DESTRUCTION}),
    S.SCHEDULED_FOR_DESTRUCTION: frozenset({S.DISABLED}),
}

UNWRAPPABLE = frozenset({S.ENABLED, S.DECRYPT_ONLY})


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: int
    state: VersionState
    created_at: float
    destroy_after: float | None = None
    destroyed_at: float | None = None
    wraps: int = 0
    unwraps: int = 0
    last_used_at: float | None = None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key, its policy and its versions (as the store holds them)."""

    name: str
    created_at: float
    current_version: int
    """0 while version 1 is still being created."""
    min_decryption_version: int = 1
    rotation_period: int | None = None
    """Seconds between automatic rotations; None: only on demand and by wrap count."""
    rotate_after_wraps: int = DEFAULT_ROTATE_AFTER_WRAPS
    versions: tuple[VersionInfo, ...] = ()

    def version(self, number: int) -> VersionInfo | None:
        for v in self.versions:
            if v.version == number:
                return v
        return None

    @property
    def current(self) -> VersionInfo | None:
        return self.version(self.current_version) if self.current_version else None


def require_transition(key: KeyInfo, number: int, target: VersionState) -> VersionInfo:
    """The version, if an administrator may move it to ``target``; else a precise refusal."""
    found = key.version(number)
    if found is None or found.state is S.PENDING:
        raise NotFoundError(
            f"key {key.name!r} has no version {number}", reason="key_version_not_found"
        )
    if number == key.current_version:
        raise FailedPreconditionError(
            f"version {number} is the current version of {key.name!r}; rotate the key first",
            reason="key_version_current",
        )
    if found.state is target:
        return found
    if target not in TRANSITIONS.get(found.state, frozenset()):
        raise FailedPreconditionError(
            f"version {number} of {key.name!r} is {found.state.value}; "
            f"it cannot become {target.value}",
            reason="key_version_state",
        )
    return found


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """What the data plane needs to know about keys, frozen at one store generation."""

    generation: int = 0
    keys: Mapping[str, KeyInfo] = field(default_factory=dict)
    index: Mapping[KeyRef, tuple[KeyInfo, VersionInfo]] = field(default_factory=dict)
    """Every version by reference: O(1) lookups whatever the number of versions."""

    @classmethod
    def of(cls, generation: int, keys: Mapping[str, KeyInfo]) -> KeySnapshot:
        index = {KeyRef(k.name, v.version): (k, v) for k in keys.values() for v in k.versions}
        return cls(generation, dict(keys), index)

    def current(self, name: str) -> KeyRef:
        key = self.keys.get(name)
        if key is None or not key.current_version:
            raise NotFoundError(f"no key named {name!r}", reason="key_not_found")
        return KeyRef(name, key.current_version)

    def is_scheduled_for_destruction(self, name: str, version: int) -> bool:
        found = self.index.get(KeyRef(name, version))
        return found is not None and found[1].state is S.SCHEDULED_FOR_DESTRUCTION

    def require_material(self, ref: KeyRef) -> None:
        """Before the HSM is asked: is there key material to authenticate the blob with?

        A version the store does not know reads like any other bad blob (no oracle); a destroyed
        one raises ``key_version_destroyed``, which the broker passes on only for a blob the
        registry shows it issued (``KeyBroker._with_material``): nothing can be authenticated
        with a destroyed version any more.
        """
        found = self.index.get(ref)
        version = found[1] if found is not None else None
        if version is None or version.state is S.PENDING:
            raise InvalidWrappedKeyError
        if version.state in (S.DESTROYING, S.DESTROYED):
            raise FailedPreconditionError("key version destroyed", reason="key_version_destroyed")

    def require_usable(self, ref: KeyRef) -> None:
        """After the blob authenticated: may this version be used to unwrap it?"""
        key, version = self.index[ref]
        state = version.state
        if state in UNWRAPPABLE:
            if ref.version < key.min_decryption_version:
                raise FailedPreconditionError(
                    f"key version {ref.version} is below the minimum decryption version "
                    f"({key.min_decryption_version}) of {ref.name!r}; ask an administrator",
                    reason="key_version_below_minimum",
                )
            return
        if state is S.DISABLED:
            raise FailedPreconditionError(
                "key version disabled: ask an administrator to re-enable it, then rewrap the "
                "key to the current version",
                reason="key_version_disabled",
            )
        if state is S.SCHEDULED_FOR_DESTRUCTION:
            raise FailedPreconditionError(
                "key version scheduled for destruction: ask an administrator to cancel the "
                "destruction, then rewrap the key to the current version",
                reason="key_version_scheduled_for_destruction",
            )
        raise FailedPreconditionError("key version destroyed", reason="key_version_destroyed")
