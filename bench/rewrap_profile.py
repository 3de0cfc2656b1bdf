"""RewrapDataKeys: server CPU per item, and where it goes (py-spy on the worker).

    .venv/bin/python bench/rewrap_profile.py [--seconds 8] [--rounds 3] [--profile out.txt]

One broker as deployed (durable journal; but 1 process, which serves itself, so the profile holds
every call; 4 threads, retention epochs off), 200 wrapped keys under version 1, then one
rotation; the C++ load generator sends RewrapDataKeys of 100 items, 4 calls in flight (as
bench/versions_and_rewrap.py does), for ``--seconds`` per round. Prints items/s and server CPU per
item per round (CPU from /proc: less sensitive to other work on the machine than the rate).
With ``--profile FILE`` (needs ``py-spy`` on PATH or in the virtual environment: ``pip install
py-spy``) the last round is sampled, the collapsed stacks written to FILE, and the functions with
the largest inclusive share printed. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import broker  # noqa: E402
import deps  # noqa: E402
from versions_and_rewrap import NO_EPOCHS, REWRAP, prepare  # noqa: E402

WORK = BENCH / ".work" / "rewrap-profile"
ITEMS = 100


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("bench: --profile needs py-spy (pip install py-spy)")
    return found


def top_functions(collapsed: Path, count: int = 60) -> list[tuple[str, float]]:
    """Inclusive share of samples per function (each function counted once per stack)."""
    totals: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        weight = int(n)
        samples += weight
        for frame in set(stack.split(";")):
            totals[frame] += weight
    return [(f, c / samples) for f, c in totals.most_common(count)] if samples else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--profile", type=Path)
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = p.parse_args(argv)
    if not 1 <= args.seconds <= 120 or not 1 <= args.rounds <= 20:
        p.error("--seconds must be 1..120 and --rounds 1..20")
    WORK.mkdir(parents=True, exist_ok=True)
    loadgen, _ = deps.tools(openbao=False)
    spec = broker.LoadSpec(args.concurrency, args.concurrency, 2.0, args.seconds, 10**6)
    rates, cpus = [], []
    with broker.running_broker(WORK, processes=1, threads=4, overrides=NO_EPOCHS) as kb:
        files = prepare(kb, 2)
        for round_no in range(args.rounds):
            spy = None
            if args.profile and round_no == args.rounds - 1:
                spy = subprocess.Popen(
                    [
                        py_spy(),
                        "record",
                        "--pid",
                        str(kb.child.pid),
                        "--rate",
                        "250",
                        "--duration",
                        str(int(args.seconds) + 2),
                        "--format",
                        "raw",
                        "--output",
                        str(args.profile),
                        "--native" if args.native else "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            m = broker.run_load(
                loadgen,
                kb,
                REWRAP,
                spec,
                WORK / "load.log",
                request=files[f"rewrap_{ITEMS}"],
                token=files["rewrap_token"],
            )
            if spy is not None:
                spy.wait(60)
            if m.errors:
                raise SystemExit(f"bench: {m.errors} calls failed: {m.extra}")
            per_item = (m.server_cpu_us or 0) / ITEMS
            rates.append(m.rate * ITEMS)
            cpus.append(per_item)
            print(
                f"round {round_no + 1}: {m.rate * ITEMS:,.0f} items/s, server CPU "
                f"{per_item:,.0f} µs/item, machine busy {m.machine_busy or 0:.0%}",
                flush=True,
            )
    print(
        f"median: {statistics.median(rates):,.0f} items/s, {statistics.median(cpus):,.0f} µs/item"
        f" (CPU range {min(cpus):,.0f}-{max(cpus):,.0f})"
    )
    if args.profile and args.profile.exists():
        for frame, share in top_functions(args.profile):
            print(f"{share:6.1%}  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
