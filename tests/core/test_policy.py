"""Authorization rules: each check raises the right error and reason, and returns nothing."""

from __future__ import annotations

import pytest

from keybroker.core import policy
from keybroker.core.identity import Peer, Principal
from keybroker.core.wrapped_key import Bindings
from keybroker.errors import PermissionDeniedError, RetentionExpiredError

THUMBPRINT = "mTF9L1N3M0d1wQ2bGqSJvPpT6Yx5nA8cR4eZ0kW7hUo"
OTHER_THUMBPRINT = "Zx0Y1w2V3u4T5s6R7q8P9o0N1m2L3k4J5i6H7g8F9e0"


def principal(
    *,
    scopes: frozenset[str] = frozenset({policy.SCOPE_UNWRAP}),
    purposes: frozenset[str] = frozenset({"support"}),
    cnf: str | None = None,
) -> Principal:
    return Principal(
        subject="storage-1",
        token_id="jti-1",
        expires_at=2_000_000_000,
        scopes=scopes,
        purposes=purposes,
        cnf_thumbprint=cnf,
    )


def peer(*, tls_version: str = "TLSv1.3", thumbprint: str = THUMBPRINT) -> Peer:
    return Peer(
        address="ipv4:127.0.0.1:5000",
        identity="spiffe://keybroker.dev/storage/dev",
        thumbprint=thumbprint,
        tls_version=tls_version,
    )


def bindings(retain_until: int = 1_800_000_000) -> Bindings:
    return Bindings.create(
        recording_id="rec-1",
        purposes=["support", "quality"],
        subject_ids=[],
        retain_until=retain_until,
        context={"tenant": "acme"},
    )


def reason_of(exc: pytest.ExceptionInfo[PermissionDeniedError]) -> str:
    return exc.value.reason


# -- TLS --------------------------------------------------------------------------------------


def test_tls13_is_accepted() -> None:
    """A TLS 1.3 peer passes (the check returns None; it never returns a boolean)."""
    assert policy.require_tls13(peer(tls_version="TLSv1.3")) is None  # type: ignore[func-returns-value]


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.1", "TLSv1", "", "tlsv1.3", "TLSv1.3 "])
def test_anything_but_tls13_is_denied(version: str) -> None:
    """Only the exact string 'TLSv1.3' passes; anything else is denied with reason tls_version."""
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_tls13(peer(tls_version=version))
    assert reason_of(info) == "tls_version"


# -- certificate binding (RFC 8705 cnf) -------------------------------------------------------


def test_unbound_token_passes_when_binding_optional() -> None:
    """A token without cnf is accepted when binding is not mandatory."""
    policy.require_certificate_binding(principal(cnf=None), peer(), mandatory=False)


def test_unbound_token_denied_when_binding_mandatory() -> None:
    """A token without cnf is denied (cnf_missing) when binding is mandatory."""
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_certificate_binding(principal(cnf=None), peer(), mandatory=True)
    assert reason_of(info) == "cnf_missing"


@pytest.mark.parametrize("mandatory", [False, True])
def test_bound_token_over_its_certificate_passes(mandatory: bool) -> None:
    """A token bound to the peer's certificate passes, mandatory or not."""
    policy.require_certificate_binding(principal(cnf=THUMBPRINT), peer(), mandatory=mandatory)


@pytest.mark.parametrize("mandatory", [False, True])
@pytest.mark.parametrize(
    "cnf", [OTHER_THUMBPRINT, THUMBPRINT.lower(), THUMBPRINT + "=", ""], ids=str
)
def test_bound_token_over_another_certificate_is_denied(mandatory: bool, cnf: str) -> None:
    """A token bound to another certificate is denied (cnf_mismatch), even if binding is optional.

    The comparison is exact: no case folding, no padding tolerance.
    """
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_certificate_binding(principal(cnf=cnf), peer(), mandatory=mandatory)
    assert reason_of(info) == "cnf_mismatch"


# -- scopes and purposes ----------------------------------------------------------------------


@pytest.mark.parametrize("scope", [policy.SCOPE_GENERATE, policy.SCOPE_UNWRAP, policy.SCOPE_REWRAP])
def test_missing_scope_is_denied(scope: str) -> None:
    """Each operation's scope must be in the token (scope_missing otherwise)."""
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_scope(principal(scopes=frozenset({"keys:other"})), scope)
    assert reason_of(info) == "scope_missing"
    policy.require_scope(principal(scopes=frozenset({scope})), scope)


def test_scope_names() -> None:
    """The scope strings are part of the contract with token issuers."""
    assert (policy.SCOPE_GENERATE, policy.SCOPE_UNWRAP, policy.SCOPE_REWRAP) == (
        "keys:generate",
        "keys:unwrap",
        "keys:rewrap",
    )


def test_purposes_granted() -> None:
    """Every requested purpose must be granted; one missing is enough to deny."""
    who = principal(purposes=frozenset({"support", "quality"}))
    policy.require_purposes_granted(who, ["support", "quality"])
    policy.require_purposes_granted(who, [])
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_purposes_granted(who, ["support", "billing"])
    assert reason_of(info) == "purpose_not_granted"


def test_purpose_bound() -> None:
    """The purpose must be one of the recording's bound purposes."""
    policy.require_purpose_bound(bindings(), "quality")
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_purpose_bound(bindings(), "billing")
    assert reason_of(info) == "purpose_not_bound"


# -- bindings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("recording_id", ["rec-2", "", "REC-1", "rec-1 "])
def test_recording_mismatch(recording_id: str) -> None:
    """Only the exact recording id matches."""
    policy.require_recording(bindings(), "rec-1")
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_recording(bindings(), recording_id)
    assert reason_of(info) == "recording_mismatch"


@pytest.mark.parametrize(
    "context",
    [{}, {"tenant": "ACME"}, {"tenant": "acme", "x": ""}, {"tenant ": "acme"}],
    ids=["empty", "value_case", "extra_key", "key_space"],
)
def test_context_mismatch(context: dict[str, str]) -> None:
    """The context must equal the bound one exactly."""
    policy.require_context(bindings(), {"tenant": "acme"})
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_context(bindings(), context)
    assert reason_of(info) == "context_mismatch"


def test_retention() -> None:
    """Allowed up to and including retain_until; RetentionExpiredError after it."""
    b = bindings(retain_until=1_800_000_000)
    policy.require_retention(b, 1_799_999_999.9)
    policy.require_retention(b, 1_800_000_000.0)
    with pytest.raises(RetentionExpiredError) as info:
        policy.require_retention(b, 1_800_000_000.001)
    assert info.value.reason == "retention_expired"


def test_every_denial_is_a_permission_error_with_a_public_message() -> None:
    """Denials carry a message safe for the caller: it never echoes the token's thumbprint."""
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_certificate_binding(principal(cnf=OTHER_THUMBPRINT), peer(), mandatory=False)
    assert OTHER_THUMBPRINT not in str(info.value)
    assert THUMBPRINT not in str(info.value)
