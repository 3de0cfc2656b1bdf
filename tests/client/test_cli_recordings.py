"""`keybroker encrypt | decrypt | inspect` and `make demo`'s script against a real broker process."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keybroker.client.recording import RecordingHeader
from keybroker.devenv import DevEnv, mint_token, provision
from tests.support.process import BrokerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevEnv]:
    """A dev environment whose [client] target points at a running broker process."""
    root = tmp_path_factory.mktemp("cli")
    env = provision(root / "state", listen=f"127.0.0.1:{free_port()}")
    proc = BrokerProcess(env, root / "broker.log", {"KEYBROKER_SERVER_LISTEN": env_listen(env)})
    proc.wait_listening()
    (env.root / "client.token").write_text(
        mint_token(env, scopes=["keys:generate", "keys:unwrap"], purposes=["support"]) + "\n"
    )
    yield env
    proc.stop()


def env_listen(env: DevEnv) -> str:
    """The address the dev config's [client] target names (the broker must listen there)."""
    from keybroker import settings

    return settings.load(env.config, environ={}).client.target


def kb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keybroker.cli.main", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_encrypt_decrypt_inspect(live: DevEnv, tmp_path: Path) -> None:
    """A file survives the round trip; inspect shows bindings but no key material."""
    src = tmp_path / "a.wav"
    src.write_bytes(os.urandom(700_000))
    sealed, back = tmp_path / "a.kbr", tmp_path / "b.wav"
    cfg = ["--config", str(live.config)]
    enc = kb("encrypt", *cfg, "--recording-id", "rec-cli", "--purpose", "support", "--subject", "s-9",
             "--retain-days", "30", "--context", "site=eu", str(src), str(sealed))  # fmt: skip
    assert enc.returncode == 0, enc.stderr
    dec = kb(
        "decrypt", *cfg, "--purpose", "support", "--context", "site=eu", str(sealed), str(back)
    )
    assert dec.returncode == 0, dec.stderr
    assert back.read_bytes() == src.read_bytes()
    shown = kb("inspect", "--json", str(sealed))
    info = json.loads(shown.stdout)
    assert info["recording_id"] == "rec-cli"
    assert info["purposes"] == ["support"]
    assert info["subject_ids"] == ["s-9"]
    assert info["context"] == {"site": "eu"}
    with sealed.open("rb") as fh:
        wrapped = RecordingHeader.read(fh).wrapped_key
    for form in (wrapped.hex(), base64.b64encode(wrapped).decode(), wrapped[-48:].hex()):
        assert form not in shown.stdout
    assert re.search(r"key +recordings\.e\d{4}-\d{2}/v1\n", kb("inspect", str(sealed)).stdout)


def test_refusals_leave_no_output_and_exit_1(live: DevEnv, tmp_path: Path) -> None:
    """Wrong purpose, wrong context, a damaged file or a non-recording: exit 1, clear message,
    no partial plaintext."""
    src = tmp_path / "a.wav"
    src.write_bytes(os.urandom(50_000))
    sealed = tmp_path / "a.kbr"
    cfg = ["--config", str(live.config)]
    assert (
        kb(
            "encrypt",
            *cfg,
            "--recording-id",
            "rec-r",
            "--purpose",
            "support",
            str(src),
            str(sealed),
        ).returncode
        == 0
    )
    damaged = tmp_path / "damaged.kbr"
    data = bytearray(sealed.read_bytes())
    data[-100] ^= 1
    damaged.write_bytes(bytes(data))
    cases = [
        (["--purpose", "marketing", str(sealed)], "not granted"),
        (["--purpose", "support", "--context", "x=y", str(sealed)], "context does not match"),
        (["--purpose", "support", str(damaged)], "damaged or has been tampered with"),
        (["--purpose", "support", str(src)], "not a keybroker recording"),
    ]
    for args, message in cases:
        out_path = tmp_path / "out.wav"
        result = kb("decrypt", *cfg, *args, str(out_path))
        assert result.returncode == 1, (args, result.stderr)
        assert message in result.stderr
        assert not out_path.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_demo_script_runs_end_to_end(live: DevEnv) -> None:
    """scripts/demo.py (make demo) succeeds against a running broker, run as make runs it: a
    relative --state-dir from the folder above it (this once resolved the marketing token's path
    twice). Round trip, purpose refusal, then the privacy plane: erasure refused under a legal
    hold, hold released, erased, unwrap refused; the tokens it writes are mode 600."""
    demo = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--state-dir", live.root.name],
        capture_output=True, text=True, timeout=180, check=False, cwd=live.root.parent,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "identical to the original" in demo.stdout
    assert "purpose_not_bound" in demo.stdout
    out = demo.stdout
    held = out.index("EraseRecording   deny     legal_hold")
    released = out.index("ReleaseLegalHold allow")
    erased = out.index("EraseRecording   allow")
    assert held < released < erased < out.index("UnwrapDataKey    deny     erased")
    assert "will join this demo" not in out
    for token in (live.root / "client.token", live.root / "demo" / "dpo.token"):
        assert token.stat().st_mode & 0o777 == 0o600
