"""The client SDK re-reads its certificate, key and CA files when they change (issue #15,
item 5): the next call (at most a second later) runs over a new channel with them, a call in
flight finishes on the old channel, which is then closed; files that cannot be used are
skipped with a warning. Real mTLS on the loopback; against the real broker, a token bound to
the renewed certificate (``cnf``) shows which certificate the call presented."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from keybroker import errors
from keybroker.client import KeyBrokerClient, TlsFiles
from keybroker.client._tls import CHECK_SECONDS, TlsWatch
from keybroker.client.admin import KeyAdminClient
from keybroker.devenv import DevEnv, issue_cert, mint_token
from keybroker.server.app import RunningBroker
from keybroker.v1 import admin_pb2
from tests.client.test_sdk import FLAVOURS, Client
from tests.support.clients import new_recording_id

SCOPES = ("keys:generate", "keys:unwrap")


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    """The blocking or the asyncio client."""
    name: str = request.param
    return name


def replace(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, as cert-manager and a Kubernetes secret volume do."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


@pytest.fixture
def files(devenv: DevEnv, tmp_path: Path) -> TlsFiles:
    """The dev client's TLS files, copied where the test may renew them."""
    d = tmp_path / "client-tls"
    d.mkdir()
    out = TlsFiles(d / "ca.pem", d / "client.pem", d / "client.key")
    shutil.copy(devenv.ca_cert, out.ca_file)
    shutil.copy(devenv.cert("client"), out.cert_file)
    shutil.copy(devenv.key("client"), out.key_file)
    return out


@pytest.fixture
def renewed(devenv: DevEnv, tmp_path: Path) -> tuple[Path, Path]:
    """A new certificate for the same client, from the same CA (what a renewal gives)."""
    cert, key = tmp_path / "renewed.pem", tmp_path / "renewed.key"
    issue_cert(devenv.ca_cert, devenv.ca_key, cert, key, cn="dev-storage")
    return cert, key


def renew(files: TlsFiles, renewed: tuple[Path, Path]) -> None:
    replace(files.key_file, renewed[1].read_bytes())
    replace(files.cert_file, renewed[0].read_bytes())
    time.sleep(CHECK_SECONDS + 0.1)  # the files are looked at once a second at most


def test_a_renewed_client_certificate_is_used_by_the_next_call(
    devenv: DevEnv, broker: RunningBroker, flavour: str, files: TlsFiles,
    renewed: tuple[Path, Path],
) -> None:  # fmt: skip
    """Blocking and asyncio clients: a token bound to the renewed certificate is refused while
    the old one is presented, and accepted by the call after the files are replaced, without a
    new client; a token bound to the old certificate is refused from then on."""
    bound_old = mint_token(devenv, scopes=SCOPES, purposes=["support"], cnf_cert=files.cert_file)
    bound_new = mint_token(devenv, scopes=SCOPES, purposes=["support"], cnf_cert=renewed[0])
    current = [bound_old]
    client = Client(flavour, f"127.0.0.1:{broker.port}", tls=files, token=lambda: current[0])
    try:
        assert client.generate_data_key(new_recording_id("rot"), purposes=["support"]).wrapped
        current[0] = bound_new
        with pytest.raises(errors.KeybrokerError):
            client.generate_data_key(new_recording_id("rot"), purposes=["support"])

        renew(files, renewed)
        assert client.generate_data_key(new_recording_id("rot"), purposes=["support"]).wrapped
        current[0] = bound_old
        with pytest.raises(errors.KeybrokerError):
            client.generate_data_key(new_recording_id("rot"), purposes=["support"])
    finally:
        client.close()


