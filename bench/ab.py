"""Side-by-side A/B of broker variants: git revisions, process counts or settings, same session.

Each variant is ``NAME=REV[:PROCESSES][,KEY=VALUE...]``: ``REV`` a git revision (``.`` for the
working tree), ``KEY=VALUE`` any ``KEYBROKER_*`` setting or ``GRPC_*`` variable. A revision other
than ``.`` is checked out with ``git worktree`` under bench/.work/ab/ and run through
``PYTHONPATH`` with this checkout's virtual environment, so only keybroker's own code differs.
Every round starts a fresh broker for each variant in turn (the order reversed every other round),
runs one closed-loop phase per method of ``--methods`` with bench/loadgen.cc (16 in flight on 16
connections, or each of ``--concurrency``'s levels, one connection per call in flight), and stops
it. Methods: UnwrapDataKey (``unwrap``, the default); GenerateDataKey (``generate``, a new
recording id per call); RewrapDataKeys (``rewrap``: 100 version-1 keys after one rotation, 4
calls in flight whatever ``--concurrency`` says, counted per item; retention epochs are then off
in every variant, as in bench/versions_and_rewrap.py). Prints one line per phase and, at the end,
each variant's rates and server CPU per call, and every variant's per-round ratios to the first
at the same method and level: ops/s, and server CPU per call (the steadier figure while other
work shares the machine).

    .venv/bin/python bench/ab.py old=79d1136 new=. --rounds 3
    .venv/bin/python bench/ab.py p2=.:2 p3=.:3
    .venv/bin/python bench/ab.py on=. off=.,KEYBROKER_AUDIT_ENABLED=false
    .venv/bin/python bench/ab.py new=. defaults=.,GRPC_EXPERIMENTS=
    .venv/bin/python bench/ab.py on=. off=.,KEYBROKER_AUDIT_ENABLED=false --concurrency 16,32,64
    .venv/bin/python bench/ab.py before=01bba6d after=. --methods unwrap,generate --rounds 5

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
from report import Measurement
from versions_and_rewrap import NO_EPOCHS, REWRAP, prepare

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work" / "ab"
METHODS = {"unwrap": broker.UNWRAP, "generate": broker.GENERATE, "rewrap": REWRAP}
REWRAP_ITEMS = 100
REWRAP_IN_FLIGHT = 4
Key = tuple[str, str, int]  # variant, method, calls in flight


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
    p.add_argument(
        "--methods",
        default="unwrap",
        help="comma-separated: unwrap, generate, rewrap (each runs on the same broker start)",
    )
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or not set(methods) <= set(METHODS):
        raise SystemExit(f"bench/ab.py: --methods must name some of {', '.join(METHODS)}")
    variants = [parse_variant(v) for v in args.variants]
    levels = [int(c) for c in args.concurrency.split(",")]
    if not all(1 <= c <= 256 for c in levels):
        raise SystemExit("bench/ab.py: --concurrency levels must be 1..256")
    loadgen, _ = deps.tools(openbao=False)
    rates: dict[Key, list[float]] = {}
    cpus: dict[Key, list[float]] = {}
    for round_no in range(args.rounds):
        order = variants if round_no % 2 == 0 else variants[::-1]
        for c, v in [(c, v) for c in levels for v in order]:
            spec = broker.LoadSpec(c, c, args.warmup, args.duration, 5_000_000)
            os.environ["PYTHONPATH"] = str(v.source)  # the spawned broker imports this keybroker
            work = WORK / f"run-{v.name}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            overrides = {**(NO_EPOCHS if "rewrap" in methods else {}), **v.overrides}
            with broker.running_broker(
                work, processes=v.processes, threads=4, overrides=overrides
            ) as kb:
                files = prepare(kb, 2) if "rewrap" in methods else {}
                for method in methods if round_no % 2 == 0 else methods[::-1]:
                    m, per = _phase(
                        loadgen, kb, method, spec, files=files, log=work / "loadgen.log"
                    )
                    rates.setdefault((v.name, method, c), []).append(m.rate * per)
                    cpus.setdefault((v.name, method, c), []).append((m.server_cpu_us or 0) / per)
                    print(
                        f"round {round_no + 1} {v.name} {method} "
                        f"({REWRAP_IN_FLIGHT if per > 1 else c} in flight): "
                        f"{m.rate * per:,.0f} {'items' if per > 1 else 'ops'}/s, p50 "
                        f"{m.p50_ms or 0:.2f} ms, server {(m.server_cpu_us or 0) / per:,.0f} "
                        f"µs/{'item' if per > 1 else 'op'}, machine busy "
                        f"{m.machine_busy or 0:.0%}, errors {m.errors}",
                        flush=True,
                    )
                    if m.errors:
                        raise SystemExit(f"bench/ab.py: {m.errors} calls failed: {m.extra}")
    base = variants[0].name
    for c, method, v in [(c, m, v) for c in levels for m in methods for v in variants]:
        key = (v.name, method, c)
        got, cpu = rates[key], cpus[key]
        line = (
            f"{v.name} {method} ({REWRAP_IN_FLIGHT if method == 'rewrap' else c} in flight): "
            f"ops/s {', '.join(f'{r:,.0f}' for r in got)}"
            f" (median {statistics.median(got):,.0f}); server µs/op "
            f"{', '.join(f'{u:,.0f}' for u in cpu)} (median {statistics.median(cpu):,.0f})"
        )
        if v.name != base:
            line += (
                f"; ÷ {base} per round: ops/s {_ratios(got, rates[base, method, c])},"
                f" server µs/op {_ratios(cpu, cpus[base, method, c])}"
            )
        print(line)


def _phase(
    loadgen: Path,
    kb: broker.Broker,
    method: str,
    spec: broker.LoadSpec,
    *,
    files: dict[str, Path],
    log: Path,
) -> tuple[Measurement, int]:
    """One phase; the measurement and the items per call."""
    if method != "rewrap":
        return broker.run_load(loadgen, kb, METHODS[method], spec, log), 1
    batch = broker.LoadSpec(
        REWRAP_IN_FLIGHT, REWRAP_IN_FLIGHT, spec.warmup, spec.duration, spec.max_calls
    )
    m = broker.run_load(
        loadgen,
        kb,
        REWRAP,
        batch,
        log,
        request=files[f"rewrap_{REWRAP_ITEMS}"],
        token=files["rewrap_token"],
    )
    return m, REWRAP_ITEMS


def _ratios(got: list[float], base: list[float]) -> str:
    ratios = [a / b for a, b in zip(got, base, strict=True) if b]
    if not ratios:
        return "-"
    return (
        f"{', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f}x,"
        f" range {min(ratios):.3f}-{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
