"""The default journal's keys, generated at first start (``[audit] dir`` unset).

A broker without ``[audit] dir`` journals under its state directory
(:class:`keybroker.settings.AuditLayout`). Each key file the settings take from that layout and
that does not exist yet is generated here: the chain key and the pseudonym key (32 random bytes as
64 hex characters) and the Ed25519 checkpoint signing key (PKCS#8 PEM) with its public key next to
it, for ``keybroker audit verify --public-key``. Key files are 0600 in a 0700 directory.

Only the default journal's keys are generated (the caller checks that ``[audit] dir`` is the
layout's), and only at the layout's paths: a key file the operator names elsewhere, or the keys of
a journal elsewhere, are never created, and a missing one stays a configuration error. Existing
files are never rewritten, so a second start reuses them.

Creation is atomic and safe against several processes at once (worker processes, a second
``keybroker`` command): each file is written completely under a temporary name, then linked to its
final name, which fails if another process won; the winner's key is then the one everybody reads.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keybroker.adapters.files import private_dir, write_private
from keybroker.errors import ConfigurationError
from keybroker.settings import AuditLayout, AuditSettings


def _publish(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` (0600) unless it exists; True if this call created it."""
    private_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    write_private(temporary, data)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        temporary.unlink()
    return True


def _hex_key() -> bytes:
    return secrets.token_hex(32).encode() + b"\n"


def _signing_key() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(private_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError("[audit] signing_key_file must be an Ed25519 private key")
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ensure_default_keys(audit: AuditSettings, layout: AuditLayout) -> list[Path]:
    """Generate the layout's key files that ``audit`` uses and that are missing; return those
    created (an empty list on every later start)."""
    created: list[Path] = []
    try:
        for configured, default in (
            (audit.chain_key_file, layout.chain_key),
            (audit.pseudonym_key_file, layout.pseudonym_key),
        ):
            if configured == default and not default.exists() and _publish(default, _hex_key()):
                created.append(default)
        if audit.signing_key_file == layout.signing_key:
            if not layout.signing_key.exists() and _publish(layout.signing_key, _signing_key()):
                created.append(layout.signing_key)
            public = layout.signing_public_key
            if not public.exists():
                pem = _public_pem(layout.signing_key.read_bytes())
                if _publish(public, pem):
                    created.append(public)
    except OSError as exc:
        raise ConfigurationError(
            f"[audit] cannot create the journal keys under {layout.keys} ({exc.strerror}); set "
            "[state] dir to a writable directory, or give [audit] dir and its key files"
        ) from None
    return created