class Admin:
    """A KeyAdmin stand-in over real mTLS: GetKey answers with the common name of the client
    certificate the call came with; a call for "hold" waits until released."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.release = threading.Event()

    def get_key(self, request: admin_pb2.GetKeyRequest, context: grpc.ServicerContext) -> Any:
        values: Any = context.auth_context()["x509_pem_cert"]  # a list of PEMs (typed bytes)
        pem: bytes = values[0]
        cert = x509.load_pem_x509_certificate(pem)
        value = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        cn = value if isinstance(value, str) else value.decode()
        if request.name == "hold":
            self.held.set()
            self.release.wait(10)
        return admin_pb2.Key(name=f"{cn}/{cert.serial_number:x}")


@pytest.fixture
def admin_server(devenv: DevEnv) -> Iterator[tuple[Admin, int]]:
    admin = Admin()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.unary_unary_rpc_method_handler(
        admin.get_key,
        request_deserializer=admin_pb2.GetKeyRequest.FromString,
        response_serializer=admin_pb2.Key.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("keybroker.v1.KeyAdmin", {"GetKey": handler}),)
    )
    creds = grpc.ssl_server_credentials(
        [(devenv.key("server").read_bytes(), devenv.cert("server").read_bytes())],
        root_certificates=devenv.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield admin, port
    finally:
        admin.release.set()
        server.stop(None).wait(5)


def serial(path: Path) -> str:
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:x}"


def test_a_call_in_flight_finishes_on_the_old_channel_which_is_then_closed(
    files: TlsFiles, renewed: tuple[Path, Path], admin_server: tuple[Admin, int]
) -> None:
    """Renewal while a call runs: the call completes over the old connection (old certificate);
    the next call uses the new one; the old channel is closed once its call is done."""
    admin, port = admin_server
    client = KeyAdminClient(f"127.0.0.1:{port}", tls=files, token="t")
    old_serial = serial(files.cert_file)
    try:
        assert client.get_key("a").name == f"dev-storage/{old_serial}"
        old = client._conn
        with futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.get_key, "hold")
            assert admin.held.wait(5)
            renew(files, renewed)
            assert client.get_key("b").name == f"dev-storage/{serial(renewed[0])}"
            assert client._conn is not old
            assert old.retired and old.active == 1  # still open for the call in flight
            admin.release.set()
            assert in_flight.result(10).name == f"dev-storage/{old_serial}"
        assert old.active == 0
        with pytest.raises(ValueError, match="closed channel"):
            old.calls["GetKey"](admin_pb2.GetKeyRequest(name="x"), timeout=5)
    finally:
        client.close()


def test_files_that_cannot_be_used_keep_the_previous_channel(
    files: TlsFiles, renewed: tuple[Path, Path], admin_server: tuple[Admin, int],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A certificate whose key is not there yet (or a damaged file) is skipped with one
    warning naming the problem, never the key; calls go on with the old files; once the files
    are right they are used."""
    _admin, port = admin_server
    client = KeyAdminClient(f"127.0.0.1:{port}", tls=files, token="t")
    old_serial = serial(files.cert_file)
    ca = files.ca_file.read_bytes()
    try:
        with caplog.at_level(logging.WARNING, logger="keybroker.client"):
            replace(files.cert_file, renewed[0].read_bytes())  # the new key comes later
            time.sleep(CHECK_SECONDS + 0.1)
            assert client.get_key("a").name == f"dev-storage/{old_serial}"
            assert client.get_key("b").name == f"dev-storage/{old_serial}"
            messages = [r.getMessage() for r in caplog.records]
            assert len(messages) == 1, messages
            assert "does not match the certificate" in messages[0]
            replace(files.ca_file, b"garbage")
            time.sleep(CHECK_SECONDS + 0.1)
            assert client.get_key("c").name == f"dev-storage/{old_serial}"
            assert "ca_file" in caplog.records[-1].getMessage()
            assert all("PRIVATE" not in r.getMessage() for r in caplog.records)

        replace(files.ca_file, ca)
        replace(files.key_file, renewed[1].read_bytes())
        time.sleep(CHECK_SECONDS + 0.1)
        assert client.get_key("d").name == f"dev-storage/{serial(renewed[0])}"
    finally:
        client.close()


def test_the_files_are_looked_at_once_a_second_at_most(files: TlsFiles) -> None:
    """The stat is taken before a call at most once per CHECK_SECONDS, not on every call."""
    now = [50.0]
    watch = TlsWatch(files, monotonic=lambda: now[0])
    replace(files.cert_file, files.cert_file.read_bytes())  # rewritten: a new inode
    assert watch.changed() is None  # within the second
    now[0] += CHECK_SECONDS
    assert watch.changed() is not None
    assert watch.changed() is None
    now[0] += CHECK_SECONDS
    assert watch.changed() is None  # nothing changed since


def test_a_client_that_never_rotates_works_as_before(devenv: DevEnv, broker: RunningBroker) -> None:
    """Files that never change: one channel for the client's life."""
    token = mint_token(devenv, scopes=SCOPES, purposes=["support"])
    tls = TlsFiles(devenv.ca_cert, devenv.cert("client"), devenv.key("client"))
    with KeyBrokerClient(f"127.0.0.1:{broker.port}", tls=tls, token=token) as client:
        first = client._conn
        client.generate_data_key(new_recording_id("same"), purposes=["support"])
        time.sleep(CHECK_SECONDS + 0.1)
        client.generate_data_key(new_recording_id("same"), purposes=["support"])
        assert client._conn is first
