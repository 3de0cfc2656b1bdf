"""The one PKCS#11 error table: python-pkcs11 exception class → what it says about the HSM.

Every call site of :mod:`keybroker.adapters.hsm` hands its ``PKCS11Error`` to :func:`fault_of`
and acts on the :class:`Fault` (reconnect, look a handle up again, probe the token), then raises
the domain error :func:`domain_error` gives. :data:`FAULTS` has a row for every class in
``pkcs11.exceptions`` (a test proves it), and anything else — a class a later python-pkcs11 adds,
or the base ``PKCS11Error`` it raises for a return value it does not know — falls to the
catch-all, :attr:`Fault.MODULE`: the HSM is unavailable, never the caller's fault.

A failed AES-GCM tag check has no class of its own: SoftHSM answers ``CKR_GENERAL_ERROR``
(:class:`~pkcs11.exceptions.GeneralError`, the same class as a token whose files vanished),
others ``CKR_ENCRYPTED_DATA_INVALID`` or PKCS#11 3.0's ``CKR_AEAD_DECRYPT_FAILED``. Those are
:attr:`Fault.AMBIGUOUS` and :attr:`Fault.BAD_DATA`; only the decrypt path may turn them into
"wrapped key is invalid", and only after probing the token (see ``Pkcs11Keks.decrypt``).
"""

from __future__ import annotations

import enum

from pkcs11 import exceptions as p11

from keybroker.errors import (
    ConfigurationError,
    HsmUnavailableError,
    InvalidWrappedKeyError,
    KeybrokerError,
    NotFoundError,
)


class Fault(enum.Enum):
    """What a PKCS#11 failure says, and so what the adapter does about it."""

    LOST = enum.auto()
    """The token, device, session or login is gone: drop every session, reconnect."""
    STALE_HANDLE = enum.auto()
    """An object handle is no longer valid (destroyed, re-created): look the key up again."""
    NO_KEY = enum.auto()
    """The key is not on the token."""
    NO_TOKEN = enum.auto()
    """No token with the configured label (start-up: configuration; later: an outage)."""
    CREDENTIALS = enum.auto()
    """The PIN is wrong, locked, expired or not set (start-up: configuration; later: an outage)."""
    LOGGED_IN = enum.auto()
    """Login is per process and another session of it is already logged in: not an error."""
    BAD_DATA = enum.auto()
    """The module refused the ciphertext itself (e.g. a failed tag check on most modules)."""
    AMBIGUOUS = enum.auto()
    """``CKR_GENERAL_ERROR``: a failed tag check on SoftHSM, or a broken token: probe to tell."""
    BUSY = enum.auto()
    """Out of memory, sessions or time, or an operation still active: retry later."""
    REFUSED = enum.auto()
    """The module does not support or accept what was asked (mechanism, attribute, template):
    a capability or configuration mismatch, logged as an error; the call is unavailable."""
    MODULE = enum.auto()
    """Anything else, and the catch-all: the HSM is unavailable."""


_ROWS: dict[Fault, tuple[type[p11.PKCS11Error], ...]] = {
    Fault.LOST: (
        p11.TokenNotPresent,
        p11.TokenNotRecognised,
        p11.DeviceRemoved,
        p11.DeviceError,
        p11.SessionHandleInvalid,
        p11.SessionClosed,
        p11.UserNotLoggedIn,
        p11.SlotIDInvalid,
    ),
    Fault.STALE_HANDLE: (p11.ObjectHandleInvalid, p11.KeyHandleInvalid),
    Fault.NO_KEY: (p11.NoSuchKey,),
    Fault.NO_TOKEN: (p11.NoSuchToken,),
    Fault.CREDENTIALS: (
        p11.PinIncorrect,
        p11.PinInvalid,
        p11.PinLenRange,
        p11.PinExpired,
        p11.PinLocked,
        p11.PinTooWeak,
        p11.UserPinNotInitialized,
    ),
    Fault.LOGGED_IN: (p11.UserAlreadyLoggedIn,),
    Fault.BAD_DATA: (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange),
    Fault.AMBIGUOUS: (p11.GeneralError,),
    Fault.BUSY: (
        p11.DeviceMemory,
        p11.HostMemory,
        p11.SessionCount,
        p11.OperationActive,
        p11.OperationNotInitialized,
        p11.FunctionCancelled,
        p11.FunctionFailed,
        p11.NoEvent,
        p11.RandomNoRNG,
    ),
    Fault.REFUSED: (
        p11.FunctionNotSupported,
        p11.FunctionRejected,
        p11.MechanismInvalid,
        p11.MechanismParamInvalid,
        p11.ArgumentsBad,
        p11.AttributeReadOnly,
        p11.AttributeSensitive,
        p11.AttributeTypeInvalid,
        p11.AttributeValueInvalid,
        p11.TemplateIncomplete,
        p11.TemplateInconsistent,
        p11.DataInvalid,
        p11.DataLenRange,
        p11.DomainParamsInvalid,
        p11.KeySizeRange,
        p11.KeyTypeInconsistent,
        p11.KeyUnextractable,
        p11.KeyNotWrappable,
        p11.KeyIndigestible,
        p11.KeyNeeded,
        p11.KeyNotNeeded,
        p11.TokenWriteProtected,
        p11.SessionReadOnly,
        p11.SessionReadOnlyExists,
        p11.SessionReadWriteSOExists,
        p11.SessionExists,
        p11.AnotherUserAlreadyLoggedIn,
        p11.UserTooManyTypes,
        p11.RandomSeedNotSupported,
        p11.ExceededMaxIterations,
        p11.MultipleObjectsReturned,
        p11.MultipleTokensReturned,
        p11.PublicKeyInvalid,
        p11.SignatureInvalid,
        p11.SignatureLenRange,
        p11.WrappedKeyInvalid,
        p11.WrappedKeyLenRange,
        p11.WrappingKeyHandleInvalid,
        p11.WrappingKeySizeRange,
        p11.WrappingKeyTypeInconsistent,
        p11.UnwrappingKeyHandleInvalid,
        p11.UnwrappingKeySizeRange,
        p11.UnwrappingKeyTypeInconsistent,
    ),
    Fault.MODULE: (p11.PKCS11Error,),
}

