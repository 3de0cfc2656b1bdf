"""The checkpoint signing key: who signs the journal's checkpoints and archive records, and how a
signature is checked against a public key.

Two algorithms: Ed25519 (EdDSA; a PEM file, ``[audit] signing_key_file``, or a key pair in the
HSM) and ECDSA P-256 with SHA-256 (a key pair in the HSM, for modules without EdDSA). Signatures
are stored raw: 64 bytes either way (ECDSA as ``r || s``, the PKCS#11 form).

The signer used by the broker comes from :func:`checkpoint_signer`; the public key an auditor
checks against is pinned with ``keybroker audit verify --public-key FILE`` (never derived from
what the journal's host says, when given).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keybroker.adapters.public_keys import PublicKey, checked_public_key
from keybroker.core import journal as jf
from keybroker.errors import ConfigurationError

if TYPE_CHECKING:
    from keybroker.adapters.hsm_signer import HsmSignerConfig
    from keybroker.settings import Settings


class CheckpointSigner(Protocol):
    """Signs checkpoint and archive messages (an Ed25519 private key, or the HSM)."""

    def sign(self, data: bytes) -> bytes: ...

    def public_key(self) -> Any: ...


def load_public_key(path: Path) -> PublicKey:
    """An Ed25519 or ECDSA P-256 public key from a PEM file (SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read public key {path}: {exc}") from None
    return checked_public_key(key, str(path))


def public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(key: PublicKey) -> str:
    """``sha256:<16 hex>`` of the DER SubjectPublicKeyInfo: names a key in messages."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


def signature_check(key: PublicKey) -> jf.SignatureCheck:
    """``check(message, signature) -> bool`` for raw signatures by ``key``."""

    def check(message: bytes, signature: bytes) -> bool:
        try:
            if isinstance(key, Ed25519PublicKey):
                key.verify(signature, message)
            else:
                if len(signature) != 64:
                    return False
                r = int.from_bytes(signature[:32], "big")
                s = int.from_bytes(signature[32:], "big")
                key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    return check


def hsm_signer_config(settings: Settings) -> HsmSignerConfig:
    from keybroker.adapters.hsm_signer import HsmSignerConfig

    return HsmSignerConfig(
        module=settings.hsm.module,
        token_label=settings.hsm.token_label,
        pin=settings.read_pin(),
        key_label=settings.audit.signing_key_label,
        env=dict(settings.hsm.env),
        locking="global" if settings.hsm.locking == "global" else "os",
    )


def checkpoint_signer(settings: Settings) -> CheckpointSigner:
    """The checkpoint signer the settings name: the HSM key pair ``[audit] signing_key_label``, or
    the Ed25519 PEM ``[audit] signing_key_file`` (exactly one of them)."""
    audit = settings.audit
    if audit.signing_key_label:
        if audit.signing_key_file is not None:
            raise ConfigurationError(
                "[audit] give one of signing_key_file and signing_key_label, not both"
            )
        from keybroker.adapters.hsm_signer import HsmSigner

        return HsmSigner(hsm_signer_config(settings))
    signer: CheckpointSigner = audit.load_keys()[1]
    return signer


def configured_public_key(settings: Settings) -> PublicKey:
    """The public key of the configured checkpoint signer (file or HSM)."""
    return checked_public_key(checkpoint_signer(settings).public_key(), "[audit] signing key")
