"""Side-by-side A/B of broker variants: git revisions, process counts or settings, same session.

Each variant is ``NAME=REV[:PROCESSES][,KEY=VALUE...]``: ``REV`` a git revision (``.`` for the
working tree), ``KEY=VALUE`` any ``KEYBROKER_*`` setting or ``GRPC_*`` variable. A revision other
than ``.`` is checked out with ``git worktree`` under bench/.work/ab/ and run through
``PYTHONPATH`` with this checkout's virtual environment, so only keybroker's own code differs.
Every round starts a fresh broker for each variant in turn (the order reversed every other round),
runs one closed-loop UnwrapDataKey phase with bench/loadgen.cc (16 in flight on 16 connections, or
each of ``--concurrency``'s levels, one connection per call in flight), and stops it. Prints one
line per phase and, at the end, each variant's rates and every variant's per-round ratio to the
first at the same level.

    .venv/bin/python bench/ab.py old=79d1136 new=. --rounds 3
    .venv/bin/python bench/ab.py p2=.:2 p3=.:3
    .venv/bin/python bench/ab.py on=. off=.,KEYBROKER_AUDIT_DIR=
    .venv/bin/python bench/ab.py new=. defaults=.,GRPC_EXPERIMENTS=
    .venv/bin/python bench/ab.py on=. off=.,KEYBROKER_AUDIT_DIR= --concurrency 16,32,64

A ``GRPC_*`` setting (e.g. ``GRPC_EXPERIMENTS``, whose value may hold commas) reaches the broker's
environment too; an empty ``GRPC_EXPERIMENTS`` runs gRPC core's defaults (``keybroker`` only sets
the variable when it is absent: keybroker.server.grpc_settings).

A benchmark, not a test: bounded by ``--rounds`` and ``--duration``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import broker
import deps

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work" / "ab"


@dataclass(frozen=True)
class Variant:
    name: str
    source: Path
    processes: int
    overrides: dict[str, str]


def checkout(rev: str) -> Path:
    """The src/ directory of ``rev`` (``.``: this working tree)."""
    if rev == ".":
        return ROOT / "src"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = WORK / f"rev-{commit}"
    if not tree.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-f", str(tree), commit],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return tree / "src"


def parse_variant(text: str) -> Variant:
    name, _, spec = text.partition("=")
    if not name or not spec:
        raise SystemExit(f"bench/ab.py: variant {text!r} is not NAME=REV[:PROCESSES][,KEY=VALUE]")
    head, *settings = re.split(r",(?=[A-Z][A-Z0-9_]*=)", spec)  # a value may hold commas
    rev, _, procs = head.partition(":")
    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith(("KEYBROKER_", "GRPC_")):
            raise SystemExit(f"bench/ab.py: {item!r} is not a KEYBROKER_*= or GRPC_*= setting")
        overrides[key] = value
    return Variant(name, checkout(rev), int(procs or 3), overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("variants", nargs="+", help="NAME=REV[:PROCESSES][,KEYBROKER_X=V|GRPC_X=V...]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument(
        "--concurrency",
        default="16",
        help="calls in flight, or a comma-separated list of levels each variant runs at (16)",
    )
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    levels = [int(c) for c in args.concurrency.split(",")]
    if not all(1 <= c <= 256 for c in levels):
        raise SystemExit("bench/ab.py: --concurrency levels must be 1..256")
    loadgen, _ = deps.tools(openbao=False)
    rates: dict[tuple[str, int], list[float]] = {(v.name, c): [] for v in variants for c in levels}
    for round_no in range(args.rounds):
        order = variants if round_no % 2 == 0 else variants[::-1]
        for c, v in [(c, v) for c in levels for v in order]:
            spec = broker.LoadSpec(c, c, args.warmup, args.duration, 5_000_000)
            os.environ["PYTHONPATH"] = str(v.source)  # the spawned broker imports this keybroker
            work = WORK / f"run-{v.name}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            with broker.running_broker(
                work, processes=v.processes, threads=4, overrides=v.overrides
            ) as kb:
                m = broker.run_load(loadgen, kb, broker.UNWRAP, spec, work / "loadgen.log")
            rates[v.name, c].append(m.rate)
            print(
                f"round {round_no + 1} {v.name} ({c} in flight): {m.rate:,.0f} ops/s, p50 "
                f"{m.p50_ms or 0:.2f} ms, server "
                f"{m.server_cpu_us or 0:,.0f} µs/op, machine busy {m.machine_busy or 0:.0%}, "
                f"errors {m.errors}",
                flush=True,
            )
    base = variants[0].name
    for c, v in [(c, v) for c in levels for v in variants]:
        got = rates[v.name, c]
        line = f"{v.name} ({c} in flight): ops/s {', '.join(f'{r:,.0f}' for r in got)}"
        if v.name != base:
            ratios = [a / b for a, b in zip(got, rates[base, c], strict=True)]
            line += (
                f"; ÷ {base} per round {', '.join(f'{r:.2f}' for r in ratios)}"
                f" (median {statistics.median(ratios):.2f}x)"
            )
        print(line)


if __name__ == "__main__":
    main()
