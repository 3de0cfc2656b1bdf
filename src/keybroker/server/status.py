"""The one mapping from domain errors to gRPC status codes. Never UNKNOWN."""

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
    (errors.RetentionExpiredError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.HsmUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
    (errors.ConfigurationError, grpc.StatusCode.INTERNAL),
    (errors.KeybrokerError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and public message for any exception (unknown ones become INTERNAL)."""
    if isinstance(exc, errors.KeybrokerError):
        for cls, code in STATUS_TABLE:
            if isinstance(exc, cls):
                if code is grpc.StatusCode.INTERNAL:
                    return code, errors.InternalError.default_message
                return code, exc.message
    return grpc.StatusCode.INTERNAL, errors.InternalError.default_message
