"""Throughput against calls in flight: each server's capacity, and the ratios at every level.

    .venv/bin/python bench/capacity.py [--levels 16,64,128,256] [--rounds R] [--duration S]

bench/run.py measures every row at one level of load (16 calls in flight). A closed-loop load that
light measures latency as much as capacity: a server that answers in batches (keybroker's group
commit) or one that is slowed by a lock (OpenBao's token lookup) shows it differently at different
levels. This sweep runs the rows the issue targets — keybroker UnwrapDataKey with the durable
journal, the same broker with the journal off, OpenBao transit decrypt with a typical and a lean
token on an OpenBao with its file audit device on — and the broker's empty call (Health/Check,
answered by the same loop as unwrap: the most any handler on this server can reach) at each level,
in rounds (each level's phases next to each other in time, their order reversed every other round;
the servers not under test frozen, as in run.py), and reports:

* ops/s, p50 and p99 per row and level (medians over the rounds);
* each ratio per level, and **at capacity**: per round, the best level of one row against the
  best level of the other (each server at the load it handles best), then the median.

Writes bench/results/capacity.md (and capacity.json). A benchmark, not a test: bounded by
``--rounds``, ``--levels`` and ``--duration``; every process it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # run as a script: the sibling modules are importable
    sys.path.insert(0, str(BENCH))

import broker  # noqa: E402
import deps  # noqa: E402
import openbao  # noqa: E402
import procs  # noqa: E402
from report import DASH, Measurement, X  # noqa: E402

from keybroker.core.wrapped_key import WrappedKey  # noqa: E402

WORK = BENCH / ".work"
RESULTS = BENCH / "results"

ROWS = {
    "kb_unwrap": "keybroker UnwrapDataKey (durable journal)",
    "kb_unwrap_nojournal": "keybroker UnwrapDataKey, audit journal off",
    "bao_decrypt_typical": "OpenBao transit decrypt, typical token + file audit",
    "bao_decrypt_lean": "OpenBao transit decrypt, lean token + file audit",
    "kb_health": "keybroker Health/Check (empty call: the server's floor)",
}
RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    # label, numerator row, denominator row, issue target (None: none)
    ("unwrap ÷ OpenBao decrypt (typical token)", "kb_unwrap", "bao_decrypt_typical", 1.5),
    ("unwrap ÷ OpenBao decrypt (lean token)", "kb_unwrap", "bao_decrypt_lean", 1.5),
    ("unwrap, journal on ÷ journal off", "kb_unwrap", "kb_unwrap_nojournal", 0.85),
    # the ceiling: no handler on this server runs faster than an empty call
    ("empty call ÷ OpenBao decrypt (lean token)", "kb_health", "bao_decrypt_lean", None),
    ("unwrap ÷ empty call", "kb_unwrap", "kb_health", None),
)

Results = dict[str, dict[int, list[Measurement]]]  # row -> level -> one measurement per round


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="16,64,128,256", help="calls in flight, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per phase (8)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help='broker processes (0, the default: [server] processes = "auto", as deployed)',
    )
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--skip-openbao", action="store_true", help="keybroker rows only")
    args = p.parse_args(argv)
    args.level_list = sorted({int(x) for x in args.levels.split(",") if x})
    if not args.level_list or not all(1 <= c <= 1024 for c in args.level_list):
        p.error("--levels must be 1..1024 each")
    if not 1 <= args.rounds <= 20 or not 1 <= args.duration <= 300:
        p.error("--rounds must be 1..20 and --duration 1..300 seconds")
    return args


def ratio_rows(results: Results, levels: list[int], rounds: int) -> list[str]:
    """The markdown rows of the ratio table: per level, and at capacity (best ÷ best)."""
    lines = []
    for label, num, den, target in RATIOS:
        if num not in results or den not in results:
            continue
        cells = []
        for level in levels:
            per_round = [
                a.rate / b.rate
                for a, b in zip(results[num][level], results[den][level], strict=True)
            ]
            cells.append(f"{statistics.median(per_round):.2f}{X}")
        best = [
            max(results[num][c][r].rate for c in levels)
            / max(results[den][c][r].rate for c in levels)
            for r in range(rounds)
        ]
        median = statistics.median(best)
        if target is None:
            goal, met = DASH, ""
        else:
            goal, met = f"{target:g}{X}", "yes" if median >= target else "no"
        lines.append(
            f"| {label} | {' | '.join(cells)} | **{median:.2f}{X}** "
            f"({min(best):.2f}{DASH}{max(best):.2f}{X}) | {goal} | {met} |"
        )
    return lines


def render(results: Results, args: argparse.Namespace) -> str:
    levels: list[int] = args.level_list
    heads = " | ".join(f"{c} in flight" for c in levels)
    align = "|".join("--:" for _ in levels)
    out = [
        f"# keybroker capacity sweep — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {os.cpu_count()} cores, Linux {platform.release()}; every server and load "
        "generator on this same machine, on 127.0.0.1.",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/capacity.py', *sys.argv[1:]])}`",
        f"Broker processes {args.processes}; {args.rounds} rounds; {args.duration:g} s per phase "
        f"after {args.warmup:g} s warm-up; one connection per call in flight (both servers).",
        "",
        "ops/s (median over the rounds), p50 / p99 ms below:",
        "",
        f"| measurement | {heads} |",
        f"|---|{align}|",
    ]
    for key, label in ROWS.items():
        if key in results:
            cells = [f"{statistics.median(m.rate for m in results[key][c]):,.0f}" for c in levels]
            out.append(f"| {label} | {' | '.join(cells)} |")
    out += ["", f"| latency p50 / p99 ms | {heads} |", f"|---|{align}|"]
    for key, label in ROWS.items():
        if key in results:
            cells = []
            for c in levels:
                p50 = statistics.median(m.p50_ms or 0.0 for m in results[key][c])
                p99 = statistics.median(m.p99_ms or 0.0 for m in results[key][c])
                cells.append(f"{p50:.1f} / {p99:.1f}")
            out.append(f"| {label} | {' | '.join(cells)} |")
    failed = {
        ROWS[key]: sum(m.errors for runs in by_level.values() for m in runs)
        for key, by_level in results.items()
    }
    out += [
        "",
        "Failed calls: "
        + (", ".join(f"{label} {n:,}" for label, n in failed.items() if n) or "none in any phase")
        + ".",
    ]
    out += [
        "",
        f"| ratio (same round) | {heads} | at capacity: best ÷ best (range) | target | met? |",
        f"|---|{align}|--:|--:|---|",
        *ratio_rows(results, levels, args.rounds),
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.stop_on_signals()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = WORK / "capacity-load.log"
    log.write_bytes(b"")
    loadgen, bao_bin = deps.tools(openbao=not args.skip_openbao)
    results: Results = {}

    with ExitStack() as stack:
        start = {"processes": args.processes, "threads": 4}
        kb = stack.enter_context(broker.running_broker(WORK, **start))
        off = stack.enter_context(
            broker.running_broker(
                WORK, **start, name="nojournal", overrides={"KEYBROKER_AUDIT_ENABLED": "false"}
            )
        )

        def grpc_phase(
            target: broker.Broker, method: str = broker.UNWRAP
        ) -> Callable[[int], Measurement]:
            def measure(level: int) -> Measurement:
                spec = broker.LoadSpec(level, level, args.warmup, args.duration, 10_000_000)
                return broker.run_load(loadgen, target, method, spec, log)

            return measure

        phases: dict[str, tuple[procs.Child, Callable[[int], Measurement]]] = {
            "kb_unwrap": (kb.child, grpc_phase(kb)),
            "kb_unwrap_nojournal": (off.child, grpc_phase(off)),
            "kb_health": (off.child, grpc_phase(off, broker.HEALTH)),
        }
        if bao_bin is not None:
            aad = WrappedKey.parse(kb.wrapped_key_file.read_bytes()).aad
            # with its file audit device on, as the broker has its durable journal (issue #16)
            bao = stack.enter_context(openbao.running_openbao(bao_bin, WORK, aad, audit=True))
            for kind in ("typical", "lean"):

                def wrk_phase(level: int, kind: str = kind) -> Measurement:
                    return openbao.run_wrk(
                        bao,
                        openbao.DECRYPT,
                        kind,
                        connections=level,
                        threads=min(args.wrk_threads, level),
                        warmup=args.warmup,
                        duration=args.duration,
                        log=log,
                    )

                phases[f"bao_decrypt_{kind}"] = (bao.child, wrk_phase)
        servers = list({id(c): c for c, _ in phases.values()}.values())
        keys = list(phases)
        for round_no in range(args.rounds):
            for level in args.level_list:
                for key in keys if round_no % 2 == 0 else keys[::-1]:
                    server, measure = phases[key]
                    with procs.paused(c for c in servers if c is not server):
                        procs.wait_quiet()
                        m = measure(level)
                    results.setdefault(key, {}).setdefault(level, []).append(m)
                    print(
                        f"bench: round {round_no + 1}/{args.rounds}, {level} in flight, {key}: "
                        f"{m.rate:,.0f} ops/s, p50 {m.p50_ms or 0:.1f} ms"
                        + (f", {m.errors} errors" if m.errors else ""),
                        file=sys.stderr,
                    )
                    if not all(c.alive() for c in servers):
                        raise SystemExit("bench: a server died during the run; see bench/.work/")

    table = render(results, args)
    print(table)
    (RESULTS / "capacity.md").write_text(table)
    raw = {
        k: {str(c): [m.as_dict() for m in ms] for c, ms in v.items()} for k, v in results.items()
    }
    (RESULTS / "capacity.json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
