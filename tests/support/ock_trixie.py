"""openCryptoki 3.23's software token (Debian 13's), for the HSM tests on a Debian 12 host.

Debian 12's openCryptoki 3.8 soft token has no CKM_AES_GCM (tests/support/opencryptoki.py);
3.23 has, but needs a newer C library than the host's. So scripts/ock-trixie-root.sh builds a
minimal Debian 13 root once (.venv/ock-trixie, reused while its stamp matches), and :func:`start`
runs ``pkcsslotd`` inside it, in namespaces of its own:

- a mount namespace: the root is mounted read-only, with fresh tmpfs on ``/run``, ``/tmp``,
  ``/dev/shm``, ``/var/log`` and ``/var/lib/opencryptoki`` (the token state, copied from the
  pristine state saved at build time), and this repository read-only at
  ``/opt/keybroker/repo``; nothing is mounted on the host, and everything goes with the namespace;
- an IPC namespace: openCryptoki's shared memory never meets the host's openCryptoki;
- a PID namespace: when its first process dies (:func:`stop`, or this process dying) every
  process in it, pkcsslotd too, is killed.

:meth:`Trixie.command` gives the command line that runs a program inside (``nsenter``): the
adapter tests run their driver there, tests/server/test_opencryptoki.py runs pytest there, with
the root's Python and venv and keybroker's own ``src``. The token is initialised here with a fresh user PIN (PINs go through stdin).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.opencryptoki import DEFAULT_SO_PIN, INIT

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / ".venv" / "ock-trixie"
BUILD = REPO / "scripts" / "ock-trixie-root.sh"
PYTHON = "/opt/venv/bin/python"
REPO_INSIDE = "/opt/keybroker/repo"
SRC = f"{REPO_INSIDE}/src"
LABEL = "keybroker-ock3"
LIBRARY_GLOB = "usr/lib/*/pkcs11/libopencryptoki.so"

# Run as the first process of the new PID namespace, before the chroot: mounts, then pkcsslotd.
HOLDER = r"""
set -eu
R=$1 REPO=$2
mount --bind "$R" "$R"
mount -o remount,bind,ro "$R"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/dev/shm"
mount -t proc proc "$R/proc"
for dir in run tmp var/log var/lib/opencryptoki; do mount -t tmpfs tmpfs "$R/$dir"; done
mount --bind "$REPO" "$R/opt/keybroker/repo"
mount -o remount,bind,ro "$R/opt/keybroker/repo"
exec chroot "$R" /bin/sh -euc '
  cp -a /opt/keybroker/ock-state/. /var/lib/opencryptoki/
  chown root:pkcs11 /var/lib/opencryptoki && chmod 0770 /var/lib/opencryptoki
  install -d -m 0770 -g pkcs11 /var/log/opencryptoki
  install -d -m 1777 /run/lock
  install -d -m 0770 -g pkcs11 /run/lock/opencryptoki
  install -d -m 0710 -o pkcsslotd -g pkcs11 /run/opencryptoki
  /usr/sbin/pkcsslotd
  echo ready
  exec sleep infinity
