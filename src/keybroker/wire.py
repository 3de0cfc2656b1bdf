"""The wire contract client and server share: domain error <-> gRPC status, and the reason trailer.

The server sends the machine-readable reason of every refusal in the ``keybroker-reason`` trailing
metadata, so a client maps a status back to the exact domain class (:func:`error_from_status`).
This module imports only :mod:`grpc` and :mod:`keybroker.errors`: the client SDK ships it without
the server (``keybroker-client``), and the server's :mod:`keybroker.server.status` re-exports it.
Never UNKNOWN.
"""

from __future__ import annotations

import grpc

from keybroker import errors

#: Most specific classes first; :class:`KeybrokerError` is the catch-all.
STATUS_TABLE: tuple[tuple[type[errors.KeybrokerError], grpc.StatusCode], ...] = (
    (errors.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.InvalidWrappedKeyError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.RetentionExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.HsmUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.JournalUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.KeyStateStaleError, grpc.StatusCode.UNAVAILABLE),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.RecordingIntegrityError, grpc.StatusCode.DATA_LOSS),  # client-side; for completeness
    (errors.InternalError, grpc.StatusCode.INTERNAL),
    (errors.ConfigurationError, grpc.StatusCode.INTERNAL),
    (errors.KeybrokerError, grpc.StatusCode.INTERNAL),
)


REASON_METADATA = "keybroker-reason"

#: Reasons that identify a more specific class than the status code alone.
_REASON_CLASSES: dict[str, type[errors.KeybrokerError]] = {
    errors.InvalidWrappedKeyError.default_reason: errors.InvalidWrappedKeyError,
    errors.RetentionExpiredError.default_reason: errors.RetentionExpiredError,
    errors.HsmUnavailableError.default_reason: errors.HsmUnavailableError,
    errors.JournalUnavailableError.default_reason: errors.JournalUnavailableError,
    errors.StoreUnavailableError.default_reason: errors.StoreUnavailableError,
    errors.KeyStateStaleError.default_reason: errors.KeyStateStaleError,
    errors.RateLimitedError.default_reason: errors.RateLimitedError,
}
_CODE_CLASSES: dict[grpc.StatusCode, type[errors.KeybrokerError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.UnavailableError,
}


def error_from_status(
    code: grpc.StatusCode, message: str, reason: str | None
) -> errors.KeybrokerError:
    """The domain error a client raises for a failed call (catch-all: InternalError)."""
    cls = _REASON_CLASSES.get(reason or "")
    if cls is errors.InvalidWrappedKeyError:
        return errors.InvalidWrappedKeyError()
    if cls is not None:
        return cls(message, reason=reason)
    cls = _CODE_CLASSES.get(code, errors.InternalError)
    default = code.name.lower() if code is not grpc.StatusCode.UNAVAILABLE else None
    return cls(message or None, reason=reason or default)


def status_code(value: int) -> grpc.StatusCode:
    """The status code of a numeric code (a batch item's ``code``); unknown ones: INTERNAL."""
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.INTERNAL)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and public message for any exception (unknown ones become INTERNAL)."""
    if isinstance(exc, errors.KeybrokerError):
        for cls, code in STATUS_TABLE:
            if isinstance(exc, cls):
                if code is grpc.StatusCode.INTERNAL:
                    return code, errors.InternalError.default_message
                return code, exc.message
    return grpc.StatusCode.INTERNAL, errors.InternalError.default_message
