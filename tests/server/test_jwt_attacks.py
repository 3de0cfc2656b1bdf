"""JWT attack suite against the real server: every forged or misused token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from opentelemetry.sdk.trace import ReadableSpan

from keybroker.devenv import DevEnv, signing_kid
from keybroker.server.app import RunningBroker
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from tests.conftest import TokenFactory, code_of
from tests.support.clients import auth, channel, generate_request, stub

Spans = Callable[[], Sequence[ReadableSpan]]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "https://issuer.keybroker.dev",
        "aud": "keybroker",
        "sub": "attacker",
        "jti": "j-1",
        "iat": now,
        "exp": now + 600,
        "scope": "keys:generate keys:unwrap",
        "purpose": ["support"],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _unsigned(claims: dict[str, Any], kid: str) -> str:
    header = {"alg": "none", "typ": "at+jwt", "kid": kid}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def _hs256_with_public_key(env: DevEnv) -> str:
    """Algorithm confusion: HS256 'signed' with the issuer's public key bytes."""
    jwk = json.loads(env.jwks.read_text())["keys"][0]
    public = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(jwk))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "at+jwt", "kid": signing_kid(env)}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def _sign(env: DevEnv, claims: dict[str, Any], **header: Any) -> str:
    """Sign with the real issuer key; header values set to None are left out."""
    key = serialization.load_pem_private_key(env.signing_key.read_bytes(), password=None)
    headers = {"typ": "at+jwt", "kid": signing_kid(env), **header}
    return jwt.encode(claims, key, algorithm="ES256", headers=headers)  # type: ignore[arg-type]


def _foreign_key(env: DevEnv, kid: str | None = None) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(
        _claims(), key, algorithm="ES256", headers={"typ": "at+jwt", "kid": kid or signing_kid(env)}
    )


def _tamper_payload(token: str) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{_b64(json.dumps(_claims(scope='keys:admin')).encode())}.{signature}"


ATTACKS: dict[str, tuple[Callable[[DevEnv, TokenFactory], str], str]] = {
    "alg_none": (lambda env, tok: _unsigned(_claims(), signing_kid(env)), "alg_not_allowed"),
    "hs256_with_public_key": (lambda env, tok: _hs256_with_public_key(env), "alg_not_allowed"),
    "wrong_audience": (lambda env, tok: tok(extra_claims={"aud": "someone-else"}), "bad_audience"),
    "wrong_issuer": (
        lambda env, tok: tok(extra_claims={"iss": "https://evil.example"}),
        "bad_issuer",
    ),
    "wrong_typ": (lambda env, tok: tok(headers={"typ": "JWT"}), "bad_typ"),
    "missing_typ": (lambda env, tok: _sign(env, _claims(), typ=None), "bad_typ"),
    "expired": (lambda env, tok: tok(now=time.time() - 7200, lifetime=600), "token_expired"),
    "nbf_in_future": (
        lambda env, tok: tok(extra_claims={"nbf": int(time.time()) + 3600}),
        "token_not_yet_valid",
    ),
    "iat_in_future": (lambda env, tok: tok(now=time.time() + 3600), "token_not_yet_valid"),
    "lifetime_over_maximum": (lambda env, tok: tok(lifetime=2 * 86400), "lifetime_exceeded"),
    "missing_jti": (lambda env, tok: _sign(env, _claims(jti=None)), "missing_claim"),
    "missing_sub": (lambda env, tok: _sign(env, _claims(sub=None)), "missing_claim"),
    "missing_exp": (lambda env, tok: _sign(env, _claims(exp=None)), "missing_claim"),
    "foreign_signing_key": (lambda env, tok: _foreign_key(env), "bad_signature"),
    "unknown_kid": (lambda env, tok: _foreign_key(env, kid="not-a-known-kid"), "unknown_kid"),
    "malformed": (lambda env, tok: "not.a.jwt", "token_malformed"),
    "tampered_payload": (lambda env, tok: _tamper_payload(tok()), "bad_signature"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_token_is_unauthenticated(
    attack: str, devenv: DevEnv, kb: pb_grpc.KeyBrokerStub, token: TokenFactory, spans: Spans
) -> None:
    """Each forged, expired, misdirected or malformed token gets UNAUTHENTICATED and a deny span."""
    build, reason = ATTACKS[attack]
    forged = build(devenv, token)
    code, message = code_of(lambda: kb.GenerateDataKey(generate_request(), metadata=auth(forged)))
    assert code is grpc.StatusCode.UNAUTHENTICATED, message
    attrs = spans()[-1].attributes or {}
    assert attrs["keybroker.decision"] == "deny"
    assert attrs["keybroker.reason"] == reason
    assert forged not in message


def test_wrong_authorization_scheme_is_unauthenticated(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """Only 'Bearer <token>' is accepted."""
    code, _ = code_of(
        lambda: kb.GenerateDataKey(
            generate_request(), metadata=[("authorization", f"Basic {token()}")]
        )
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED


def test_scope_and_purpose_claims_are_enforced(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """A valid token lacking the scope or the purpose is PERMISSION_DENIED (not UNAUTHENTICATED)."""
    code, _ = code_of(
        lambda: kb.GenerateDataKey(generate_request(), metadata=auth(token(scopes=["keys:unwrap"])))
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    code, _ = code_of(
        lambda: kb.GenerateDataKey(generate_request(), metadata=auth(token(purposes=["billing"])))
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_purpose_claim_may_be_a_string(kb: pb_grpc.KeyBrokerStub, token: TokenFactory) -> None:
    """`purpose` is a string or an array."""
    t = token(purposes=[], extra_claims={"purpose": "support"})
    assert len(kb.GenerateDataKey(generate_request(), metadata=auth(t)).data_key) == 32


def test_cnf_bound_token_works_on_its_certificate(
    devenv: DevEnv, kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """A token bound to the dev client certificate is accepted over that certificate."""
    t = token(cnf_cert=devenv.cert("client"))
    assert len(kb.GenerateDataKey(generate_request(), metadata=auth(t)).data_key) == 32


def test_cnf_naming_another_certificate_is_denied(
    devenv: DevEnv, kb: pb_grpc.KeyBrokerStub, token: TokenFactory, spans: Spans
) -> None:
    """A token whose cnf names another certificate is refused on this connection."""
    t = token(cnf_cert=devenv.cert("client2"))
    code, _ = code_of(lambda: kb.GenerateDataKey(generate_request(), metadata=auth(t)))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert (spans()[-1].attributes or {})["keybroker.reason"] == "cnf_mismatch"


def test_cnf_token_replayed_over_another_certificate_is_denied(
    devenv: DevEnv, broker: RunningBroker, kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """A bound token that works (and is cached) on its own certificate is refused over another one."""
    t = token(cnf_cert=devenv.cert("client"))
    kb.GenerateDataKey(generate_request(), metadata=auth(t))  # now in the verified-token cache
    with channel(devenv, broker.port, cert="client2") as ch:
        code, _ = code_of(lambda: stub(ch).GenerateDataKey(generate_request(), metadata=auth(t)))
    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_unbound_token_works_over_any_client_certificate(
    devenv: DevEnv, broker: RunningBroker, token: TokenFactory
) -> None:
    """Without cnf (and require_cnf off), a token is a bearer token over any trusted certificate."""
    with channel(devenv, broker.port, cert="client2") as ch:
        assert (
            len(stub(ch).GenerateDataKey(generate_request(), metadata=auth(token())).data_key) == 32
        )
