"""Child processes and CPU accounting for the benchmark.

Every server the benchmark starts runs in its own session (process group), so stopping it stops its
workers too, and it is stopped even when the benchmark fails. CPU figures come from
``/proc/<pid>/stat`` (utime + stime) of a process and all its descendants, and from ``/proc/stat``
for the whole machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end the benchmark as Ctrl-C does: every context manager unwinds, so
    every server it started is stopped."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is field 3, the state)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by one process, all its threads included."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    per_pid: Mapping[int, float]
    machine_busy: int
    machine_total: int


@dataclass(frozen=True)
class CpuDelta:
    wall: float
    per_pid: Mapping[int, float]
    machine_busy_fraction: float
    """Share of all cores that was busy (anything: server, client, kernel, noise)."""
    machine_busy_seconds: float

    @property
    def seconds(self) -> float:
        return sum(self.per_pid.values())

    @property
    def cores(self) -> float:
        return self.seconds / self.wall if self.wall > 0 else 0.0

    def all_in_us(self, client_seconds: float, ops: int) -> float | None:
        """Machine CPU except the client's, per operation."""
        return (self.machine_busy_seconds - client_seconds) * 1e6 / ops if ops else None


def snapshot(roots: Sequence[int]) -> CpuSnapshot:
    pids = [pid for root in roots for pid in process_tree(root)]
    busy, total = _machine_ticks()
    return CpuSnapshot(time.monotonic(), {pid: process_cpu(pid) for pid in pids}, busy, total)


def delta(before: CpuSnapshot, after: CpuSnapshot) -> CpuDelta:
    per_pid = {pid: cpu - before.per_pid.get(pid, 0.0) for pid, cpu in after.per_pid.items()}
    total = after.machine_total - before.machine_total
    busy = after.machine_busy - before.machine_busy
    return CpuDelta(
        after.wall - before.wall, per_pid, busy / total if total else 0.0, busy / CLK_TCK
    )


class Child:
    """A child process in a new session, logging to a file; stopped with its whole group."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = Path(argv[0]).name
        self.log = log
        self._fh = log.open("wb")
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._fh,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            self._fh.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pause(self) -> None:
        """Freeze the whole group (SIGSTOP), so that an idle server disturbs no measurement."""
        if self.alive():
            _signal_group(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_group(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the group; SIGKILL to whatever of it is left after ``timeout``."""
        pgid = self.proc.pid  # the session leader: its pid is the group id
        try:
            if self.alive():
                _signal_group(pgid, signal.SIGCONT)  # a paused group cannot act on SIGTERM
                _signal_group(pgid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(pgid, signal.SIGKILL)
                    self.proc.wait(5)
            deadline = time.monotonic() + 5
            while _signal_group(pgid, 0) and time.monotonic() < deadline:
                time.sleep(0.1)  # workers finishing their own shutdown
            _signal_group(pgid, signal.SIGKILL)
        finally:
            self._fh.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def paused(children: Iterable[Child]) -> Iterator[None]:
    """Freeze ``children`` for the duration of the block, and thaw them even on failure."""
    frozen = list(children)
    try:
        for child in frozen:
            child.pause()
        yield
    finally:
        for child in frozen:
            child.resume()


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group we created; False if it has no members left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_quiet(threshold: float = 0.15, window: float = 0.5, timeout: float = 15.0) -> float:
    """Wait until the machine's busy share over ``window`` seconds is below ``threshold``
    (the previous phase's servers have caught up); give up after ``timeout``. Returns the last
    busy share seen."""
    os.sync()  # write back dirty pages (e.g. the broker's journal) now, not in the next window
    deadline = time.monotonic() + timeout
    busy_share = 1.0
    while time.monotonic() < deadline:
        b0, t0 = _machine_ticks()
        time.sleep(window)
        b1, t1 = _machine_ticks()
        busy_share = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        if busy_share < threshold:
            break
    return busy_share
