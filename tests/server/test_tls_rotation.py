"""Server certificate, key and client CA bundle renewed on disk without a restart (issue #15,
item 5): real mTLS on the loopback, the server loop with the broker's reloading credentials
(keybroker.server.tls_reload), and certificates issued for each test.

A renewed certificate is served to new connections while a call on an existing connection goes
on; files that cannot be used leave the previous ones in service, with a warning that names the
problem and never the key; the client CA bundle follows its file too; a certificate about to
expire shows in the log and in the ``keybroker.tls.certificate.expires_in`` gauge."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from keybroker.adapters.metrics import observe_certificate_expiry
from keybroker.devenv import DevEnv, issue_cert, make_ca
from keybroker.errors import ConfigurationError
from keybroker.server.app import create_server
from keybroker.server.handlers import HandlerRegistry
from keybroker.server.loop import LoopOptions, LoopServer
from keybroker.server.tls_reload import ServerTls
from keybroker.settings import TlsSettings
from tests.adapters.test_tokens import Issuer
from tests.conftest import TokenFactory, load_settings
from tests.support.clients import auth, generate_request, stub

SERVICE = "test.Rotation"


@dataclass
class Files:
    """The server's TLS files in a directory of the test's own."""

    cert: Path
    key: Path
    ca: Path

    @property
    def settings(self) -> TlsSettings:
        return TlsSettings(cert_file=self.cert, key_file=self.key, client_ca_file=self.ca)


def replace(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, as cert-manager and a Kubernetes secret volume do."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def issue(
    ca: tuple[Path, Path],
    directory: Path,
    cn: str,
    *,
    server: bool = True,
    lifetime: dt.timedelta | None = None,
    age: dt.timedelta = dt.timedelta(minutes=1),
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new certificate from ``ca`` = (cert, key) paths; with
    ``lifetime``, valid from ``age`` ago for that long."""
    cert_path, key_path = directory / f"{cn}.pem", directory / f"{cn}.key"
    if lifetime is None:
        issue_cert(ca[0], ca[1], cert_path, key_path, cn=cn, server=server)
        return cert_path.read_bytes(), key_path.read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key: Any = serialization.load_pem_private_key(ca[1].read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - age)
        .not_valid_after(now - age + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def files(devenv: DevEnv, tmp_path: Path) -> Files:
    d = tmp_path / "tls"
    d.mkdir()
    out = Files(d / "server.pem", d / "server.key", d / "client-ca.pem")
    shutil.copy(devenv.cert("server"), out.cert)
    shutil.copy(devenv.key("server"), out.key)
    shutil.copy(devenv.ca_cert, out.ca)
    return out


@pytest.fixture
def new_ca(tmp_path: Path) -> tuple[Path, Path]:
    """A CA nobody trusted before the test: what a renewed certificate is issued by."""
    d = tmp_path / "new-ca"
    make_ca(d / "ca.pem", d / "ca.key", cn="renewal CA")
    return d / "ca.pem", d / "ca.key"


class Slow:
    """A handler that holds its call until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.started.set()
        self.release.wait(10)
        return b"slow:" + request

    @staticmethod
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo:" + request


@pytest.fixture
def served(files: Files) -> Iterator[tuple[ServerTls, int, Slow]]:
    """The server loop on 127.0.0.1 with reloading credentials over ``files``."""
    handler = Slow()
    registry = HandlerRegistry()
    registry.add_registered_method_handlers(
        SERVICE,
        {
            "Slow": grpc.unary_unary_rpc_method_handler(handler.slow),
            "Echo": grpc.unary_unary_rpc_method_handler(handler.echo),
        },
    )
    server = LoopServer(registry, inline=frozenset(), options=LoopOptions(pool_threads=2))
    tls = ServerTls(files.settings, check_every=0)
    port = server.add_secure_port("127.0.0.1:0", tls.credentials())
    server.start()
    try:
        yield tls, port, handler
    finally:
        handler.release.set()
        assert server.stop(None).wait(10)


def served_certificate(port: int) -> x509.Certificate:
    """The certificate the server presents to a new TLS connection (not verified here)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def mtls_channel(port: int, root: bytes, cert: bytes, key: bytes) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(
        f"127.0.0.1:{port}",
        creds,
        options=[
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def call(ch: grpc.Channel, method: str, request: bytes = b"x", timeout: float = 5) -> Any:
    stub = ch.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
    )
    return stub(request, timeout=timeout)


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(
    devenv: DevEnv, files: Files, new_ca: tuple[Path, Path], tmp_path: Path,
    served: tuple[ServerTls, int, Slow],
) -> None:  # fmt: skip
    """The acceptance test: cert and key replaced on disk (by a certificate of a CA the client
    did not trust before); the next connection gets it, verified against the new CA alone; a
    call in flight on an existing connection is unaffected and that connection keeps working."""
    tls, port, handler = served
    client = devenv.cert("client").read_bytes(), devenv.key("client").read_bytes()
    old = served_certificate(port)
    assert common_name(old) == "keybroker"

    before = mtls_channel(port, devenv.ca_cert.read_bytes(), *client)
    assert call(before, "Echo") == b"echo:x"
    pool = futures.ThreadPoolExecutor(1)
    in_flight = pool.submit(call, before, "Slow", b"held", 10)
    assert handler.started.wait(5)

    cert, key = issue(new_ca, tmp_path, "keybroker-renewed")
    replace(files.key, key)
    replace(files.cert, cert)

    renewed = served_certificate(port)
    assert common_name(renewed) == "keybroker-renewed"
    assert renewed.serial_number != old.serial_number
    with mtls_channel(port, new_ca[0].read_bytes(), *client) as after:
        assert call(after, "Echo") == b"echo:x"
    with mtls_channel(port, devenv.ca_cert.read_bytes(), *client) as stale:
        with pytest.raises(grpc.RpcError) as info:
            call(stale, "Echo")
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE

    handler.release.set()
    assert in_flight.result(10) == b"slow:held"
    assert call(before, "Echo") == b"echo:x"  # the existing connection is still up
    before.close()
    pool.shutdown()
    assert tls.material.cert_pem == cert


@pytest.mark.parametrize(
    "damage",
    ["key of another certificate", "truncated certificate", "expired certificate", "no file"],
)
def test_files_that_cannot_be_used_leave_the_previous_ones_in_service(
    devenv: DevEnv, files: Files, tmp_path: Path, served: tuple[ServerTls, int, Slow],
    caplog: pytest.LogCaptureFixture, damage: str,
) -> None:  # fmt: skip
    """Bad new files are refused with a warning naming the problem (never the key), the old
    certificate is still served, and once the files are right they are taken into use."""
    _tls, port, _handler = served
    old = served_certificate(port)
    cert, key = issue((devenv.ca_cert, devenv.ca_key), tmp_path, "keybroker-next")
    with caplog.at_level(logging.INFO, logger="keybroker.server.tls_reload"):
        if damage == "key of another certificate":
            replace(files.cert, cert)  # the key is not there yet
            expected = "does not match the certificate"
        elif damage == "truncated certificate":
            replace(files.cert, cert[: len(cert) // 2])
            expected = "not a valid PEM certificate"
        elif damage == "expired certificate":
            expired, expired_key = issue(
                (devenv.ca_cert, devenv.ca_key), tmp_path, "gone", lifetime=dt.timedelta(seconds=30)
            )
            replace(files.key, expired_key)
            replace(files.cert, expired)
            expected = "expired on"
        else:
            files.cert.unlink()
            expected = "cannot read"
        assert served_certificate(port).serial_number == old.serial_number
        with mtls_channel(
            port, devenv.ca_cert.read_bytes(), devenv.cert("client").read_bytes(),
            devenv.key("client").read_bytes(),
        ) as ch:  # fmt: skip
            assert call(ch, "Echo") == b"echo:x"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert expected in warnings[0]
        assert "still get the previous certificate" in warnings[0]
        assert all(b"PRIVATE" not in r.getMessage().encode() for r in caplog.records)
        assert key.decode() not in caplog.text

        served_certificate(port)  # the same bad files again: no second warning
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

        replace(files.key, key)
        replace(files.cert, cert)
        assert common_name(served_certificate(port)) == "keybroker-next"
        assert any("re-read the TLS files" in r.getMessage() for r in caplog.records)


def test_the_client_ca_bundle_follows_its_file(
    devenv: DevEnv, files: Files, new_ca: tuple[Path, Path], tmp_path: Path,
    served: tuple[ServerTls, int, Slow],
) -> None:  # fmt: skip
    """A client certificate of a new CA is refused until the bundle has that CA, then accepted
    on a new connection; the old CA, dropped from the bundle, is refused from then on."""
    _tls, port, _handler = served
    root = devenv.ca_cert.read_bytes()
    newcomer = issue(new_ca, tmp_path, "new-client", server=False)
    veteran = devenv.cert("client").read_bytes(), devenv.key("client").read_bytes()
    with mtls_channel(port, root, *newcomer) as ch, pytest.raises(grpc.RpcError):
        call(ch, "Echo")

    replace(files.ca, new_ca[0].read_bytes())
    with mtls_channel(port, root, *newcomer) as ch:
        assert call(ch, "Echo") == b"echo:x"
    with mtls_channel(port, root, *veteran) as ch, pytest.raises(grpc.RpcError):
        call(ch, "Echo")


def test_the_files_are_checked_at_most_once_per_interval(files: Files, devenv: DevEnv) -> None:
    """Each handshake asks for the files, but their stat is looked at once per check_every."""
    now = [100.0]
    tls = ServerTls(files.settings, check_every=1.0, monotonic=lambda: now[0])
    original = tls.material
    replace(files.cert, devenv.cert("client2").read_bytes())
    replace(files.key, devenv.key("client2").read_bytes())
    assert tls.fetch() is None  # within the interval: the files are not looked at
    assert tls.material is original
    now[0] += 1.0
    assert tls.fetch() is not None  # changed: the new configuration, once
    assert tls.fetch() is None
    assert tls.material.cert_pem == devenv.cert("client2").read_bytes()


def test_start_up_still_fails_on_bad_files(files: Files) -> None:
    """Unusable files at start are a configuration error, as before: nothing to fall back on."""
    files.key.write_bytes(b"not a key")
    with pytest.raises(ConfigurationError, match="holds no PEM private key"):
        ServerTls(files.settings)


def expiry_gauge(tls: ServerTls) -> dict[str, float]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    try:
        observe_certificate_expiry(provider, tls.expires_in)
        data = reader.get_metrics_data()
        assert data is not None
        return {
            str((point.attributes or {})["certificate"]): point.value  # type: ignore[union-attr]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "keybroker.tls.certificate.expires_in"
            for point in metric.data.data_points
        }
    finally:
        provider.shutdown()


def test_an_expiring_certificate_shows_in_the_log_and_the_gauge(
    devenv: DevEnv, files: Files, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """7 days ahead: a warning at start and on every reload (then hourly), and the gauge says
    how long is left, for the server certificate and the client CA bundle."""
    ca = (devenv.ca_cert, devenv.ca_key)
    cert, key = issue(
        ca, tmp_path, "soon", lifetime=dt.timedelta(days=90), age=dt.timedelta(days=84)
    )
    replace(files.cert, cert)
    replace(files.key, key)
    now = [1000.0]
    with caplog.at_level(logging.WARNING, logger="keybroker.server.tls_reload"):
        tls = ServerTls(files.settings, monotonic=lambda: now[0])
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1, messages
        assert "the server certificate in" in messages[0]
        assert "expires in 5 d 23 h" in messages[0]

        tls.probe()  # within the hour: no repeat
        assert len(caplog.records) == 1
        now[0] += 3600
        tls.probe()
        assert len(caplog.records) == 2

    gauge = expiry_gauge(tls)
    assert 6 * 86400 - 60 < gauge["server"] <= 6 * 86400
    ca_expiry = x509.load_pem_x509_certificate(devenv.ca_cert.read_bytes()).not_valid_after_utc
    assert abs(gauge["client_ca"] - (ca_expiry.timestamp() - time.time())) < 60

    renewed, renewed_key = issue(ca, tmp_path, "renewed", lifetime=dt.timedelta(days=90))
    replace(files.key, renewed_key)
    replace(files.cert, renewed)
    now[0] += 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keybroker.server.tls_reload"):
        assert tls.check()
        assert caplog.records == []  # renewed: nothing to warn about
    assert expiry_gauge(tls)["server"] > 89 * 86400


def test_a_short_lived_certificate_is_warned_about_only_when_its_renewal_is_late(
    devenv: DevEnv, files: Files, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1-hour certificate (SPIRE, cert-manager) always has less than 7 days left: it is
    warned about when less than a quarter of its lifetime is left, not before."""
    ca = (devenv.ca_cert, devenv.ca_key)
    cert, key = issue(ca, tmp_path, "hourly", lifetime=dt.timedelta(hours=1))
    replace(files.cert, cert)
    replace(files.key, key)
    wall = [time.time()]
    with caplog.at_level(logging.WARNING, logger="keybroker.server.tls_reload"):
        tls = ServerTls(files.settings, clock=lambda: wall[0])
        assert caplog.records == []
        wall[0] += 40 * 60  # 19 minutes left
        tls.warn_if_expiring()
        assert caplog.records == []
        wall[0] += 5 * 60  # 14 minutes left: the renewal is late
        tls.warn_if_expiring()
        assert len(caplog.records) == 1
        assert re.search(r"expires in 1[34] min", caplog.records[0].getMessage())
        wall[0] += 20 * 60
        tls.warn_if_expiring(force=True)
        assert caplog.records[-1].levelno == logging.ERROR
        assert "expired on" in caplog.records[-1].getMessage()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_broker_follows_renewed_files_without_a_restart(
    devenv: DevEnv, files: Files, new_ca: tuple[Path, Path], tmp_path: Path, token: TokenFactory
) -> None:
    """The whole broker: the issuer's signing kid removed from its JWKS file is refused by the
    next call's verification within seconds (a token cached before included); cert and key
    renewed on disk are picked up by its health monitor (no connection needed) and served to
    the next connection; calls go on over it."""
    state = tmp_path / "state"
    jwks = tmp_path / "jwks.json"
    shutil.copy(devenv.jwks, jwks)
    broker = create_server(
        load_settings(
            devenv,
            tls_cert_file=str(files.cert),
            tls_key_file=str(files.key),
            tls_client_ca_file=str(files.ca),
            auth_jwks_file=str(jwks),
            state_url=f"sqlite:{state / 'keybroker.db'}",
            audit_dir=str(state / "journal"),
        )
    )
    client = devenv.cert("client").read_bytes(), devenv.key("client").read_bytes()
    bearer = token()

    def generate(root: bytes) -> grpc.StatusCode:
        with mtls_channel(broker.port, root, *client) as ch:
            try:
                stub(ch).GenerateDataKey(generate_request(), metadata=auth(bearer), timeout=5)
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                return code
            return grpc.StatusCode.OK

    try:
        assert broker.tls is not None
        assert generate(devenv.ca_cert.read_bytes()) is grpc.StatusCode.OK
        assert common_name(served_certificate(broker.port)) == "keybroker"

        cert, key = issue(new_ca, tmp_path, "keybroker-renewed")
        replace(files.key, key)
        replace(files.cert, cert)
        assert eventually(lambda: broker.tls is not None and broker.tls.material.cert_pem == cert)
        assert common_name(served_certificate(broker.port)) == "keybroker-renewed"
        assert generate(new_ca[0].read_bytes()) is grpc.StatusCode.OK

        other = Issuer()
        other.add_key("someone-else")
        replace(jwks, json.dumps(other.jwks()).encode())  # the dev signing kid is gone
        assert eventually(
            lambda: generate(new_ca[0].read_bytes()) is grpc.StatusCode.UNAUTHENTICATED
        )
    finally:
        broker.stop(1)


def test_a_kubernetes_secret_volume_swap_is_followed(
    devenv: DevEnv, tmp_path: Path, new_ca: tuple[Path, Path]
) -> None:
    """The kubelet updates a Secret volume by pointing ``..data`` at a new directory; the files
    the broker names are symlinks through it. The stat follows them: the swap is a change."""
    volume = tmp_path / "volume"
    first = volume / "..2026_01_01"
    first.mkdir(parents=True)
    shutil.copy(devenv.cert("server"), first / "tls.crt")
    shutil.copy(devenv.key("server"), first / "tls.key")
    shutil.copy(devenv.ca_cert, first / "ca.crt")
    (volume / "..data").symlink_to(first.name)
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (volume / name).symlink_to(f"..data/{name}")
    tls = ServerTls(
        TlsSettings(
            cert_file=volume / "tls.crt",
            key_file=volume / "tls.key",
            client_ca_file=volume / "ca.crt",
        ),
        check_every=0,
    )
    second = volume / "..2026_01_02"
    second.mkdir()
    cert, key = issue(new_ca, tmp_path, "keybroker-renewed")
    (second / "tls.crt").write_bytes(cert)
    (second / "tls.key").write_bytes(key)
    shutil.copy(devenv.ca_cert, second / "ca.crt")
    (volume / "..data_tmp").symlink_to(second.name)
    os.replace(volume / "..data_tmp", volume / "..data")  # the kubelet's atomic swap
    assert tls.check()
    assert tls.material.cert_pem == cert
