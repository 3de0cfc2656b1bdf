"""Child processes: `keybroker serve` for crash, recovery and signal tests; scripts run in a fresh
interpreter (what a module imports, what it sets before grpc loads)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from keybroker.devenv import DevEnv

_PORT_RE = re.compile(r"listening on port (\d+)")


def run_fresh(script: str, env: Mapping[str, str] | None = None) -> str:
    """Run a Python script in a new interpreter (this one's venv) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BrokerProcess:
    """`python -m keybroker.cli.main serve --config ...` with its log in a file.

    ``config``: another settings file than the dev environment's. ``new_session``: the broker
    and its worker processes in a process group of their own, so :meth:`kill_group` takes them
    all down at once (as a container runtime does)."""

    def __init__(
        self,
        env: DevEnv,
        log: Path,
        overrides: Mapping[str, str] | None = None,
        *,
        config: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.env = env
        self.log = log
        environ = {
            **os.environ,
            "KEYBROKER_SERVER_LISTEN": "127.0.0.1:0",
            # its own journal: never the in-process session broker's (one writer per chain)
            "KEYBROKER_AUDIT_DIR": str(log.with_suffix(".journal")),
        }
        environ.update(overrides or {})
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keybroker.cli.main", "serve", "--config",
             str(config or env.config)],
            stdout=self._fh, stderr=subprocess.STDOUT, env=environ, start_new_session=new_session,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, count: int = 1, timeout: float = 30) -> int:
        """Port once ``count`` workers have logged that they listen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = _PORT_RE.findall(self.output())
            if len(ports) >= count:
                return int(ports[0])
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited early:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"broker did not start in {timeout}s:\n{self.output()}")

    def kill_group(self) -> None:
        """SIGKILL the broker and every worker process (needs ``new_session``)."""
        os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._fh.close()
        return code


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m keybroker.cli.main ARGS` with ``env`` added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "keybroker.cli.main", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def stop_all(procs: Sequence[BrokerProcess]) -> list[int]:
    """Stop every process (each one, even if another fails to stop); their exit codes."""
    codes = []
    for proc in procs:
        try:
            codes.append(proc.stop())
        except Exception:
            codes.append(-1)
    return codes
