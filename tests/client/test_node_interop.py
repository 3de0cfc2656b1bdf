"""A second, independent implementation of the recording format in Node.js (interop/node/, only
Node's built-in WebCrypto): it passes every known-answer vector, valid and failure, decrypts what
the Python SDK wrote and writes what the Python SDK decrypts, through a real broker."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from keybroker.client import KeyBrokerClient, TlsFiles
from keybroker.client.recording import RecordingHeader, encrypt_stream, new_header
from keybroker.devenv import DevEnv
from keybroker.server.app import RunningBroker
from tests.conftest import TokenFactory

ROOT = Path(__file__).resolve().parent.parent.parent
NODE_DIR = ROOT / "interop" / "node"
VECTORS_FILE = ROOT / "tests" / "vectors" / "recording_v1.json"
VECTORS = json.loads(VECTORS_FILE.read_text())


@pytest.fixture(scope="session")
def node() -> str:
    path = shutil.which("node")
    assert path, "node is missing: scripts/ensure-system-deps.sh --test installs Debian's nodejs"
    return path


def run_node(node: str, *args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [node, str(NODE_DIR / "cli.mjs"), *args], input=data, capture_output=True, timeout=120,
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def node_vectors(node: str) -> dict[str, Any]:
    """Every vector run once by the Node implementation."""
    done = run_node(node, "vectors", str(VECTORS_FILE))
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_node_package_has_no_dependencies() -> None:
    """package.json declares no dependency; the sources import only node: built-ins and each other."""
    package = json.loads((NODE_DIR / "package.json").read_text())
    assert package.get("dependencies", {}) == {}
    assert "devDependencies" not in package
    sources = list(NODE_DIR.glob("*.mjs"))
    assert sources
    for source in sources:
        for spec in re.findall(r"""from\s+["']([^"']+)["']""", source.read_text()):
            assert spec.startswith(("node:", "./")), f"{source.name} imports {spec}"


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["id"])
def test_node_reproduces_the_valid_vector(
    node_vectors: dict[str, Any], vector: dict[str, Any]
) -> None:
    """Node writes the vector's file byte for byte from its inputs, reads it back to the plaintext,
    and agrees on the header hash, the file key and every nonce."""
    outcome = node_vectors["valid"][vector["id"]]
    assert outcome == dict.fromkeys(outcome, True)
    assert set(outcome) == {
        "encrypt",
        "decrypt",
        "header_sha256",
        "file_key",
        "nonces",
        "recording_id",
    }


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["id"])
def test_node_refuses_the_failure_vector(
    node_vectors: dict[str, Any], vector: dict[str, Any]
) -> None:
    """Node refuses the file with the vector's error, at its stage (no key asked for a header
    defect), after releasing exactly the plaintext bytes a streaming decryptor releases."""
    outcome = node_vectors["invalid"][vector["id"]]
    assert outcome["refused"] is True
    assert outcome["error"] == vector["error"]
    assert outcome["stage"] == vector["stage"]
    assert outcome["released"] == vector["released"]
    assert outcome["asked_for_key"] is (vector["stage"] == "segments")


@pytest.fixture
def sdk(devenv: DevEnv, broker: RunningBroker, token: TokenFactory) -> KeyBrokerClient:
    tls = TlsFiles(devenv.ca_cert, devenv.cert("client"), devenv.key("client"))
    return KeyBrokerClient(f"127.0.0.1:{broker.port}", tls=tls, token=token())


@pytest.mark.parametrize("size", [0, 65536 * 3, 1_000_003])
def test_node_decrypts_what_the_python_sdk_wrote(
    node: str, sdk: KeyBrokerClient, size: int
) -> None:
    """The SDK encrypts through the broker; Node reads the header, the broker unwraps the key for
    the header's recording id and wrapped key, and Node streams the plaintext back out."""
    audio = os.urandom(size)
    sealed = io.BytesIO()
    with sdk:
        sdk.encrypt_recording(
            io.BytesIO(audio), sealed, recording_id=f"rec-node-{size}", purposes=["support"],
            segment_size=65536,
        )  # fmt: skip
        header = run_node(node, "header", data=sealed.getvalue())
        assert header.returncode == 0, header.stderr.decode()
        fields = json.loads(header.stdout)
        assert fields["recording_id"] == f"rec-node-{size}"
        assert fields["segment_size"] == 65536
        key = sdk.unwrap_data_key(
            fields["recording_id"], bytes.fromhex(fields["wrapped_key"]), purpose="support"
        )
    done = run_node(node, "decrypt", "--key", key.plaintext.hex(), data=sealed.getvalue())
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == audio


@pytest.mark.parametrize("size", [0, 4096, 4096 * 5, 250_001])
def test_python_sdk_decrypts_what_node_wrote(node: str, sdk: KeyBrokerClient, size: int) -> None:
    """The broker issues a data key; Node encrypts with it (exact multiples of the segment size
    included); the SDK decrypts through the broker."""
    audio = os.urandom(size)
    with sdk:
        key = sdk.generate_data_key(f"rec-from-node-{size}", purposes=["support"])
        done = run_node(
            node, "encrypt", "--key", key.plaintext.hex(), "--recording-id", f"rec-from-node-{size}",
            "--wrapped-key", key.wrapped.hex(), "--segment-size", "4096", data=audio,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        out = io.BytesIO()
        header = sdk.decrypt_recording(io.BytesIO(done.stdout), out, purpose="support")
    assert out.getvalue() == audio
    assert header.recording_id == f"rec-from-node-{size}"
    assert header.segment_size == 4096


def test_node_refuses_a_truncated_python_file_after_the_authentic_part(
    node: str, sdk: KeyBrokerClient
) -> None:
    """A Python-written file cut at a segment boundary: Node exits 1 with recording_integrity
    after releasing the segments before the cut, never a byte more."""
    audio = os.urandom(4096 * 3 + 10)
    sealed = io.BytesIO()
    with sdk:
        sdk.encrypt_recording(
            io.BytesIO(audio), sealed, recording_id="rec-cut", purposes=["support"],
            segment_size=4096,
        )  # fmt: skip
        wrapped = RecordingHeader.read(io.BytesIO(sealed.getvalue())).wrapped_key
        key = sdk.unwrap_data_key("rec-cut", wrapped, purpose="support")
    cut = sealed.getvalue()[: -(10 + 16)]  # drop the final segment
    done = run_node(node, "decrypt", "--key", key.plaintext.hex(), data=cut)
    assert done.returncode == 1
    assert json.loads(done.stderr) == {
        "error": "recording_integrity",
        "stage": "segments",
        "released": 8192,
    }
    assert done.stdout == audio[:8192]


def test_node_keeps_a_leading_byte_order_mark_in_the_recording_id(node: str) -> None:
    """The recording id is its bytes exactly: a leading EF BB BF is U+FEFF of the id, not a BOM to
    strip (WHATWG's TextDecoder strips it by default; docs/RECORDING_FORMAT.md now says so)."""
    header = new_header("\ufeffrec-bom", b"wrapped", 4096)
    sealed = io.BytesIO()
    encrypt_stream(io.BytesIO(b"audio"), sealed, header, bytes(32))
    done = run_node(node, "header", data=sealed.getvalue())
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["recording_id"] == "\ufeffrec-bom"
    plain = run_node(node, "decrypt", "--key", bytes(32).hex(), data=sealed.getvalue())
    assert plain.stdout == b"audio"
