"""Ports: what the core needs from the outside world, as small Protocols."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from keybroker.core.decision import Decision
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

    def encrypt(self, key: KeyRef, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM inside the HSM; returns ciphertext || 16-byte tag."""
        ...

    def decrypt(self, key: KeyRef, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`encrypt`.

        Raises InvalidWrappedKeyError when the key version is unknown or authentication fails, and
        HsmUnavailableError when the HSM cannot be used.
        """
        ...


class DecisionRecorder(Protocol):
    """Records every decision (allow or deny)."""

    def record(self, decision: Decision) -> object:
        """Record it; a durable recorder raises UnavailableError if it cannot."""
        ...
