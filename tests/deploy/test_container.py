"""The container's entrypoint and exec probe, run outside a container (an OCI build was tried on
this machine with buildah, but takes minutes: see docs/DEPLOYMENT.md, Container image)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from keybroker import settings as settings_mod
from keybroker.devenv import DevEnv
from keybroker.server.app import RunningBroker, create_server
from tests.conftest import load_settings
from tests.support.process import free_port

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "container" / "entrypoint.sh"
HEALTHCHECK = ROOT / "deploy" / "container" / "healthcheck.py"
BIN = Path(sys.executable).parent

#: What kubelet injects for Services named keybroker and keybroker-headless (service links).
SERVICE_LINKS = {
    "KEYBROKER_SERVICE_HOST": "10.96.0.10",
    "KEYBROKER_SERVICE_PORT": "50051",
    "KEYBROKER_SERVICE_PORT_GRPC": "50051",
    "KEYBROKER_PORT": "tcp://10.96.0.10:50051",
    "KEYBROKER_PORT_50051_TCP": "tcp://10.96.0.10:50051",
    "KEYBROKER_PORT_50051_TCP_PROTO": "tcp",
    "KEYBROKER_PORT_50051_TCP_PORT": "50051",
    "KEYBROKER_PORT_50051_TCP_ADDR": "10.96.0.10",
    "KEYBROKER_HEADLESS_SERVICE_HOST": "10.96.0.11",
    "KEYBROKER_HEADLESS_SERVICE_PORT": "50051",
    "KEYBROKER_HEADLESS_PORT_50051_TCP_ADDR": "10.96.0.11",
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "keybroker.toml"
    path.write_text(f'[state]\nurl = "sqlite:{tmp_path / "kb.db"}"\n')
    return path


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_service_link_variables_do_not_stop_the_broker(config: Path) -> None:
    """Through the entrypoint, a command that loads settings starts despite kubelet's
    KEYBROKER_SERVICE_* / KEYBROKER_PORT_* variables (for Services keybroker and
    keybroker-headless), and a real setting among them still applies."""
    env = _env(**SERVICE_LINKS, KEYBROKER_STATE_URL=f"sqlite:{config.parent / 'other.db'}")
    done = _run(["sh", str(ENTRYPOINT), "migrate", "--config", str(config)], env)
    assert done.returncode == 0, done.stderr
    assert "applied migrations" in done.stdout
    assert (config.parent / "other.db").exists() and not (config.parent / "kb.db").exists()


def test_a_misspelt_setting_still_stops_start_up(config: Path) -> None:
    env = _env(**SERVICE_LINKS, KEYBROKER_SERVER_LISTN="0.0.0.0:1")
    done = _run(["sh", str(ENTRYPOINT), "migrate", "--config", str(config)], env)
    assert done.returncode == 2
    assert "[server] listn: unknown key" in done.stderr


def test_default_command_is_serve_with_a_private_umask(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "keybroker").write_text('#!/bin/sh\necho "args=$*"; echo "umask=$(umask)"\n')
    (fake / "keybroker").chmod(0o755)
    env = _env(PATH=f"{fake}{os.pathsep}{os.environ.get('PATH', '')}")
    done = _run(["sh", str(ENTRYPOINT)], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["args=serve", "umask=0077"]
    done = _run(["sh", str(ENTRYPOINT), "audit", "verify"], env)
    assert done.stdout.split()[0] == "args=audit"


def _dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV variables (one ENV instruction, continued lines)."""
    text = (ROOT / "deploy" / "container" / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [raw for raw in text.splitlines() if raw.startswith("ENV ")]
    return dict(pair.split("=", 1) for pair in line.removeprefix("ENV ").split())


def test_image_logs_json_and_keeps_its_state_on_the_volume(tmp_path: Path) -> None:
    """The image's defaults: JSON log lines, and the state directory (default journal and its
    keys) on the /var/lib/keybroker volume; the settings loader accepts them."""
    env = _dockerfile_env()
    assert env["KEYBROKER_TELEMETRY_LOG_FORMAT"] == "json"
    assert env["KEYBROKER_STATE_DIR"] == "/var/lib/keybroker"
    config = tmp_path / "keybroker.toml"
    config.write_text("")
    overrides = {
        k: v for k, v in env.items() if k.startswith("KEYBROKER_") and k != "KEYBROKER_CONFIG"
    }
    loaded = settings_mod.load(config, environ=overrides)
    assert loaded.telemetry.log_format == "json"
    assert loaded.audit.dir == Path("/var/lib/keybroker/journal")
    assert loaded.audit.chain_key_file == Path("/var/lib/keybroker/audit/chain.key")


@pytest.fixture
def probed(devenv: DevEnv, tmp_path: Path) -> Iterator[RunningBroker]:
    # a journal of its own: one writer per journal (the session's broker may hold the default)
    running = create_server(load_settings(devenv, audit_dir=str(tmp_path / "journal")))
    yield running
    running.stop(1)


def _probe(devenv: DevEnv, port: int, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(HEALTHCHECK), *flags, "--target", f"127.0.0.1:{port}",
            "--server-name", "localhost", "--ca", str(devenv.ca_cert),
            "--cert", str(devenv.cert("client")), "--key", str(devenv.key("client"))]  # fmt: skip
    return _run(argv, _env())


def test_probe_ready_and_live(devenv: DevEnv, probed: RunningBroker) -> None:
    """SERVING: both probes pass. NOT_SERVING (an HSM outage): not ready, still live, so
    Kubernetes takes the replica out of rotation without restarting it."""
    assert _probe(devenv, probed.port, "--ready").returncode == 0
    assert _probe(devenv, probed.port, "--live").returncode == 0
    probed.monitor.stop()  # no health probe turns it back to SERVING
    probed.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    not_ready = _probe(devenv, probed.port, "--ready")
    assert not_ready.returncode == 1 and "NOT_SERVING" in not_ready.stderr
    assert _probe(devenv, probed.port, "--live").returncode == 0


def test_probe_fails_without_a_broker_or_with_an_untrusted_certificate(
    devenv: DevEnv, probed: RunningBroker
) -> None:
    down = _probe(devenv, free_port(), "--live")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    argv = [sys.executable, str(HEALTHCHECK), "--live", "--target", f"127.0.0.1:{probed.port}",
            "--server-name", "localhost", "--ca", str(devenv.ca_cert),
            "--cert", str(devenv.cert("foreign")), "--key", str(devenv.key("foreign"))]  # fmt: skip
    assert _run(argv, _env()).returncode == 1
    missing = _run([sys.executable, str(HEALTHCHECK), "--ca", "/nonexistent"], _env())
    assert missing.returncode == 1 and "cannot read probe certificates" in missing.stderr
