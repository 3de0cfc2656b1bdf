"""The checkpoint signing key kept in the HSM (``[audit] signing_key_label``).

A key pair on the ``[hsm]`` token, EdDSA (Ed25519, ``CKM_EDDSA``) or ECDSA P-256 (``CKM_ECDSA``
over a SHA-256 digest computed here, so modules without ``CKM_ECDSA_SHA256`` work too). The
private key is sensitive and never extractable: checkpoints and archive records are signed inside
the HSM and the key cannot be copied off the journal's host. SoftHSM 2.6 supports both.

Conventions of :mod:`keybroker.adapters.hsm`: the module is the process's one
:class:`~keybroker.adapters.hsm_sessions.Module` (initialised once, with OS locking where the
module allows it), every PKCS#11 call holds its gate shared, and the signer's one session is used
by one thread at a time. Login is per process, so when the broker's key store has already logged
in, this opens its own session without logging in again (``UserAlreadyLoggedIn``); its session is
never closed (closing the session that logged in would log the whole process out). A session that
stops working (the module was re-initialised after an outage, the token went away) is reopened
once per signature; if that fails the signature fails with
:class:`~keybroker.errors.HsmUnavailableError`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    MultipleObjectsReturned,
    NoSuchKey,
    NoSuchToken,
    PinIncorrect,
    PKCS11Error,
    UserAlreadyLoggedIn,
)
from pkcs11.util.ec import encode_named_curve_parameters

from keybroker.adapters import hsm_sessions
from keybroker.adapters.public_keys import PublicKey, checked_public_key
from keybroker.errors import ConfigurationError, HsmUnavailableError

ALGORITHMS = ("ed25519", "ecdsa-p256")
_ED25519_OID = "1.3.101.112"


@dataclass(frozen=True)
class HsmSignerConfig:
    module: str
    token_label: str
    pin: str
    key_label: str
    env: Mapping[str, str] = field(default_factory=dict)
    locking: hsm_sessions.Locking = "os"

    def __repr__(self) -> str:
        return (
            f"HsmSignerConfig(module={self.module!r}, token_label={self.token_label!r}, "
            f"key_label={self.key_label!r}, pin=***)"
        )


def _load(config: HsmSignerConfig) -> hsm_sessions.Module:
    """The process's module (the broker's key store shares it: one initialise per process)."""
    os.environ.update(config.env)
    try:
        return hsm_sessions.load(config.module, config.locking)
    except PKCS11Error as exc:
        raise ConfigurationError(
            f"[hsm] module: cannot load PKCS#11 module {config.module} ({type(exc).__name__})"
        ) from None


def _open_session(config: HsmSignerConfig, module: Any, *, rw: bool = False) -> Any:
    """A session on the configured token, logged in (or sharing this process's login)."""
    try:
        token = module.lib.get_token(token_label=config.token_label)
    except NoSuchToken:
        raise ConfigurationError(
            f"[hsm] token_label: no token labelled {config.token_label!r}"
        ) from None
    try:
        return token.open(rw=rw, user_pin=config.pin)
    except UserAlreadyLoggedIn:
        return token.open(rw=rw)
    except PinIncorrect:
        raise ConfigurationError("[hsm] pin_file: the PIN is incorrect for this token") from None


def _find(session: Any, object_class: ObjectClass, label: str) -> Any:
    try:
        return session.get_key(object_class=object_class, label=label)
    except NoSuchKey:
        raise ConfigurationError(
            f"[audit] signing_key_label: no key pair labelled {label!r} on the token; "
            "create it with `keybroker audit signing-key create`"
        ) from None
    except MultipleObjectsReturned:
        raise ConfigurationError(
            f"[audit] signing_key_label: several keys labelled {label!r} on the token"
        ) from None


def _public_from_point(key_type: KeyType, point: bytes) -> PublicKey:
    """The public key from ``CKA_EC_POINT`` (a DER OCTET STRING, or the raw point)."""
    if len(point) > 2 and point[0] == 0x04 and point[1] == len(point) - 2:
        point = point[2:]
    if key_type == KeyType.EC_EDWARDS:
        return Ed25519PublicKey.from_public_bytes(point)
    return checked_public_key(
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point), "HSM public key"
    )


