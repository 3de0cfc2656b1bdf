"""The JWKS fetch never follows a redirect to another scheme, host or port (issue #14, item 14):
an issuer URL that answers 302 to ``http://`` or to another host would hand the broker signing
keys nobody vouched for. Real HTTPS servers on the loopback, the dev server certificate."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from keybroker.adapters.tokens import JwksKeys, TokenVerifier
from keybroker.devenv import DevEnv
from keybroker.errors import ConfigurationError
from tests.adapters.test_tokens import Issuer, settings

Route = Callable[[str], tuple[int, dict[str, str], bytes]]


@contextmanager
def serve(route: Route, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """An HTTP(S) server on 127.0.0.1 answering every GET with ``route(path)``; its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = route(self.path)
            self.send_response(status)
            for name, value in {**headers, "content-length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def server_tls(devenv: DevEnv) -> ssl.SSLContext:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(devenv.cert("server"), devenv.key("server"))
    return tls


def jwks(issuer: Issuer) -> Route:
    body = json.dumps(issuer.jwks()).encode()
    return lambda _path: (200, {"content-type": "application/json"}, body)


def redirect_to(url: str) -> Route:
    return lambda _path: (302, {"location": url}, b"")


@pytest.fixture
def attacker() -> Issuer:
    """Keys the issuer never published."""
    issuer = Issuer()
    issuer.add_key("evil")
    return issuer


def test_redirect_to_plain_http_is_refused(devenv: DevEnv, attacker: Issuer) -> None:
    """https://issuer -> 302 -> http://… (the same host): refused, the attacker's keys never load."""
    with (
        serve(jwks(attacker)) as plain,
        serve(redirect_to(f"http://127.0.0.1:{plain}/jwks.json"), server_tls(devenv)) as port,
        pytest.raises(ConfigurationError, match="another scheme, host or port refused"),
    ):
        JwksKeys(url=f"https://127.0.0.1:{port}/jwks.json", ca_file=devenv.ca_cert)


def test_redirect_to_another_host_is_refused(devenv: DevEnv, attacker: Issuer) -> None:
    """https://127.0.0.1 -> 302 -> https://localhost (valid TLS, another host): refused."""
    tls = server_tls(devenv)
    with (
        serve(jwks(attacker), tls) as other,
        serve(redirect_to(f"https://localhost:{other}/jwks.json"), tls) as port,
        pytest.raises(ConfigurationError, match="another scheme, host or port refused"),
    ):
        JwksKeys(url=f"https://127.0.0.1:{port}/jwks.json", ca_file=devenv.ca_cert)


def test_redirect_within_the_same_origin_is_followed(devenv: DevEnv) -> None:
    """A redirect to another path of the same https origin still works (keys rotate by path)."""
    issuer = Issuer()
    issuer.add_key("k1")
    body = json.dumps(issuer.jwks()).encode()

    def route(path: str) -> tuple[int, dict[str, str], bytes]:
        if path == "/jwks.json":
            return 302, {"location": "/keys/2026.json"}, b""
        return 200, {"content-type": "application/json"}, body

    with serve(route, server_tls(devenv)) as port:
        keys = JwksKeys(url=f"https://127.0.0.1:{port}/jwks.json", ca_file=devenv.ca_cert)
    assert TokenVerifier(settings(), keys).verify(issuer.token("k1")).subject == "svc"
