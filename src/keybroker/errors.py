"""The one domain exception hierarchy.

Every error the broker raises on purpose is a :class:`KeybrokerError`. Each class carries a public
``message`` (safe to send to the caller: it never contains key material, wrapped blobs or tokens)
and a machine-readable ``reason`` recorded in the decision span. Mapping to gRPC status codes lives
in exactly one place, :mod:`keybroker.wire`.
"""

from __future__ import annotations


class KeybrokerError(Exception):
    """Base of every domain error. ``str(err)`` is the public message."""

    default_message = "request failed"
    default_reason = "error"

    def __init__(self, message: str | None = None, *, reason: str | None = None) -> None:
        self.message = message or self.default_message
        self.reason = reason or self.default_reason
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r})"


class AuthenticationError(KeybrokerError):
    """The caller's token is missing, malformed, badly signed, expired or otherwise unacceptable."""

    default_message = "invalid or missing access token"
    default_reason = "token_invalid"

    verified_claims: tuple[str | None, str | None, str | None] | None = None
    """``(sub, jti, client_id)`` when the token's signature verified and a later check (time,
    audience, issuer, lifetime) failed: who was refused, for the audit record. Never the token."""


class PermissionDeniedError(KeybrokerError):
    """The caller is authenticated but not allowed to do this (scope, purpose, binding, TLS)."""

    default_message = "permission denied"
    default_reason = "permission_denied"


class InvalidRequestError(KeybrokerError):
    """The request itself is malformed (missing or out-of-bounds field)."""

    default_message = "invalid request"
    default_reason = "invalid_argument"


class InvalidWrappedKeyError(InvalidRequestError):
    """A wrapped key failed to parse or to authenticate.

    Always the same message whatever went wrong, so the error is no oracle.
    """

    default_message = "wrapped key is invalid"
    default_reason = "wrapped_key_invalid"

    def __init__(self) -> None:
        super().__init__()


class NotFoundError(KeybrokerError):
    """A named key does not exist."""

    default_message = "not found"
    default_reason = "not_found"


class AlreadyExistsError(KeybrokerError):
    """What the request would create exists already (e.g. a recording id registered before)."""

    default_message = "already exists"
    default_reason = "already_exists"


class FailedPreconditionError(KeybrokerError):
    """The request is well-formed and permitted but the system state refuses it."""

    default_message = "failed precondition"
    default_reason = "failed_precondition"


class RetentionExpiredError(FailedPreconditionError):
    """The recording's retention period has passed."""

    default_message = "retention expired"
    default_reason = "retention_expired"


class RateLimitedError(KeybrokerError):
    """The caller made more calls than ``[limits]`` allows it; slow down and retry later."""

    default_message = "too many calls; slow down"
    default_reason = "rate_limited"


class UnavailableError(KeybrokerError):
    """A dependency the broker needs is not reachable right now; retrying later may work."""

    default_message = "service temporarily unavailable"
    default_reason = "unavailable"


class HsmUnavailableError(UnavailableError):
    """The HSM (module, token, session or login) is not usable right now."""

    default_message = "key store temporarily unavailable"
    default_reason = "hsm_unavailable"


class JournalUnavailableError(UnavailableError):
    """The audit journal cannot be written: the broker fails closed until it can."""

    default_message = "audit journal temporarily unavailable"
    default_reason = "journal_unavailable"


class StoreUnavailableError(UnavailableError):
    """The metadata store (SQLite file or PostgreSQL) cannot be reached right now."""

    default_message = "key metadata store temporarily unavailable"
    default_reason = "store_unavailable"


class KeyStateStaleError(UnavailableError):
    """A wrapped key names a key version this replica cannot resolve yet (made a moment ago on
    another replica or worker, not yet loaded here). Retrying shortly succeeds; it is never the
    blob's fault, so it is not "wrapped key is invalid"."""

    default_message = "key state not yet current on this replica; retry"
    default_reason = "key_state_stale"


class InternalError(KeybrokerError):
    """A bug or an unexpected state. Details go to the log, never to the caller."""

    default_message = "internal error"
    default_reason = "internal"


class RecordingIntegrityError(KeybrokerError):
    """An encrypted recording is damaged, truncated, reordered or tampered with.

    One message for every kind of defect; the only other message is "not a keybroker recording".
    """

    default_message = "recording is damaged or has been tampered with"
    default_reason = "recording_integrity"


class ConfigurationError(KeybrokerError):
    """Settings are missing or invalid. Raised at start-up only; names the key and the fix."""

    default_reason = "configuration"