#: Exception class → fault: the table (each class in exactly one row).
FAULTS: dict[type[p11.PKCS11Error], Fault] = {
    cls: fault for fault, classes in _ROWS.items() for cls in classes
}

# Module quirk: python-pkcs11 0.10 has no class for PKCS#11 3.0's CKR_AEAD_DECRYPT_FAILED (0x35)
# and raises the base class with this message; it is a failed tag check, like
# CKR_ENCRYPTED_DATA_INVALID.
_AEAD_DECRYPT_FAILED = "Unmapped error code 0x35"


def fault_of(exc: p11.PKCS11Error) -> Fault:
    """The table's verdict on ``exc``; :attr:`Fault.MODULE` for anything without a row."""
    fault = FAULTS.get(type(exc))
    if fault is not None:
        if fault is Fault.MODULE and str(exc) == _AEAD_DECRYPT_FAILED:
            return Fault.BAD_DATA
        return fault
    for cls in type(exc).__mro__[1:]:  # a subclass a later python-pkcs11 might add
        if cls in FAULTS and cls is not p11.PKCS11Error:
            return FAULTS[cls]
    return Fault.MODULE


#: The reason recorded with the HsmUnavailableError of each fault (spans, logs, metrics).
REASONS: dict[Fault, str] = {
    Fault.LOST: "hsm_unavailable",
    Fault.STALE_HANDLE: "hsm_unavailable",
    Fault.NO_TOKEN: "token_not_found",
    Fault.CREDENTIALS: "hsm_login_failed",
    Fault.LOGGED_IN: "hsm_unavailable",
    Fault.BAD_DATA: "hsm_unavailable",
    Fault.AMBIGUOUS: "hsm_unavailable",
    Fault.BUSY: "hsm_busy",
    Fault.REFUSED: "hsm_refused",
    Fault.MODULE: "hsm_unavailable",
}


def domain_error(
    exc: p11.PKCS11Error,
    *,
    starting_label: str | None = None,
    tag_failure: bool = False,
    reason: str | None = None,
) -> KeybrokerError:
    """The domain error for ``exc``.

    ``starting_label``: the token label while the broker starts (``connect``), where an unknown
    token or a refused PIN is the operator's to fix (ConfigurationError, the process exits); later
    the same faults are an outage like any other (the token or the PIN may come back).
    ``tag_failure``: the decrypt path probed the token and found it healthy, so a BAD_DATA or
    AMBIGUOUS fault is the wrapped key's. ``reason`` overrides the reason of an
    HsmUnavailableError (e.g. the step of the connection that failed).
    """
    fault = fault_of(exc)
    if tag_failure and fault in (Fault.BAD_DATA, Fault.AMBIGUOUS):
        return InvalidWrappedKeyError()
    if fault is Fault.NO_KEY:
        return NotFoundError(reason="key_not_found")
    if starting_label is not None and fault is Fault.NO_TOKEN:
        return ConfigurationError(
            f"[hsm] token_label: no token labelled {starting_label!r}; "
            "initialise it (softhsm/init-token.sh for SoftHSM) or fix the label",
            reason="token_not_found",
        )
    if starting_label is not None and fault is Fault.CREDENTIALS:
        detail = (
            "the PIN is incorrect for this token"
            if isinstance(exc, p11.PinIncorrect)
            else f"login refused ({type(exc).__name__})"
        )
        return ConfigurationError(f"[hsm] pin_file: {detail}", reason="hsm_login_failed")
    if fault in (Fault.NO_TOKEN, Fault.CREDENTIALS):
        return HsmUnavailableError(reason=REASONS[fault])
    return HsmUnavailableError(reason=reason or REASONS[fault])
