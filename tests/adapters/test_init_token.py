"""softhsm/init-token.sh: PINs from a file or stdin, never on a command line; the SO PIN is
never stored beside the user PIN."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "softhsm" / "init-token.sh"
SO_PIN = "so-pin-for-the-test-7f3a"


def _init(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the script with PYTHON pointing at a wrapper that logs every argument it gets."""
    wrapper = tmp_path / "python-logging-args"
    wrapper.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path / "argv.log"}\nexec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return subprocess.run(
        [str(SCRIPT), *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHON": str(wrapper)},
    )  # fmt: skip


def _so_login_works(hsm: Path, label: str, so_pin: str) -> bool:
    script = (
        "import sys, pkcs11\n"
        "from keybroker.devenv import softhsm_module\n"
        "token = pkcs11.lib(softhsm_module()).get_token(token_label=sys.argv[1])\n"
        "with token.open(rw=True, so_pin=sys.stdin.readline().strip()):\n"
        "    print('so ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, label], input=so_pin + "\n",
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "SOFTHSM2_CONF": str(hsm / "softhsm2.conf")},
    )  # fmt: skip
    return done.stdout.strip() == "so ok"


def test_so_pin_from_stdin_never_on_a_command_line_nor_beside_the_user_pin(
    tmp_path: Path,
) -> None:
    hsm = tmp_path / "hsm"
    done = _init(tmp_path, str(hsm), "pins-token", stdin=SO_PIN + "\n")
    assert done.returncode == 0, done.stderr
    user_pin = (hsm / "user.pin").read_text()
    assert stat.S_IMODE((hsm / "user.pin").stat().st_mode) == 0o600
    logged = (tmp_path / "argv.log").read_text()
    assert SO_PIN not in logged and user_pin not in logged
    stored = [p for p in hsm.rglob("*") if p.is_file() and SO_PIN.encode() in p.read_bytes()]
    assert stored == []
    assert _so_login_works(hsm, "pins-token", SO_PIN)


def test_so_pin_from_a_file_outside_the_token_directory(tmp_path: Path) -> None:
    hsm = tmp_path / "hsm"
    so_file = tmp_path / "vault" / "so.pin"
    so_file.parent.mkdir()
    so_file.write_text(SO_PIN + "\n")
    done = _init(tmp_path, str(hsm), "file-token", "--so-pin-file", str(so_file))
    assert done.returncode == 0, done.stderr
    assert not (hsm / "so.pin").exists()
    assert _so_login_works(hsm, "file-token", SO_PIN)


@pytest.mark.parametrize("where", ["inside", "old-layout"])
def test_an_so_pin_beside_the_user_pin_is_refused(tmp_path: Path, where: str) -> None:
    """A --so-pin-file inside the token directory, or an so.pin left there by the old script,
    is refused with a message naming the new way."""
    hsm = tmp_path / "hsm"
    hsm.mkdir()
    (hsm / "so.pin").write_text(SO_PIN)
    args = ["--so-pin-file", str(hsm / "so.pin")] if where == "inside" else []
    done = _init(tmp_path, str(hsm), "refused-token", *args, stdin=SO_PIN + "\n")
    assert done.returncode == 2
    assert "--so-pin-file" in done.stderr or "beside the user PIN" in done.stderr
    assert not (hsm / "tokens").exists() or not any((hsm / "tokens").iterdir())