class HsmSigner:
    """Signs with the private key labelled ``key_label``; see the module docstring."""

    def __init__(self, config: HsmSignerConfig) -> None:
        self._config = config
        self._session: Any = None
        self._key: Any = None
        self._key_type: KeyType | None = None
        self._lock = threading.Lock()
        self._module = _load(config)
        self._generation = self._module.generation
        with self._lock, self._module.gate.shared():
            # fail fast at start-up: wrong label, wrong PIN, no such token
            self._public: PublicKey = self._connect()

    def __repr__(self) -> str:
        return f"HsmSigner({self._config!r})"

    def _connect(self) -> PublicKey:
        self._generation = self._module.generation
        session = _open_session(self._config, self._module)
        key = _find(session, ObjectClass.PRIVATE_KEY, self._config.key_label)
        key_type = key.key_type
        if key_type not in (KeyType.EC, KeyType.EC_EDWARDS):
            raise ConfigurationError(
                f"[audit] signing_key_label: {self._config.key_label!r} is not an EC or Ed25519 key"
            )
        public = _find(session, ObjectClass.PUBLIC_KEY, self._config.key_label)
        point = bytes(public[Attribute.EC_POINT])
        self._session, self._key, self._key_type = session, key, key_type
        return _public_from_point(key_type, point)

    @property
    def algorithm(self) -> str:
        return "ed25519" if self._key_type == KeyType.EC_EDWARDS else "ecdsa-p256"

    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        """A raw signature (64 bytes) of ``data``, made inside the HSM."""
        with self._lock, self._module.gate.shared():
            for attempt in (1, 2):
                try:
                    if self._key is None or self._generation != self._module.generation:
                        self._connect()
                    if self._key_type == KeyType.EC_EDWARDS:
                        return bytes(self._key.sign(data, mechanism=Mechanism.EDDSA))
                    digest = hashlib.sha256(data).digest()
                    return bytes(self._key.sign(digest, mechanism=Mechanism.ECDSA))
                except (PKCS11Error, ConfigurationError):
                    self._session = self._key = None  # reopen once (never close: see above)
                    if attempt == 2:
                        raise HsmUnavailableError(reason="hsm_unavailable") from None
        raise AssertionError("unreachable")


def create_signing_key(config: HsmSignerConfig, algorithm: str = "ed25519") -> PublicKey:
    """Generate the checkpoint key pair on the token (refusing an existing label); return its
    public key. The private key is sensitive, never extractable, and may only sign."""
    if algorithm not in ALGORITHMS:
        raise ConfigurationError(f"algorithm must be one of {', '.join(ALGORITHMS)}")
    module = _load(config)
    with module.gate.shared():
        session = _open_session(config, module, rw=True)
        for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            if list(
                session.get_objects(
                    {Attribute.CLASS: object_class, Attribute.LABEL: config.key_label}
                )
            ):
                raise ConfigurationError(
                    f"a key labelled {config.key_label!r} already exists on the token; "
                    "refusing to replace it"
                )
        private = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.DERIVE: False,
        }
        public = {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True}
        if algorithm == "ed25519":
            key_type, curve = KeyType.EC_EDWARDS, _ED25519_OID
            mechanism = Mechanism.EC_EDWARDS_KEY_PAIR_GEN
        else:
            key_type, curve = KeyType.EC, "secp256r1"
            mechanism = Mechanism.EC_KEY_PAIR_GEN
        try:
            params = session.create_domain_parameters(
                key_type, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
            )
            pub, _ = params.generate_keypair(
                store=True,
                label=config.key_label,
                mechanism=mechanism,
                public_template=public,
                private_template=private,
            )
        except PKCS11Error as exc:
            raise ConfigurationError(
                f"the HSM cannot make an {algorithm} key pair ({type(exc).__name__})"
            ) from None
        return _public_from_point(key_type, bytes(pub[Attribute.EC_POINT]))
