"""Token verifier and JWKS source against real signatures: rotation at the issuer, refresh rate
limits, JWKS over https, and the verified-token cache bounds."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.adapters.tokens import JwksKeys, TokenVerifier
from keybroker.devenv import AUDIENCE, ISSUER, DevEnv
from keybroker.errors import AuthenticationError, ConfigurationError
from keybroker.settings import AuthSettings


class Issuer:
    """A test identity provider: signing keys and the JWKS document it publishes."""

    def __init__(self) -> None:
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}

    def add_key(self, kid: str) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
            jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
            out.append(jwk)
        return {"keys": out}

    def token(self, kid: str, lifetime: int = 600, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "svc",
            "jti": f"j{now}{kid}",
            "iat": now,
            "exp": now + lifetime,
        }
        body.update(claims)
        return jwt.encode(
            body, self.keys[kid], algorithm="ES256", headers={"typ": "at+jwt", "kid": kid}
        )


def settings(**kw: Any) -> AuthSettings:
    return AuthSettings(issuer=ISSUER, audience=AUDIENCE, **kw)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_issuer_key_rotation_is_picked_up_from_the_file(tmp_path: Path) -> None:
    """A token signed with a new kid is accepted once the JWKS file has it; refreshes are rate-limited."""
    issuer = Issuer()
    issuer.add_key("k1")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    clock = FakeMonotonic()
    keys = JwksKeys(file=path, min_interval=30, monotonic=clock)
    verifier = TokenVerifier(settings(), keys)
    assert verifier.verify(issuer.token("k1")).subject == "svc"

    issuer.add_key("k2")
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(issuer.token("k2"))  # file not yet updated; this also spends the refresh
    assert info.value.reason == "unknown_kid"
    path.write_text(json.dumps(issuer.jwks()))
    with pytest.raises(AuthenticationError):
        verifier.verify(issuer.token("k2"))  # within the refresh interval: no re-read
    clock.now += 31
    assert verifier.verify(issuer.token("k2")).subject == "svc"


@pytest.fixture
def https_jwks(devenv: DevEnv) -> Iterator[tuple[str, Issuer]]:
    """The issuer's JWKS served over https on 127.0.0.1 with the dev server certificate."""
    issuer = Issuer()
    issuer.add_key("u1")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(issuer.jwks()).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(devenv.cert("server"), devenv.key("server"))
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/jwks.json", issuer
    server.shutdown()
    server.server_close()


def test_jwks_url_is_fetched_and_refreshed_in_the_background(
    devenv: DevEnv, https_jwks: tuple[str, Issuer]
) -> None:
    """JWKS from an https URL; an unknown kid is refused at once while a background refresh runs."""
    url, issuer = https_jwks
    keys = JwksKeys(url=url, ca_file=devenv.ca_cert, min_interval=0)
    verifier = TokenVerifier(settings(), keys)
    assert verifier.verify(issuer.token("u1")).subject == "svc"
    issuer.add_key("u2")
    token = issuer.token("u2")
    started = time.monotonic()
    with pytest.raises(AuthenticationError):
        verifier.verify(token)
    assert time.monotonic() - started < 0.5, "an unknown kid must not block the call on a fetch"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            assert verifier.verify(token).subject == "svc"
            break
        except AuthenticationError:
            time.sleep(0.05)
    else:
        pytest.fail("the background refresh never made the new key usable")


def test_jwks_url_with_untrusted_certificate_fails_fast(https_jwks: tuple[str, Issuer]) -> None:
    """Without the right CA the JWKS fetch fails at start-up with a configuration error."""
    url, _ = https_jwks
    with pytest.raises(ConfigurationError):
        JwksKeys(url=url)


def test_cache_never_serves_a_token_past_exp(tmp_path: Path) -> None:
    """A cached principal is dropped at exp: the token is verified again (and refused)."""
    issuer = Issuer()
    issuer.add_key("k1")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    now = [time.time()]
    verifier = TokenVerifier(settings(leeway=0), JwksKeys(file=path), clock=lambda: now[0])
    token = issuer.token("k1", lifetime=2)
    verifier.verify(token)
    now[0] += 5
    time.sleep(2.1)
    with pytest.raises(AuthenticationError) as info:
        verifier.verify(token)
    assert info.value.reason == "token_expired"


def test_cache_is_bounded(tmp_path: Path) -> None:
    """The cache keeps at most token_cache_size entries."""
    issuer = Issuer()
    issuer.add_key("k1")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    verifier = TokenVerifier(settings(token_cache_size=3), JwksKeys(file=path))
    for i in range(10):
        verifier.verify(issuer.token("k1", jti=f"t{i}"))
    assert len(verifier._cache) == 3


def test_claims_of_the_wrong_type_are_refused(tmp_path: Path) -> None:
    """scope must be a string; purpose a string or list of strings; cnf an object; nbf a number
    (found by fuzzing: PyJWT reads "nbf": "222" as 222)."""
    issuer = Issuer()
    issuer.add_key("k1")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    verifier = TokenVerifier(settings(), JwksKeys(file=path))
    for claims in (
        {"scope": ["keys:unwrap"]},
        {"purpose": [1]},
        {"cnf": "x"},
        {"amr": "mfa"},
        {"nbf": "222"},
    ):
        with pytest.raises(AuthenticationError) as info:
            verifier.verify(issuer.token("k1", **claims))
        assert info.value.reason == "token_malformed"


def test_typ_check_can_be_turned_off(tmp_path: Path) -> None:
    """For issuers that cannot set typ=at+jwt, token_type = "" disables the check."""
    issuer = Issuer()
    issuer.add_key("k1")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "s", "jti": "j", "iat": int(time.time()), "exp": int(time.time()) + 60},
        issuer.keys["k1"], algorithm="ES256", headers={"kid": "k1"},
    )  # fmt: skip
    with pytest.raises(AuthenticationError):
        TokenVerifier(settings(), JwksKeys(file=path)).verify(token)
    assert TokenVerifier(settings(token_type=""), JwksKeys(file=path)).verify(token).subject == "s"
