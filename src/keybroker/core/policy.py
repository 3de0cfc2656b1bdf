"""Authorization rules. Each check raises a domain error; none returns a boolean."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from keybroker.core.identity import Peer, Principal
from keybroker.core.wrapped_key import Bindings
from keybroker.errors import PermissionDeniedError, RetentionExpiredError

SCOPE_GENERATE = "keys:generate"
SCOPE_UNWRAP = "keys:unwrap"
SCOPE_REWRAP = "keys:rewrap"
SCOPE_ADMIN = "keys:admin"
MFA_METHOD = "mfa"

REQUIRED_TLS_VERSION = "TLSv1.3"


def require_tls13(peer: Peer) -> None:
    if peer.tls_version != REQUIRED_TLS_VERSION:
        raise PermissionDeniedError("TLS 1.3 is required", reason="tls_version")


def require_certificate_binding(principal: Principal, peer: Peer, *, mandatory: bool) -> None:
    """RFC 8705: a token bound to a certificate is only good over a connection with that one."""
    if principal.cnf_thumbprint is None:
        if mandatory:
            raise PermissionDeniedError(
                "token must be bound to the client certificate (cnf)", reason="cnf_missing"
            )
        return
    if principal.cnf_thumbprint != peer.thumbprint:
        raise PermissionDeniedError(
            "token is bound to another client certificate", reason="cnf_mismatch"
        )


def require_scope(principal: Principal, scope: str) -> None:
    if scope not in principal.scopes:
        raise PermissionDeniedError(f"token lacks scope {scope}", reason="scope_missing")


def require_purposes_granted(principal: Principal, purposes: Iterable[str]) -> None:
    for purpose in purposes:
        if purpose not in principal.purposes:
            raise PermissionDeniedError(
                f"purpose {purpose!r} is not granted by the token", reason="purpose_not_granted"
            )


def require_purpose_bound(bindings: Bindings, purpose: str) -> None:
    if purpose not in bindings.purposes:
        raise PermissionDeniedError(
            f"purpose {purpose!r} is not among the recording's purposes",
            reason="purpose_not_bound",
        )


def require_recording(bindings: Bindings, recording_id: str) -> None:
    if recording_id != bindings.recording_id:
        raise PermissionDeniedError(
            "recording_id does not match the wrapped key", reason="recording_mismatch"
        )


def require_context(bindings: Bindings, context: Mapping[str, str]) -> None:
    if dict(context) != bindings.context_map:
        raise PermissionDeniedError(
            "context does not match the wrapped key", reason="context_mismatch"
        )


def require_retention(bindings: Bindings, now: float) -> None:
    if now > bindings.retain_until:
        raise RetentionExpiredError


def require_admin(principal: Principal, *, mfa_required: bool) -> None:
    """Administrative access: scope ``keys:admin`` and, unless turned off, ``amr`` with ``mfa``."""
    require_scope(principal, SCOPE_ADMIN)
    if mfa_required and MFA_METHOD not in principal.amr:
        raise PermissionDeniedError(
            "administrative access needs multi-factor authentication (amr must contain 'mfa')",
            reason="mfa_required",
        )
