"""The public keys a checkpoint signature may be checked against: Ed25519 or ECDSA P-256. A leaf
shared by the checkpoint-key helpers (:mod:`keybroker.adapters.checkpoint_keys`) and the HSM
signer (:mod:`keybroker.adapters.hsm_signer`), so neither imports the other back."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keybroker.errors import ConfigurationError

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey


def checked_public_key(key: object, source: str) -> PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ConfigurationError(f"{source}: the checkpoint key must be Ed25519 or ECDSA P-256")
