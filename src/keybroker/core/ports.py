"""Ports: what the core needs from the outside world, as small Protocols."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from keybroker.core.decision import Decision
from keybroker.core.keys import KeyInfo, KeySnapshot, VersionState
from keybroker.core.wrapped_key import KeyRef

#: Returns the current time as Unix seconds. Passed in so tests can pin it.
Clock = Callable[[], float]


class KeyEncryptionKeys(Protocol):
    """Key-encryption keys held in an HSM. Plaintext KEK material never crosses this port."""

    def current(self, name: str) -> KeyRef:
        """The version of ``name`` used for new wraps. Raises NotFoundError if there is none."""
        ...

    def random(self, size: int) -> bytes:
        """``size`` random bytes from the HSM's generator."""
        ...

    def encrypt(self, key: KeyRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM inside the HSM under a fresh 96-bit nonce; returns the nonce actually
        used and ciphertext || 16-byte tag. Who draws the nonce (the broker, from the HSM's
        generator, or the HSM itself) is the adapter's business: the result is what counts."""
        ...

    def decrypt(self, key: KeyRef, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`encrypt`.

        Raises InvalidWrappedKeyError when authentication fails, KeyStateStaleError when the
        HSM holds no object for the version (not there yet, or destroyed meanwhile), and
        HsmUnavailableError when the HSM cannot be used.
        """
        ...


class DecisionRecorder(Protocol):
    """Records every decision (allow or deny)."""

    def record(self, decision: Decision) -> object:
        """Record it; a durable recorder raises UnavailableError if it cannot."""
        ...


class DurableRecorder(DecisionRecorder, Protocol):
    """A recorder whose records are durable when it returns (the audit journal)."""

    def record_many(self, decisions: Sequence[Decision]) -> object:
        """Record several decisions with one flush."""
        ...


@dataclass(frozen=True, slots=True)
class Usage:
    """Uses of one key version since the last flush to the store."""

    wraps: int = 0
    unwraps: int = 0
    last_used_at: float = 0.0


class KeyCatalog(Protocol):
    """The data plane's view of key metadata: an in-memory snapshot, plus usage counting."""

    def snapshot(self) -> KeySnapshot: ...

    def fresh_snapshot(self) -> KeySnapshot:
        """A snapshot read after this call began, for a blob naming a version :meth:`snapshot`
        does not know. Rate-limited; raises KeyStateStaleError (retryable) when it cannot."""
        ...

    def count(self, key: KeyRef, *, wraps: int = 0, unwraps: int = 0) -> None:
        """Count uses in memory; flushed to the store in aggregate, never per call."""
        ...


class KekAdministration(Protocol):
    """Creating and destroying KEK versions in the HSM."""

    def create_version(self, key: KeyRef) -> bool:
        """Create the HSM object; False if one with this label already exists."""
        ...

    def destroy_version(self, key: KeyRef) -> bool:
        """Destroy the HSM object (and in-process copies); False if there was none."""
        ...

    def versions_on_token(self) -> set[KeyRef]:
        """Versions whose HSM object passes the adoption checks (others are never used)."""
        ...

    def self_test(self, key: KeyRef) -> str | None:
        """Wrap and unwrap with ``key``; None if that worked, else why not."""
        ...

    def rejected_objects(self) -> dict[str, str]:
        """Labels of objects under ``kek:`` labels that fail the adoption checks, and why."""
        ...


class KeyStore(Protocol):
    """Key metadata, shared by every replica. Each method is one atomic transaction."""

    def generation(self) -> int:
        """Grows with every metadata change (not with usage counts)."""
        ...

    def list_keys(self) -> list[KeyInfo]: ...

    def key(self, name: str) -> KeyInfo | None: ...

    def create_key(
        self, name: str, now: float, *, rotation_period: int | None, rotate_after_wraps: int
    ) -> bool:
        """Insert the key with version 1 PENDING; False if the key exists."""
        ...

    def claim_version(self, name: str, now: float, expected_current: int | None) -> int | None:
        """Reserve the next version number as PENDING.

        None when ``expected_current`` is given and the key's current version is another one
        (someone rotated first).
        """
        ...

    def activate_version(self, name: str, version: int, now: float) -> None:
        """PENDING -> ENABLED, and current = max(current, version)."""
        ...

    def drop_pending(self, name: str, version: int) -> bool: ...

    def set_state(
        self,
        name: str,
        version: int,
        *,
        expected: VersionState,
        new: VersionState,
        now: float,
        destroy_after: float | None = None,
    ) -> bool:
        """Compare-and-set; False if the version was not in ``expected`` state."""
        ...

    def set_policy(
        self,
        name: str,
        *,
        rotation_period: int | None,
        rotate_after_wraps: int,
        min_decryption_version: int,
    ) -> None: ...

    def claim_destruction(self, name: str, version: int, now: float) -> bool:
        """SCHEDULED (and due) -> DESTROYING; True for exactly one caller."""
        ...

    def claim_shred(self, name: str, now: float) -> list[int]:
        """Every live version of ``name`` -> DESTROYING; the versions this caller won."""
        ...

    def finish_destruction(self, name: str, version: int, now: float) -> None:
        """DESTROYING -> DESTROYED."""
        ...

    def due_destructions(self, now: float) -> list[KeyRef]:
        """Versions SCHEDULED_FOR_DESTRUCTION whose window has passed."""
        ...

    def stale(self, state: VersionState, older_than: float) -> list[tuple[KeyRef, float]]:
        """Versions left in an internal state (PENDING, DESTROYING) since before ``older_than``."""
        ...

    def adopt_version(self, key: KeyRef, now: float) -> bool:
        """Record an HSM object that has no metadata as ENABLED, never as the current version
        of a key that has one (a key unknown until now gets it as its first current version)."""
        ...

    def make_current(self, name: str, version: int, now: float) -> bool:
        """ENABLED and current, if ``version`` exists, is live and is newer than the current."""
        ...

    def add_usage(self, usage: Mapping[KeyRef, Usage]) -> None: ...

    def close(self) -> None: ...