'
"""


@dataclass(frozen=True)
class Trixie:
    holder: subprocess.Popen[str]
    pid: int
    """The host pid of the namespace's first process (``nsenter`` targets it)."""
    library: str
    slot: int
    label: str
    pin: str
    version: str

    def command(self, *args: str, env: dict[str, str] | None = None) -> list[str]:
        """``args`` run inside the root (its Python is :data:`PYTHON`), in a clean environment
        (plus ``env``) with keybroker's ``src`` on the path, in the root's ``/tmp``."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return [
            "nsenter", f"--target={self.pid}", "--mount", "--ipc", "--pid", "--root",
            "--wd", "/usr/bin/env", "-i", "--chdir=/tmp", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            f"PYTHONPATH={SRC}", "PYTHONDONTWRITEBYTECODE=1", "LANG=C.UTF-8", *extra, *args,
        ]  # fmt: skip

    def write_secret(self, path: str, text: str) -> None:
        """A file only root can read inside the root (its ``/tmp`` is the namespace's tmpfs)."""
        subprocess.run(
            self.command("/bin/sh", "-c", 'umask 077 && cat > "$1"', "sh", path),
            input=text, text=True, check=True, timeout=30,
        )  # fmt: skip


def build() -> Path:
    """The root, built by scripts/ock-trixie-root.sh if it is not there yet (fails loudly)."""
    done = subprocess.run(
        [str(BUILD), str(ROOT)], capture_output=True, text=True, timeout=1800, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"building the openCryptoki 3.23 root failed ({BUILD.name}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
    return ROOT


def soft_token_slot(root: Path) -> int:
    text = (root / "etc/opencryptoki/opencryptoki.conf").read_text()
    for match in re.finditer(r"slot\s+(\d+)\s*\{([^}]*)\}", text):
        if "libpkcs11_sw.so" in match.group(2):
            return int(match.group(1))
    raise RuntimeError("the trixie root's opencryptoki.conf has no software token slot")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def start() -> Trixie:
    """pkcsslotd running in the trixie root and its software token freshly initialised."""
    if os.geteuid() != 0:
        raise RuntimeError(
            "openCryptoki 3.23 tests need root (namespaces, chroot; CI runs as root)"
        )
    root = build()
    libraries = sorted(root.glob(LIBRARY_GLOB))
    if len(libraries) != 1:
        raise RuntimeError(f"libopencryptoki.so not found once in {root}: {libraries}")
    library = "/" + str(libraries[0].relative_to(root))
    slot = soft_token_slot(root)
    holder = subprocess.Popen(
        ["unshare", "--mount", "--ipc", "--pid", "--fork", "--kill-child",
         "--propagation", "private", "sh", "-c", HOLDER, "holder", str(root), str(REPO)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
    )  # fmt: skip
    assert holder.stdout is not None
    line = holder.stdout.readline().strip()  # blocks until "ready" or the holder exits
    if line != "ready":
        holder.kill()
        _, err = holder.communicate(timeout=10)
        raise RuntimeError(f"pkcsslotd did not start in the trixie root: {line!r} {err[-2000:]}")
    children = _children(holder.pid)
    if len(children) != 1:
        stop_holder(holder)
        raise RuntimeError(f"unshare has children {children}, expected one")
    version = (root / "var/lib/dpkg/status").read_text()
    found = re.search(r"Package: opencryptoki\n(?:.+\n)*?Version: (\S+)", version)
    trixie = Trixie(
        holder, children[0], library, slot, LABEL, secrets.token_hex(4),
        found.group(1) if found else "unknown",
    )  # fmt: skip
    try:
        _initialise(trixie)
    except BaseException:
        stop(trixie)
        raise
    return trixie


def _initialise(trixie: Trixie) -> None:
    deadline = time.monotonic() + 10
    while True:  # pkcsslotd has forked into the background; its socket may come a moment later
        done = subprocess.run(
            trixie.command(PYTHON, "-c", INIT, trixie.library, str(trixie.slot), trixie.label),
            input=f"{DEFAULT_SO_PIN} {trixie.pin}", capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        out = done.stdout.strip().splitlines()
        if done.returncode == 0 and out and json.loads(out[-1]).get("ok"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"initialising openCryptoki 3.23's software token failed:\n{done.stdout[-1000:]}"
                f"\n{done.stderr[-2000:]}"
            )
        time.sleep(0.2)


def stop_holder(holder: subprocess.Popen[str]) -> None:
    """Kill unshare (it ignores SIGTERM while it waits): with --kill-child its death SIGKILLs
    the namespace's first process, and with it every process in the namespace; the mounts go
    with the namespace."""
    with contextlib.suppress(ProcessLookupError):
        holder.kill()
    holder.communicate(timeout=10)


def stop(trixie: Trixie) -> None:
    stop_holder(trixie.holder)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{trixie.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if Path(f"/proc/{trixie.pid}").exists():
        print(f"trixie root: pid {trixie.pid} still alive", file=sys.stderr)
