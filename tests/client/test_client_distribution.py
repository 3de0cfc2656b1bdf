"""keybroker-client, the SDK's own distribution: built from this repository, installed alone into a
fresh virtual environment (at the oldest grpcio it claims to support), it encrypts and decrypts a
recording through a running broker, and none of the server's dependencies is importable there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from keybroker.devenv import DevEnv
from keybroker.server.app import RunningBroker
from tests.conftest import TokenFactory

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGE = ROOT / "packaging" / "keybroker-client"

pytestmark = pytest.mark.slow

SCRIPT = r"""
import asyncio, importlib.util, io, json, os, sys
import grpc
from keybroker.client import AsyncKeyBrokerClient, KeyBrokerClient, TlsFiles
from pathlib import Path

target, ca, cert, key, token = sys.argv[1:6]
tls = TlsFiles(Path(ca), Path(cert), Path(key))
audio = os.urandom(100_000)
with KeyBrokerClient(target, tls=tls, token=token) as kb:
    sealed = io.BytesIO()
    kb.encrypt_recording(io.BytesIO(audio), sealed, recording_id="rec-dist", purposes=["support"])
    out = io.BytesIO()
    kb.decrypt_recording(io.BytesIO(sealed.getvalue()), out, purpose="support")
    assert out.getvalue() == audio

async def run():
    async with AsyncKeyBrokerClient(target, tls=tls, token=token) as kb:
        out = io.BytesIO()
        await kb.decrypt_recording(io.BytesIO(sealed.getvalue()), out, purpose="support")
        assert out.getvalue() == audio

asyncio.run(run())
absent = ["pkcs11", "psycopg", "jwt", "opentelemetry.sdk", "keybroker.server", "keybroker.adapters",
          "keybroker.cli", "keybroker.settings", "keybroker.v1.keybroker_pb2_grpc"]
found = {}
for name in absent:
    try:
        found[name] = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found[name] = False
import keybroker.client
print(json.dumps({"grpc": grpc.__version__, "importable": found,
                  "sdk": keybroker.client.__file__}))
"""


def _client_project() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    return project


def _grpcio_floor() -> str:
    deps = _client_project()["dependencies"]
    assert isinstance(deps, list)
    spec = next(d for d in deps if d.startswith("grpcio"))
    match = re.fullmatch(r"grpcio>=([\d.]+),<\d+", spec)
    assert match, spec
    return match.group(1)


@pytest.fixture(scope="session")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The keybroker-client wheel, built from this checkout into a fresh build directory."""
    out = tmp_path_factory.mktemp("kbc-dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         str(PACKAGE), "-w", str(out)],
        check=True, timeout=300, env={**os.environ, "KEYBROKER_CLIENT_BUILD_BASE": str(out / "build")},
    )  # fmt: skip
    (wheel,) = out.glob("keybroker_client-*.whl")
    return wheel


@pytest.fixture(scope="session")
def client_venv(client_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with only the wheel and its dependencies, grpcio
    at the floor the distribution declares. Dependencies come from /opt/wheels when present,
    else from PyPI (pip's cache makes repeated runs fast)."""
    root = tmp_path_factory.mktemp("kbc-venv") / "venv"
    venv.create(root, with_pip=True, clear=True)
    python = root / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(client_wheel), f"grpcio=={_grpcio_floor()}"],
        check=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    return python


def test_wheel_holds_only_the_sdk_and_what_it_shares(client_wheel: Path) -> None:
    """The wheel has keybroker.client, keybroker.v1's messages, errors, wire and core.wrapped_key:
    no server, adapters, cli, settings, devenv, nor generated gRPC stubs."""
    names = {n for n in zipfile.ZipFile(client_wheel).namelist() if n.startswith("keybroker/")}
    assert "keybroker/client/_api.py" in names
    assert "keybroker/wire.py" in names
    assert "keybroker/v1/keybroker_pb2.py" in names
    assert "keybroker/py.typed" in names
    for name in names:
        assert not name.startswith(
            ("keybroker/server/", "keybroker/adapters/", "keybroker/cli/")
        ), name
        assert not name.endswith(("_pb2_grpc.py", "settings.py", "devenv.py")), name
    assert {n for n in names if n.startswith("keybroker/core/")} == {
        "keybroker/core/__init__.py",
        "keybroker/core/wrapped_key.py",
    }


def test_client_distribution_declares_only_the_client_dependencies() -> None:
    """grpcio (a wide range, not the server's pin), protobuf, cryptography, opentelemetry-api;
    the same version as the server distribution."""
    project = _client_project()
    deps = project["dependencies"]
    assert isinstance(deps, list)
    names = sorted(re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0] for d in deps)
    assert names == ["cryptography", "grpcio", "opentelemetry-api", "protobuf"]
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == server["version"]
    assert int(_grpcio_floor().split(".")[1]) < 85  # well below the server's pin


def test_client_alone_round_trips_through_a_running_broker(
    client_venv: Path, devenv: DevEnv, broker: RunningBroker, token: TokenFactory, tmp_path: Path
) -> None:
    """In the fresh venv: a recording encrypted and decrypted through the broker (blocking and
    asyncio), with grpcio at the declared floor; pkcs11, psycopg, PyJWT, the OpenTelemetry SDK
    and the server's modules are not importable; the SDK is the installed one, not this tree."""
    done = subprocess.run(
        [str(client_venv), "-c", SCRIPT, f"127.0.0.1:{broker.port}", str(devenv.ca_cert),
         str(devenv.cert("client")), str(devenv.key("client")), token()],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["importable"] == dict.fromkeys(report["importable"], False)
    assert report["grpc"] == _grpcio_floor() + ".0" or report["grpc"] == _grpcio_floor()
    assert str(client_venv.parent.parent) in report["sdk"]
