"""Start-up errors say what happened and what to do: each one is triggered here as an operator
would meet it (`keybroker serve`, exit code 2, one line, no traceback), and each message is
checked against docs/TROUBLESHOOTING.md, which must list every one of them and nothing else."""

from __future__ import annotations

import datetime as dt
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keybroker.cli.main import main
from keybroker.devenv import DevEnv, mint_token
from keybroker.v1 import keybroker_pb2 as pb
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, run_cli

ROOT = Path(__file__).resolve().parents[2]
TROUBLESHOOTING = ROOT / "docs" / "TROUBLESHOOTING.md"
_ROW = re.compile(r"^\| `(?P<message>.+?)` \| (?P<fix>.+) \|$")


def documented() -> dict[str, re.Pattern[str]]:
    """Each documented message (as written) and a pattern for it (``…`` = any text)."""
    rows = {}
    for line in TROUBLESHOOTING.read_text().splitlines():
        if m := _ROW.match(line):
            text = m["message"].replace("\\|", "|")
            parts = [re.escape(p) for p in text.replace(" …", "…").split("…")]
            rows[m["message"]] = re.compile("keybroker: configuration error: " + ".*?".join(parts))
    return rows


# -- TLS material -------------------------------------------------------------------------------


def _cert(
    env: DevEnv,
    path: Path,
    *,
    start: dt.timedelta = dt.timedelta(minutes=-5),
    end: dt.timedelta = dt.timedelta(days=30),
) -> Path:
    """A server certificate for the dev server key, signed by the dev CA, valid from now+start
    to now+end."""
    ca = x509.load_pem_x509_certificate(env.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(env.ca_key.read_bytes(), password=None)
    key = serialization.load_pem_private_key(env.key("server").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + start)
        .not_valid_after(now + end)
        .sign(ca_key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


Case = Callable[[DevEnv, Path], tuple[list[str], dict[str, str]]]


def _serve(**env: str) -> Case:
    def case(devenv: DevEnv, _tmp: Path) -> tuple[list[str], dict[str, str]]:
        return ["serve", "--config", str(devenv.config)], env

    return case


def _file(name: str, key: str, make: Callable[[DevEnv, Path], object]) -> Case:
    def case(devenv: DevEnv, tmp: Path) -> tuple[list[str], dict[str, str]]:
        make(devenv, tmp / name)
        return ["serve", "--config", str(devenv.config)], {key: str(tmp / name)}

    return case


def _toml(text: str) -> Case:
    def case(devenv: DevEnv, tmp: Path) -> tuple[list[str], dict[str, str]]:
        path = tmp / "keybroker.toml"
        path.write_text(text)
        return ["serve", "--config", str(path)], {}

    return case


def _no_config(_devenv: DevEnv, _tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["serve"], {"KEYBROKER_CONFIG": ""}


def _missing_config(_devenv: DevEnv, tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["serve", "--config", str(tmp / "absent.toml")], {}


def _without_client_ca(devenv: DevEnv, tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = devenv.root / f"no-ca-{tmp.name}.toml"
    path.write_text(devenv.config.read_text().replace('client_ca_file = "pki/ca.pem"\n', ""))
    return ["serve", "--config", str(path)], {}


def _busy_port(devenv: DevEnv, _tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["serve", "--config", str(devenv.config)], {"KEYBROKER_SERVER_LISTEN": "BUSY"}


def _busy_metrics_port(devenv: DevEnv, _tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["serve", "--config", str(devenv.config)], {
        "KEYBROKER_TELEMETRY_PROMETHEUS_LISTEN": "BUSY"
    }


def _state_dir_not_writable(devenv: DevEnv, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The default journal's keys cannot be made: the state directory lies under a file (a
    read-only directory would do, but the suite may run as root)."""
    (tmp / "a-file").write_text("")
    env = {"KEYBROKER_STATE_DIR": str(tmp / "a-file" / "state"), "KEYBROKER_AUDIT_DIR": ""}
    return ["serve", "--config", str(devenv.config)], env


def _pem_with_garbage(_env: DevEnv, path: Path) -> None:
    path.write_text(
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    )


def _encrypted_key(env: DevEnv, path: Path) -> None:
    key = serialization.load_pem_private_key(env.key("server").read_bytes(), password=None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )


CASES: dict[str, tuple[Case, str]] = {
    "no config": (
        _no_config,
        "no configuration given: pass --config FILE or set KEYBROKER_CONFIG=FILE …",
    ),
    "missing config file": (_missing_config, "config file …: No such file or directory"),
    "invalid toml": (_toml("[server\n"), "config file …: invalid TOML (…)"),
    "unknown section": (
        _toml("[server]\nlisten = '127.0.0.1:0'\n\n[sever]\nthreads = 2\n"),
        "unknown section […] (…, line …); known sections: …",
    ),
    "unknown key in toml": (
        _toml("[server]\nlisten = '127.0.0.1:0'\nlistn = 'x'\n"),
        "[…] …: unknown key (…, line …); known keys: …",
    ),
    "unknown key in env": (
        _serve(KEYBROKER_SERVER_LISTN="127.0.0.1:0"),
        "[…] …: unknown key (environment variable KEYBROKER_…); known keys: …",
    ),
    "unknown env section": (
        _serve(KEYBROKER_AUTHN_ISSUER="x"),
        "environment variable KEYBROKER_…: unknown setting; use KEYBROKER_<SECTION>_<KEY> …",
    ),
    "listen not an address": (
        _serve(KEYBROKER_SERVER_LISTEN="bogus"),
        "[server] listen: '…' is not an address; expected HOST:PORT …",
    ),
    "listen bad port": (
        _serve(KEYBROKER_SERVER_LISTEN="127.0.0.1:99999"),
        "[server] listen: '…' has no valid port (0..65535); …",
    ),
    "port in use": (_busy_port, "[server] listen: cannot bind …: Address already in use …"),
    "health port in use": (
        _serve(KEYBROKER_SERVER_HEALTH_LISTEN="BUSY"),
        "[server] health_listen: cannot bind …: Address already in use …",
    ),
    "health port is the broker's": (
        _serve(
            KEYBROKER_SERVER_LISTEN="127.0.0.1:50999",
            KEYBROKER_SERVER_HEALTH_LISTEN="0.0.0.0:50999",
        ),
        "[server] health_listen: port … is [server] listen's; …",
    ),
    "address not on this host": (
        _serve(KEYBROKER_SERVER_LISTEN="192.0.2.1:50051"),
        "[server] listen: cannot bind …: Cannot assign requested address …",
    ),
    "tls file not given": (_without_client_ca, "[tls] … is required; …"),
    "tls file missing": (
        _serve(KEYBROKER_TLS_CERT_FILE="/nonexistent/server.pem"),
        "[tls] …: … does not exist",
    ),
    "cert not pem": (
        _file("server.der", "KEYBROKER_TLS_CERT_FILE", lambda e, p: p.write_bytes(b"\x30\x82")),
        "[tls] …: … holds no PEM certificate …",
    ),
    "cert damaged": (
        _file("server.pem", "KEYBROKER_TLS_CERT_FILE", _pem_with_garbage),
        "[tls] …: … is not a valid PEM certificate (damaged or truncated); …",
    ),
    "key not pem": (
        _file(
            "server.key",
            "KEYBROKER_TLS_KEY_FILE",
            lambda e, p: p.write_bytes(e.cert("server").read_bytes()),
        ),
        "[tls] key_file: … holds no PEM private key; …",
    ),
    "key encrypted": (
        _file("server.key", "KEYBROKER_TLS_KEY_FILE", _encrypted_key),
        "[tls] key_file: … is encrypted; …",
    ),
    "key does not match": (
        _serve(KEYBROKER_TLS_KEY_FILE="pki/client.key"),
        "[tls] key_file: … does not match the certificate in …",
    ),
    "cert expired": (
        _file(
            "expired.pem",
            "KEYBROKER_TLS_CERT_FILE",
            lambda e, p: _cert(e, p, start=dt.timedelta(days=-30), end=dt.timedelta(days=-1)),
        ),
        "[tls] cert_file: the certificate in … expired on …",
    ),
    "cert not yet valid": (
        _file(
            "future.pem",
            "KEYBROKER_TLS_CERT_FILE",
            lambda e, p: _cert(e, p, start=dt.timedelta(days=2), end=dt.timedelta(days=30)),
        ),
        "[tls] cert_file: the certificate in … is not valid before …",
    ),
    "ca bundle empty": (
        _file("empty-ca.pem", "KEYBROKER_TLS_CLIENT_CA_FILE", lambda e, p: p.write_text("\n")),
        "[tls] client_ca_file: … holds no certificate (empty CA bundle): …",
    ),
    "wrong pin": (
        _file("wrong.pin", "KEYBROKER_HSM_PIN_FILE", lambda e, p: p.write_text("0000\n")),
        "[hsm] pin_file: the PIN is incorrect for this token",
    ),
    "unknown token": (
        _serve(KEYBROKER_HSM_TOKEN_LABEL="no-such-token"),
        "[hsm] token_label: no token labelled '…'; …",
    ),
    "no default key": (
        _serve(KEYBROKER_KEYS_DEFAULT="no-such-key"),
        "[keys] default: no key '…' on token '…'; …",
    ),
    "journal off but dir given": (
        _serve(KEYBROKER_AUDIT_ENABLED="false"),  # the test gives KEYBROKER_AUDIT_DIR
        "[audit] enabled = false but [audit] dir is set (…); …",
    ),
    "default journal keys cannot be made": (
        _state_dir_not_writable,
        "[audit] cannot create the journal keys under … (Not a directory); …",
    ),
    "metrics port in use": (
        _busy_metrics_port,
        "[telemetry] prometheus_listen: cannot listen on … for worker 0 (Address already in use); …",
    ),
}
"""Documented messages triggered elsewhere: (test that triggers it, message)."""
ELSEWHERE = {
    "test_an_unreadable_tls_file_is_named": "[tls] …: cannot read … (Permission denied); …",
    "tests/server/test_journal_lock.py": (
        "[audit] dir: journal … is in use by another keybroker (pid …; lock …); …"
    ),
}


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port held by a listener without SO_REUSEPORT, as another program would hold it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("name", list(CASES))
def test_each_start_up_error_exits_2_with_its_documented_message(
    devenv: DevEnv, tmp_path: Path, busy_port: int, name: str
) -> None:
    """The mistake stops `keybroker serve` with exit 2 and the message the troubleshooting
    table lists for it, before anything listens."""
    case, message = CASES[name]
    args, env = case(devenv, tmp_path)
    env = {
        "KEYBROKER_SERVER_LISTEN": "127.0.0.1:0",
        "KEYBROKER_AUDIT_DIR": str(tmp_path / "journal"),  # never the session broker's
        **env,
    }
    for var in (
        "KEYBROKER_SERVER_LISTEN",
        "KEYBROKER_SERVER_HEALTH_LISTEN",
        "KEYBROKER_TELEMETRY_PROMETHEUS_LISTEN",
    ):
        if env.get(var) == "BUSY":
            env[var] = f"127.0.0.1:{busy_port}"
    out = run_cli(*args, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "listening on port" not in out.stderr
    pattern = documented()[message]
    assert pattern.search(out.stderr), f"{out.stderr!r} does not match {message!r}"


def test_an_unreadable_tls_file_is_named(
    devenv: DevEnv, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TLS file the broker's user may not read is named with the OS reason, exit 2 (simulated:
    the suite may run as root, who can read any file)."""
    monkeypatch.setenv("KEYBROKER_SERVER_LISTEN", "127.0.0.1:0")
    read_bytes = Path.read_bytes

    def refuse(self: Path) -> bytes:
        if self.name == "server.key":
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert main(["serve", "--config", str(devenv.config)]) == 2
    err = capsys.readouterr().err
    assert documented()[ELSEWHERE["test_an_unreadable_tls_file_is_named"]].search(err), err
    assert str(devenv.key("server")) in err


def test_the_troubleshooting_table_lists_exactly_the_tested_messages() -> None:
    """Every documented message is triggered by a test, and every tested one is documented."""
    tested = {message for _case, message in CASES.values()} | set(ELSEWHERE.values())
    assert set(documented()) == tested


def test_the_readme_links_the_troubleshooting_page() -> None:
    """Newcomers find the page from the README."""
    assert "docs/TROUBLESHOOTING.md" in (ROOT / "README.md").read_text()


def test_kubernetes_service_links_do_not_stop_the_broker(devenv: DevEnv, tmp_path: Path) -> None:
    """With the variables the kubelet injects for a Service named `keybroker` the broker starts
    and serves; a misspelt key of a known section in the same environment still stops it."""
    links = {
        "KEYBROKER_SERVICE_HOST": "10.96.0.12",
        "KEYBROKER_SERVICE_PORT": "50051",
        "KEYBROKER_SERVICE_PORT_GRPC": "50051",
        "KEYBROKER_PORT": "tcp://10.96.0.12:50051",
        "KEYBROKER_PORT_50051_TCP": "tcp://10.96.0.12:50051",
        "KEYBROKER_PORT_50051_TCP_PROTO": "tcp",
        "KEYBROKER_PORT_50051_TCP_PORT": "50051",
        "KEYBROKER_PORT_50051_TCP_ADDR": "10.96.0.12",
        "KEYBROKER_HEALTH_SERVICE_HOST": "10.96.0.13",  # a Service named keybroker-health
    }
    proc = BrokerProcess(devenv, tmp_path / "k8s.log", links)
    try:
        port = proc.wait_listening()
        token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
        with channel(devenv, port) as ch:
            gen = stub(ch).GenerateDataKey(generate_request("rec-k8s"), metadata=auth(token))
            out = stub(ch).UnwrapDataKey(
                pb.UnwrapDataKeyRequest(
                    recording_id="rec-k8s", wrapped_key=gen.wrapped_key, purpose="support"
                ),
                metadata=auth(token),
            )
        assert out.data_key == gen.data_key
    finally:
        assert proc.stop() == 0
    misspelt = run_cli(
        "serve",
        "--config",
        str(devenv.config),
        env={**links, "KEYBROKER_SERVER_PROCESES": "2", "KEYBROKER_AUDIT_DIR": str(tmp_path / "j")},
    )
    assert misspelt.returncode == 2
    assert "KEYBROKER_SERVER_PROCESES" in misspelt.stderr
