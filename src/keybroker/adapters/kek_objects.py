"""KEK objects on a PKCS#11 token: how they are made, which ones may be used, and how a module
handles AES-GCM IVs. Used by :mod:`keybroker.adapters.hsm`; every function takes a python-pkcs11
session or object and holds no state.

IVs. HSMs differ (probed at start-up by :func:`probe_module`, never assumed):

- *keeps* the caller's IV (SoftHSM2, openCryptoki): the broker passes 12 random bytes from the
  HSM's generator (the HSM adapter draws them 64 IVs at a time per session,
  :meth:`keybroker.adapters.hsm.Pkcs11Keks._fresh_iv`);
- *overwrites* it with an IV of its own, written back into ``CK_GCM_PARAMS.pIv`` (AWS CloudHSM);
- *refuses* a caller IV and fills a zeroed ``pIv`` itself (Thales Luna in FIPS mode).

Either way the broker passes a **mutable** 12-byte buffer: python-pkcs11's ``GCMParams`` hands
the buffer of a ``bytearray`` nonce to the module as ``pIv`` (Cython's object-to-pointer
conversion of a bytearray is its live buffer), so the module's IV can be read back after
``C_Encrypt``. An immutable ``bytes`` would be written into in place by such a module, silently
corrupting an object Python believes constant. Whatever the buffer holds after the call is the
IV of the ciphertext, and that is what the wrapped key stores. A module that ignores the caller's
IV *and* reports nothing is unusable: the probe refuses it, and the wrap -> unwrap self-test of
every KEK version (:func:`self_test`) would catch it too.

Objects. New KEKs get :data:`KEK_TEMPLATE` (plus ``CKA_ALLOWED_MECHANISMS = [CKM_AES_GCM]``
where the module takes it). An object under a ``kek:`` label is used only if :func:`rejection`
finds nothing wrong: AES, 32 bytes, generated in the HSM (``CKA_LOCAL``), never extractable,
always sensitive. A key imported with ``C_CreateObject`` (whose value someone knows) fails
``CKA_LOCAL`` and ``CKA_NEVER_EXTRACTABLE`` and is never used.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.attributes import ATTRIBUTE_TYPES
from pkcs11.exceptions import AttributeTypeInvalid, AttributeValueInvalid, PKCS11Error

from keybroker.core.wrapped_key import NONCE_SIZE
from keybroker.errors import ConfigurationError, HsmUnavailableError

log = logging.getLogger(__name__)

IV_SOURCES = ("auto", "caller", "hsm")
_ZERO_IV = bytes(NONCE_SIZE)
_PROBE_AAD = b"keybroker: probe of the module's GCM IV handling"
_PROBE_PLAINTEXT = b"\x5a" * 32

#: Attributes of every KEK the broker creates (AES-256 token object).
KEK_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}

#: Attribute values a KEK found on the token must have to be used.
REQUIRED: dict[Attribute, Any] = {
    Attribute.KEY_TYPE: KeyType.AES,
    Attribute.VALUE_LEN: 32,
    Attribute.LOCAL: True,
    Attribute.NEVER_EXTRACTABLE: True,
    Attribute.ALWAYS_SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SENSITIVE: True,
}


def _pack_mechanisms(value: Any) -> bytes:
    return b"".join(struct.pack("@L", int(m)) for m in value)


def _unpack_mechanisms(raw: bytes) -> list[Mechanism]:
    size = struct.calcsize("@L")
    return [Mechanism(v) for (v,) in struct.iter_unpack("@L", raw[: len(raw) // size * size])]


# python-pkcs11 0.10 has no handler for CKA_ALLOWED_MECHANISMS (an array of CK_ULONG), and a
# session's attribute mapper is copied from this table when the session opens and is not
# reachable afterwards: add the handler to the defaults once, before any session exists.
ATTRIBUTE_TYPES.setdefault(Attribute.ALLOWED_MECHANISMS, (_pack_mechanisms, _unpack_mechanisms))


def generate_kek(session: Any, label: str) -> bool:
    """Generate an AES-256 KEK token object labelled ``label`` with :data:`KEK_TEMPLATE`,
    limited to AES-GCM where the module supports ``CKA_ALLOWED_MECHANISMS``. Returns whether
    the mechanism limit was applied."""
    template = {**KEK_TEMPLATE, Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_GCM]}
    try:
        session.generate_key(KeyType.AES, 256, label=label, store=True, template=template)
    except (AttributeTypeInvalid, AttributeValueInvalid):
        log.warning(
            "hsm: the module does not take CKA_ALLOWED_MECHANISMS; %s is created without it",
            label,
        )
        session.generate_key(KeyType.AES, 256, label=label, store=True, template=KEK_TEMPLATE)
        return False
    return True


def rejection(obj: Any) -> str | None:
    """Why the KEK object ``obj`` must not be used, or None if it may be."""
    try:
        found = obj.get_attributes(list(REQUIRED))
    except PKCS11Error as exc:
        return f"attributes unreadable ({type(exc).__name__})"
    wrong = [
        attribute.name for attribute, wanted in REQUIRED.items() if found.get(attribute) != wanted
    ]
    if wrong:
        return "not an AES-256 key generated in the HSM and never extractable: " + ", ".join(
            f"CKA_{name}" for name in wrong
        )
    return None


# -- IVs ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModuleCapabilities:
    """What :func:`probe_module` found (or the configuration imposed)."""

    iv_behaviour: str
    """``keeps``, ``overwrites`` or ``refuses`` a caller IV; ``configured`` when not probed."""
    iv_source: str
    """``caller`` (the broker draws the IV) or ``hsm`` (the module does)."""
    session_copies: bool
    """C_CopyObject makes in-memory session copies of a KEK (faster on SoftHSM)."""

    def describe(self) -> str:
        return (
            f"GCM IV {self.iv_behaviour} -> iv_source {self.iv_source}; "
            f"session copies {'on' if self.session_copies else 'off'}"
        )


def _gcm(iv: bytearray, aad: bytes) -> Any:
    # A bytearray, not bytes: the module may write its own IV into this buffer (see docstring).
    # python-pkcs11 annotates the nonce as bytes but takes any object Cython can point at.
    return pkcs11.GCMParams(cast(bytes, iv), aad, 128)


def _seal(key: Any, iv: bytearray) -> bytes | None:
    try:
        sealed: bytes = key.encrypt(
            _PROBE_PLAINTEXT, mechanism=Mechanism.AES_GCM, mechanism_param=_gcm(iv, _PROBE_AAD)
        )
    except PKCS11Error as exc:
        log.info("hsm probe: GCM encryption refused (%s)", type(exc).__name__)
        return None
    return sealed


def _probe_iv(session: Any, key: Any) -> str:
    """``keeps``, ``overwrites`` or ``refuses`` (a caller IV); raises ConfigurationError for a
    module that cannot be used safely."""
    caller = bytearray(session.generate_random(NONCE_SIZE * 8))
    sent = bytes(caller)
    sealed = _seal(key, caller)
    if sealed is None:
        zero = bytearray(NONCE_SIZE)
        sealed = _seal(key, zero)
        if sealed is None:
            raise ConfigurationError(
                "[hsm] module: AES-GCM encryption fails with a caller IV and without one; "
                "the broker needs CKM_AES_GCM"
            )
        if bytes(zero) == _ZERO_IV or not _opens(key, bytes(zero), sealed):
            raise ConfigurationError(
                "[hsm] module: it refuses caller GCM IVs but does not return its own in pIv"
            )
        return "refuses"
    used = bytes(caller)
    if used != sent:
        if not _opens(key, used, sealed):
            raise ConfigurationError(
                "[hsm] module: the GCM IV it writes back into pIv is not the one it used"
            )
        return "overwrites"
    if not _opens(key, sent, sealed):
        raise ConfigurationError(
            "[hsm] module: it ignores the caller's GCM IV without returning its own in pIv; "
            "wrapped keys made on it could never be unwrapped"
        )
    return "keeps"


def _opens(key: Any, iv: bytes, sealed: bytes) -> bool:
    try:
        plain = key.decrypt(
            sealed,
            mechanism=Mechanism.AES_GCM,
            mechanism_param=pkcs11.GCMParams(iv, _PROBE_AAD, 128),
        )
    except PKCS11Error:
        return False
    return bool(plain == _PROBE_PLAINTEXT)


def _probe_copy(key: Any) -> bool:
    try:
        copy = key.copy({Attribute.TOKEN: False})
    except PKCS11Error as exc:
        log.info("hsm: no session copies of KEKs (C_CopyObject: %s)", type(exc).__name__)
        return False
    copy.destroy()
    return True


def probe_module(session: Any, iv_source: str) -> ModuleCapabilities:
    """Find how the module treats GCM IVs and whether it copies objects, with a throw-away
    session key (sensitive, non-extractable, destroyed at once). ``iv_source`` other than
    ``auto`` skips the IV probe and is checked on every wrap instead."""
    if iv_source not in IV_SOURCES:
        raise ConfigurationError(f"[hsm] iv_source must be one of {', '.join(IV_SOURCES)}")
    # A sensitive, non-extractable session key. It stays modifiable: C_CopyObject support is a
    # property of the module; whether one KEK can be copied is tried per KEK (session_copy),
    # since SoftHSM refuses to copy a CKA_MODIFIABLE=false object into a session object.
    key = session.generate_key(
        KeyType.AES,
        256,
        store=False,
        template={
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
        },
    )
    try:
        copies = _probe_copy(key)
        if iv_source != "auto":
            return ModuleCapabilities("configured", iv_source, copies)
        behaviour = _probe_iv(session, key)
    finally:
        key.destroy()
    return ModuleCapabilities(behaviour, "caller" if behaviour == "keeps" else "hsm", copies)


def gcm_encrypt(
    handle: Any,
    plaintext: bytes,
    aad: bytes,
    iv_source: str,
    fresh_iv: Callable[[], bytes] | None = None,
) -> tuple[bytes, bytes]:
    """AES-256-GCM with ``handle``; returns (the IV the module used, ciphertext || tag).

    ``caller``: a fresh IV from the HSM's generator (``fresh_iv()``, or one C_GenerateRandom on
    the handle's session); ``hsm``: a zeroed buffer the module fills. Either way the buffer is
    read back after the call. Raises HsmUnavailableError if an ``hsm`` module left the buffer
    zeroed (it reported no IV)."""
    if iv_source == "caller":
        drawn = (
            fresh_iv() if fresh_iv is not None else handle.session.generate_random(NONCE_SIZE * 8)
        )
        if len(drawn) != NONCE_SIZE:
            raise HsmUnavailableError(reason="hsm_no_iv")
        iv = bytearray(drawn)
    else:
        iv = bytearray(NONCE_SIZE)
    sealed: bytes = handle.encrypt(
        plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=_gcm(iv, aad)
    )
    used = bytes(iv)
    if used == _ZERO_IV:
        log.error('hsm: the module returned no GCM IV; set [hsm] iv_source = "auto" or "caller"')
        raise HsmUnavailableError(reason="hsm_no_iv")
    return used, sealed


def is_session_copy(obj: Any) -> bool:
    """True only for an object that is certainly not a token object (CKA_TOKEN false)."""
    try:
        return obj[Attribute.TOKEN] is False
    except PKCS11Error:
        return False


def session_copy(obj: Any) -> Any | None:
    """An in-memory session copy of ``obj`` (sensitive, non-extractable), or None if refused."""
    try:
        return obj.copy({Attribute.TOKEN: False})
    except PKCS11Error as exc:
        # e.g. CKR_ATTRIBUTE_READ_ONLY from SoftHSM for a CKA_MODIFIABLE=false KEK
        log.info("hsm: no session copy (%s); using the token object", type(exc).__name__)
        return None
