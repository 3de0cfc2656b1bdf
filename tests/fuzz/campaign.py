"""The long fuzzing campaign (``make fuzz``): every harness in turn, one process at a time.

    python -m tests.fuzz.campaign [--out DIR] [--scale F] [--only NAME,...] [--seed N]

Each harness runs for its planned number of executions (``PLAN`` times ``--scale``), bounded in
time as well (``-max_total_time``). The RPC harness runs in chunks of fresh processes (its broker's
state grows with every call that creates keys, holds or journal records); the others in one
process. New inputs go to ``DIR/corpus/<harness>`` (the committed seeds in
``tests/fuzz/corpus/<harness>`` are read, never written), crashes to ``DIR/artifacts/``, each
process's libFuzzer output to ``DIR/logs/``, and the figures to ``DIR/summary.json`` and
``DIR/summary.md``: exact commands, executions and seconds per harness. The exit status is 1 if
any harness failed (a crash or a property broken), 0 otherwise.

Run it niced (``nice -n 10``, as ``make fuzz`` does) on a shared machine: it keeps one core busy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.fuzz._common import CORPUS, HARNESSES

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Plan:
    runs: int
    """Executions to reach."""
    max_seconds: int
    """Bound on the harness's total time."""
    chunk: int = 0
    """Executions per process (0: one process)."""


PLAN = {  # in the order they run: the bulk first, then the slow RPC harness, then the rest
    "wrapped_key": Plan(7_000_000, 1800),
    "rpc": Plan(100_000, 3600, chunk=4_000),
    "tokens": Plan(500_000, 1800),
    "settings": Plan(500_000, 1800),
    "recording": Plan(2_500_000, 1800),
}

_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.MULTILINE)
_STAT = re.compile(r"^#(\d+)\s+(?:DONE|INITED|NEW|REDUCE|pulse)\s+cov: (\d+)", re.MULTILINE)


@dataclass
class Result:
    harness: str
    runs: int = 0
    seconds: float = 0.0
    processes: int = 0
    coverage: int = 0
    crashes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.crashes


def _one_process(
    harness: str, runs: int, seconds: int, seed: int, out: Path, log: Path
) -> tuple[int, int, list[str], str, float]:
    """Run one fuzzing process; (executions, coverage, crash files, command, wall seconds)."""
    scratch = out / "corpus" / harness
    artifacts = out / "artifacts" / harness
    tmp = out / "tmp"
    for folder in (scratch, artifacts, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "tests.fuzz.run",
        harness,
        f"-runs={runs}",
        f"-max_total_time={seconds}",
        f"-seed={seed}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(scratch),
        str(CORPUS / harness),
    ]
    before = set(artifacts.iterdir())
    started = time.monotonic()
    with log.open("w") as sink:
        rc = subprocess.run(
            argv,
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(tmp)},
            check=False,
        ).returncode
    wall = time.monotonic() - started
    for leftover in tmp.iterdir():  # a broker's scratch state (atheris exits without atexit)
        shutil.rmtree(leftover, ignore_errors=True)
    text = log.read_text(errors="replace")
    done = _DONE.search(text)
    stats = _STAT.findall(text)
    executed = int(done.group(1)) if done else (int(stats[-1][0]) if stats else 0)
    coverage = int(stats[-1][1]) if stats else 0
    crashes = sorted(str(p) for p in set(artifacts.iterdir()) - before)
    if rc != 0 and not crashes:
        crashes = [f"exit status {rc} (see {log})"]
    return executed, coverage, crashes, shlex.join(argv), wall


def run_harness(harness: str, plan: Plan, out: Path, seed: int) -> Result:
    result = Result(harness)
    deadline = time.monotonic() + plan.max_seconds
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while result.runs < plan.runs and result.ok:
        left = int(deadline - time.monotonic())
        if left <= 0:
            break
        runs = min(plan.chunk or plan.runs, plan.runs - result.runs)
        log = logs / f"{harness}-{result.processes:04d}.log"
        executed, coverage, crashes, command, wall = _one_process(
            harness, runs, left, seed + result.processes, out, log
        )
        result.runs += executed
        result.seconds += wall
        result.processes += 1
        result.coverage = max(result.coverage, coverage)
        result.crashes += crashes
        if len(result.commands) < 2:
            result.commands.append(command)
        print(
            f"{harness}: {result.runs}/{plan.runs} runs, {result.seconds:.0f} s, "
            f"{result.processes} process(es), cov {result.coverage}",
            flush=True,
        )
        if executed == 0:
            result.crashes.append(f"no executions (see {log})")
    return result


def summary(results: list[Result], started: str, argv: list[str]) -> str:
    lines = [
        f"Fuzzing campaign started {started}, command: `{shlex.join(argv)}`",
        "",
        "| harness | executions | seconds | exec/s | processes | coverage | crashes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rate = r.runs / r.seconds if r.seconds else 0
        lines.append(
            f"| {r.harness} | {r.runs:,} | {r.seconds:,.0f} | {rate:,.0f} | {r.processes} | "
            f"{r.coverage} | {len(r.crashes) or 'none'} |"
        )
    total = sum(r.runs for r in results)
    seconds = sum(r.seconds for r in results)
    lines.append(f"| **total** | **{total:,}** | **{seconds:,.0f}** | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".fuzz")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every planned count")
    parser.add_argument("--only", default="", help="comma-separated harnesses (default: all)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    only = [h for h in args.only.split(",") if h] or list(PLAN)
    unknown = set(only) - set(HARNESSES)
    if unknown:
        parser.error(f"unknown harness(es): {sorted(unknown)}")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = []
    for harness in only:
        plan = PLAN[harness]
        scaled = Plan(max(1, int(plan.runs * args.scale)), plan.max_seconds, plan.chunk)
        results.append(run_harness(harness, scaled, args.out, args.seed))
        if not results[-1].ok:
            print(f"{harness}: FAILED: {results[-1].crashes}", flush=True)
    text = summary(results, started, [sys.executable, "-m", "tests.fuzz.campaign", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(
        json.dumps({"started": started, "results": [asdict(r) for r in results]}, indent=2)
    )
    print(text)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
