"""Erasure at scale: UnwrapDataKey with 10 million erased recordings vs none, side by side.

    .venv/bin/python bench/erasures.py [--erasures N] [--rounds R] [--duration S]

Issue #4: the hot-path erasure check costs O(1); with 10 million erased recordings unwrap
throughput stays within 10 % of none. Two brokers (2 processes x 4 threads each, the same
settings as bench/run.py) run from fresh dev environments; the second one's metadata database
(SQLite) is filled with N erasures before it starts. The C++ load generator drives UnwrapDataKey
of a recording that is not erased on each broker in turn, the other one frozen, for R rounds.
Also reported: each broker's start-up time and the resident memory of its worker processes.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import broker  # noqa: E402
import deps  # noqa: E402
import procs  # noqa: E402
from report import Measurement  # noqa: E402

from keybroker.adapters.sqldb import Database, dialect_for  # noqa: E402

WORK = BENCH / ".work" / "erasures"


def fill(db_file: Path, count: int) -> float:
    """A migrated metadata database holding ``count`` erased recordings; seconds taken."""
    started = time.perf_counter()
    db_file.unlink(missing_ok=True)
    db = Database(dialect_for(f"sqlite:{db_file}", base=db_file.parent))
    db.migrate()
    db.close()
    conn = sqlite3.connect(db_file)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executemany(
            "INSERT INTO kb_erasures (kind, target, reason, erased_by, erased_at, recordings) "
            "VALUES ('recording', ?, 'bench', 'bench', 0, 1)",
            ((f"erased-{i:09d}",) for i in range(count)),
        )
        conn.execute("UPDATE kb_meta SET privacy_generation = privacy_generation + 1")
        conn.commit()
    finally:
        conn.close()
    return time.perf_counter() - started


def rss_mib(root: int) -> tuple[float, float]:
    """(sum of VmRSS, largest VmHWM) in MiB over the worker processes under ``root``."""
    rss, hwm = 0.0, 0.0
    for pid in procs.process_tree(root):
        if pid == root:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" in fields:
            rss += int(fields["VmRSS"].split()[0]) / 1024
            hwm = max(hwm, int(fields.get("VmHWM", "0 kB").split()[0]) / 1024)
    return rss, hwm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--erasures", type=int, default=10_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    if not 0 <= args.erasures <= 50_000_000 or not 1 <= args.rounds <= 10:
        p.error("--erasures must be 0..50M and --rounds 1..10")
    WORK.mkdir(parents=True, exist_ok=True)
    loadgen, _ = deps.tools(openbao=False)
    log = WORK / "loadgen.log"
    print(f"bench: writing {args.erasures:,} erasures", file=sys.stderr)
    filled = fill(WORK / "erased.db", args.erasures)
    fill(WORK / "none.db", 0)
    spec = broker.LoadSpec(
        args.concurrency, args.concurrency, args.warmup, args.duration, 2_000_000
    )
    results: dict[str, list[Measurement]] = {"none": [], "erased": []}
    startup: dict[str, float] = {}
    memory: dict[str, tuple[float, float]] = {}
    try:
        with broker.running_broker(
            WORK,
            processes=2,
            threads=4,
            name="none",
            overrides={"KEYBROKER_STATE_URL": f"sqlite:{WORK / 'none.db'}"},
        ) as none:
            started = time.monotonic()
            with broker.running_broker(
                WORK,
                processes=2,
                threads=4,
                name="erased",
                overrides={"KEYBROKER_STATE_URL": f"sqlite:{WORK / 'erased.db'}"},
                start_timeout=600,
            ) as erased:
                startup["erased"] = time.monotonic() - started
                brokers = {"none": none, "erased": erased}
                for key, b in brokers.items():
                    memory[key] = rss_mib(b.child.pid)
                for round_no in range(1, args.rounds + 1):
                    order = list(brokers.items())  # the two take turns going first
                    for key, b in order if round_no % 2 else order[::-1]:
                        others = [o.child for k, o in brokers.items() if k != key]
                        with procs.paused(others):
                            procs.wait_quiet()
                            m = broker.run_load(loadgen, b, broker.UNWRAP, spec, log)
                        results[key].append(m)
                        print(
                            f"bench: round {round_no} {key}: {m.rate:,.0f}/s, {m.errors} errors",
                            file=sys.stderr,
                        )
    finally:
        for name in ("erased.db", "erased.db-wal", "erased.db-shm"):
            (WORK / name).unlink(missing_ok=True)
    print(render(args, results, startup, memory, filled))
    return 0


def render(
    args: argparse.Namespace,
    results: dict[str, list[Measurement]],
    startup: dict[str, float],
    memory: dict[str, tuple[float, float]],
    filled: float,
) -> str:
    def med(key: str, attr: str) -> float:
        return statistics.median(float(getattr(m, attr) or 0.0) for m in results[key])

    ratios = [e.rate / n.rate for n, e in zip(results["none"], results["erased"], strict=True)]
    lines = [
        f"`.venv/bin/python bench/erasures.py --erasures {args.erasures} --rounds {args.rounds}"
        f" --duration {args.duration:g}` (2 processes x 4 threads per broker, concurrency"
        f" {args.concurrency}; medians of {args.rounds} interleaved rounds)",
        "",
        "| broker | UnwrapDataKey ops/s | p50 ms | p99 ms | server CPU µs/op | errors |"
        " workers' RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in (("none", "no erasures"), ("erased", f"{args.erasures:,} erased")):
        lines.append(
            f"| {label} | {med(key, 'rate'):,.0f} | {med(key, 'p50_ms'):.2f} |"
            f" {med(key, 'p99_ms'):.2f} | {med(key, 'server_cpu_us'):,.0f} |"
            f" {sum(m.errors for m in results[key])} | {memory[key][0]:,.0f} |"
        )
    lines += [
        "",
        f"Ratio erased / none, per round: {', '.join(f'{r:.2f}' for r in ratios)};"
        f" median **{statistics.median(ratios):.2f}** (target >= 0.90).",
        f"Writing {args.erasures:,} erasures into SQLite: {filled:.0f} s. Start-up of the broker"
        f" holding them (2 workers loading in parallel): {startup['erased']:.0f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
