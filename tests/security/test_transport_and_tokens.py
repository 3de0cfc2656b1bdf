"""Regression tests for the fixes at the mTLS edge and in token verification (see
tests/security/README.md for how each test names the CHANGELOG entry it guards)."""

from __future__ import annotations

import shutil
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker.adapters.tokens import JwksKeys
from keybroker.devenv import DevEnv
from keybroker.errors import ConfigurationError
from tests.adapters.test_jwks_redirects import jwks, redirect_to, serve, server_tls
from tests.adapters.test_tokens import Issuer
from tests.conftest import load_settings
from tests.security.conftest import Start
from tests.security.support import Caller, new_id, refused
from tests.support.clients import generate_request


def _curl_generate(devenv: DevEnv, port: int, token: str, *tls: str) -> str:
    """One GenerateDataKey as raw gRPC over HTTP/2 with curl (which can cap TLS at 1.2); the
    response headers and trailers."""
    curl = shutil.which("curl")
    assert curl, "curl is installed by scripts/ensure-system-deps.sh --test"
    message = generate_request().SerializeToString()
    frame = b"\x00" + len(message).to_bytes(4, "big") + message
    done = subprocess.run(
        [curl, "-sS", "--http2", *tls, "--cacert", str(devenv.ca_cert),
         "--cert", str(devenv.cert("client")), "--key", str(devenv.key("client")),
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         "-H", f"authorization: Bearer {token}", "--data-binary", "@-",
         "-D", "-", "-o", "/dev/null",
         f"https://127.0.0.1:{port}/keybroker.v1.KeyBroker/GenerateDataKey"],
        input=frame, capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    return done.stdout.decode()


def test_mtls_is_mandatory_tls_below_1_3_is_refused_and_none_or_mixed_algorithms_do_not_start(
    devenv: DevEnv, start: Start
) -> None:
    """Unreleased, Security: "mTLS is mandatory and TLS below 1.3 is refused; `none` and mixed
    HMAC/public-key algorithm lists are rejected at start-up".

    No plaintext port and no call without a client certificate; a TLS 1.2 client gets
    PERMISSION_DENIED ``tls_version`` while the same call over TLS 1.3 succeeds; ``none`` and HMAC
    beside a public-key algorithm stop the settings from loading."""
    broker = start()
    target = f"127.0.0.1:{broker.port}"
    with grpc.insecure_channel(target) as plain, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
    no_cert = grpc.ssl_channel_credentials(root_certificates=devenv.ca_cert.read_bytes())
    with grpc.secure_channel(target, no_cert) as anonymous, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=5)
    caller = Caller(devenv, broker.port)
    try:
        token = caller.token(["keys:generate"])
    finally:
        caller.close()
    old = _curl_generate(devenv, broker.port, token, "--tlsv1.2", "--tls-max", "1.2")
    assert "grpc-status: 7" in old and "TLS 1.3 is required" in old
    assert "grpc-status: 0" in _curl_generate(devenv, broker.port, token, "--tlsv1.3")
    for algorithms in ("none", "ES256,none", "HS256,ES256", "RS256,HS512"):
        with pytest.raises(ConfigurationError, match=r"\[auth\] algorithms"):
            load_settings(devenv, auth_algorithms=algorithms)


def test_jwks_fetch_refuses_a_redirect_to_another_scheme_host_or_port(devenv: DevEnv) -> None:
    """Unreleased, Security: "The JWKS fetch no longer follows a redirect to another scheme, host
    or port".

    An https issuer URL answering 302 to plain http on the same host, or to another port, must
    not hand the broker the keys found there."""
    attacker = Issuer()
    attacker.add_key("evil")
    tls = server_tls(devenv)
    with serve(jwks(attacker)) as plain, serve(jwks(attacker), tls) as other_port:
        for target in (
            f"http://127.0.0.1:{plain}/jwks.json",
            f"https://127.0.0.1:{other_port}/jwks.json",
        ):
            with (
                serve(redirect_to(target), tls) as port,
                pytest.raises(ConfigurationError, match="redirect"),
            ):
                JwksKeys(url=f"https://127.0.0.1:{port}/jwks.json", ca_file=devenv.ca_cert)


def test_a_signed_token_with_a_string_nbf_is_refused(devenv: DevEnv, start: Start) -> None:
    """Unreleased, Fixed: "Found by fuzzing: a signed token whose `nbf` was a string of digits was
    accepted".

    A token correctly signed by the issuer, valid in every other claim, with ``"nbf": "<now>"``
    is UNAUTHENTICATED ``token_malformed``; the same token with a numeric ``nbf`` works."""
    broker = start()
    caller = Caller(devenv, broker.port)
    try:
        now = int(time.time()) - 5
        good = caller.token(["keys:generate"], extra_claims={"nbf": now})
        assert caller.generate(new_id(), token=good).wrapped_key
        bad = caller.token(["keys:generate"], extra_claims={"nbf": str(now)})
        code, _message, reason = refused(lambda: caller.generate(new_id(), token=bad))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "token_malformed")
    finally:
        caller.close()
