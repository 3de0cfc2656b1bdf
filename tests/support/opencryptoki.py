"""openCryptoki's software token (swtok) for tests: ``pkcsslotd`` started here, the token
initialised here.

openCryptoki keeps its state at fixed system paths (``/etc/opencryptoki``, ``/var/lib/opencryptoki``,
``/var/run/pkcsslotd.*``), so this needs root (or the ``pkcs11`` group and a running daemon), as in
CI. The swtok is reset and initialised with a fresh user PIN on every use (the SO PIN stays
openCryptoki's factory default: a throwaway token): only a token these tests initialised before
(their marker file is in the token directory) or a never-initialised one is touched, and only
while no pkcsslotd they did not start is running; anything else is refused, so a machine that
really uses its soft token keeps it.
PINs never appear on a command line (openCryptoki's PINs are 4 to 8 characters).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

DAEMON = Path("/usr/sbin/pkcsslotd")
PID_FILE = Path("/var/run/pkcsslotd.pid")
SOCKET = Path("/var/run/pkcsslotd.socket")
CONFIG = Path("/etc/opencryptoki/opencryptoki.conf")
SWTOK = Path("/var/lib/opencryptoki/swtok")
MARKER = SWTOK / "keybroker-test.json"
LABEL = "keybroker-ock"
DEFAULT_SO_PIN = "87654321"  # openCryptoki's documented factory SO PIN
LIBRARIES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libopencryptoki.so",
    "/usr/lib64/opencryptoki/libopencryptoki.so",
    "/usr/lib/opencryptoki/libopencryptoki.so",
)


@dataclass(frozen=True)
class OpenCryptoki:
    library: str
    slot: int
    label: str
    pin: str
    daemon_pid: int | None
    """pkcsslotd's pid if these tests started it (and so stop it), else None."""


INIT = textwrap.dedent(
    """
    import ctypes, json, sys
    import pkcs11
    library, slot, label = sys.argv[1:4]
    so_pin, user_pin = sys.stdin.read().split()
    dl = ctypes.CDLL(library)
    assert dl.C_Initialize(None) == 0
    rv = dl.C_InitToken(ctypes.c_ulong(int(slot)), so_pin.encode(), ctypes.c_ulong(len(so_pin)),
                        label.encode().ljust(32, b" "))
    dl.C_Finalize(None)
    if rv != 0:
        print(json.dumps({"error": hex(rv)}))
        sys.exit(0)
    token = pkcs11.lib(library).get_token(token_label=label)
    with token.open(rw=True, so_pin=so_pin) as session:
        session.init_pin(user_pin)
    with token.open(rw=True, user_pin=user_pin):
        pass
    print(json.dumps({"ok": True}))
    """
)

STATE = textwrap.dedent(
    """
    import ctypes, json, sys
    import pkcs11
    lib = pkcs11.lib(sys.argv[1])
    slot = [s for s in lib.get_slots() if s.slot_id == int(sys.argv[2])][0]
    token = slot.get_token()
    print(json.dumps({"label": token.label, "initialized": bool(token.flags & 0x400)}))
    """
)


def library() -> str | None:
    return next((path for path in LIBRARIES if Path(path).exists()), None)


def soft_token_slot() -> int:
    """The slot whose stdll is the software token, from openCryptoki's configuration."""
    text = CONFIG.read_text()
    for match in re.finditer(r"slot\s+(\d+)\s*\{([^}]*)\}", text):
        if "libpkcs11_sw.so" in match.group(2):
            return int(match.group(1))
    raise RuntimeError(f"{CONFIG} has no slot with stdll libpkcs11_sw.so (the software token)")


def _daemon_running() -> bool:
    return _daemon_pid() is not None and SOCKET.exists()


def _start_daemon() -> int:
    subprocess.run([str(DAEMON)], check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _daemon_running():
            return int(PID_FILE.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError("pkcsslotd did not start (see syslog)")


def _python(script: str, *args: str, secrets_in: str = "") -> dict[str, object]:
    """Run ``script`` in a fresh interpreter; PINs go through stdin, never the command line."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        input=secrets_in, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"openCryptoki set-up step failed:\n{done.stderr[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _daemon_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text().split()[0])
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return None if state == "Z" else pid  # a zombie (its parent has not reaped it) is gone


def _stop_daemon(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _daemon_pid() == pid:
        time.sleep(0.05)


def _factory_reset() -> None:
    """Back to an uninitialised soft token (the daemon must be stopped)."""
    for name in ("NVTOK.DAT", "MK_SO", "MK_USER"):
        (SWTOK / name).unlink(missing_ok=True)
    for entry in (SWTOK / "TOK_OBJ").iterdir():
        entry.unlink()


def start() -> OpenCryptoki:
    """pkcsslotd started by these tests, and the swtok freshly initialised (every object gone)."""
    path = library()
    if path is None or not DAEMON.exists():
        raise RuntimeError(
            "openCryptoki is not installed: apt-get install opencryptoki "
            "(scripts/ensure-system-deps.sh --test does it)"
        )
    if os.geteuid() != 0:
        raise RuntimeError("openCryptoki tests need root to run pkcsslotd (CI runs as root)")
    ours = json.loads(MARKER.read_text()) if MARKER.exists() else None
    running = _daemon_pid()
    if running is not None and ours is not None and ours.get("daemon_pid") == running:
        _stop_daemon(running)  # left over from an earlier run of these tests
        running = None
    if running is not None:
        raise RuntimeError(
            f"pkcsslotd (pid {running}) is already running and was not started by keybroker's "
            "tests: stop it first (they re-initialise openCryptoki's software token)"
        )
    slot = soft_token_slot()
    if ours is not None:
        _factory_reset()
    pid = _start_daemon()
    state = _python(STATE, path, str(slot))
    if state["initialized"]:
        _stop_daemon(pid)
        raise RuntimeError(
            f"openCryptoki's software token (slot {slot}, label {state['label']!r}) is in use on "
            "this machine and was not initialised by keybroker's tests: not touching it"
        )
    fd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"daemon_pid": pid}, fh)
    user_pin = secrets.token_hex(4)
    out = _python(INIT, path, str(slot), LABEL, secrets_in=f"{DEFAULT_SO_PIN} {user_pin}")
    if "error" in out:
        _stop_daemon(pid)
        raise RuntimeError(f"initialising openCryptoki's software token failed: {out['error']}")
    return OpenCryptoki(path, slot, LABEL, user_pin, pid)


def stop(ock: OpenCryptoki) -> None:
    """Stop pkcsslotd (started by :func:`start`)."""
    if ock.daemon_pid is not None:
        _stop_daemon(ock.daemon_pid)
