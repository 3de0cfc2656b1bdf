"""Instructions per call under callgrind: a measure that other work on the machine cannot move.

    .venv/bin/python bench/callgrind.py before=01bba6d after=. [--methods unwrap,generate,rewrap]
        [--calls 1500]

Each variant (``NAME=REV[,KEYBROKER_X=V...]`` as in bench/ab.py) runs as deployed but in one
process, which serves itself (durable journal with fdatasync, 4 threads), under ``valgrind
--tool=callgrind``. For each method the C++ load generator warms up for 5 s, then sends
``--calls`` calls (4 in flight); the counters are zeroed at the window's start
(``callgrind_control -z``) and dumped at its end (``-d``). Prints instructions (Ir) per call, the
whole process (every thread: gRPC, the handler, the journal, the HSM library), per item for
``rewrap`` (RewrapDataKeys of 100 keys; retention epochs are off in every variant, as in
bench/ab.py). Background threads run on the clock, and under valgrind a call lasts ~50x longer:
their instructions per second are measured in an idle window first (``--idle``) and taken out
of each window in proportion to its length. Instructions leave out the time the kernel spends
(system calls: the journal's fdatasync, SoftHSM re-reading token objects, futex wake-ups, the
network) and cache effects: read them with the CPU time of bench/ab.py, not instead of it. They
do not depend on what else runs on the machine. Slow: valgrind runs the server 50-100 times
slower (a few minutes per variant).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import broker  # noqa: E402
import deps  # noqa: E402
from ab import METHODS, REWRAP_ITEMS, parse_variant  # noqa: E402
from versions_and_rewrap import NO_EPOCHS, prepare  # noqa: E402

WORK = BENCH / ".work" / "callgrind"
IN_FLIGHT = 4
_TOTALS_RE = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def _control(pid: int, flag: str) -> None:
    subprocess.run(
        ["callgrind_control", flag, str(pid)], check=True, capture_output=True, timeout=300
    )


def _instructions(out_dir: Path, pid: int, seen: set[Path]) -> int:
    """Ir of the newest dump of ``pid`` not read before."""
    dumps = sorted(
        (p for p in out_dir.glob(f"callgrind.out.{pid}*") if p not in seen),
        key=lambda p: p.stat().st_mtime,
    )
    if not dumps:
        raise SystemExit(f"bench: no callgrind dump of pid {pid} in {out_dir}")
    seen.add(dumps[-1])
    found = _TOTALS_RE.search(dumps[-1].read_bytes())
    if found is None:
        raise SystemExit(f"bench: no totals in {dumps[-1]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME=REV[,KEYBROKER_X=V...]")
    p.add_argument("--methods", default="unwrap,generate")
    p.add_argument("--calls", type=int, default=1500, help="calls in the window (1500)")
    p.add_argument("--idle", type=float, default=20.0, help="seconds of the idle window (20)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or not set(methods) <= set(METHODS):
        raise SystemExit(f"bench: --methods must name some of {', '.join(METHODS)}")
    if not 100 <= args.calls <= 100_000:
        raise SystemExit("bench: --calls must be 100..100000")
    if shutil.which("valgrind") is None:
        raise SystemExit("bench: valgrind is not installed (apt-get install valgrind)")
    loadgen, _ = deps.tools(openbao=False)
    results: dict[tuple[str, str], float] = {}
    for v in map(parse_variant, args.variants):
        os.environ["PYTHONPATH"] = str(v.source)
        work = WORK / v.name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        out_dir = work / "dumps"
        out_dir.mkdir()
        wrapper = [
            "valgrind", "--tool=callgrind", "--trace-children=no",
            f"--callgrind-out-file={out_dir}/callgrind.out.%p",
        ]  # fmt: skip
        overrides = {**(NO_EPOCHS if "rewrap" in methods else {}), **v.overrides}
        with broker.running_broker(
            work,
            processes=1,
            threads=4,
            overrides=overrides,
            wrapper=wrapper,
            start_timeout=900,
            call_timeout=300,
        ) as kb:
            files = prepare(kb, 2, timeout=300) if "rewrap" in methods else {}
            pid = kb.child.pid
            seen: set[Path] = set()
            # Background threads (state refresh every 0.25 s, health probes, flush timers) run
            # on the clock, and valgrind makes every call ~50x longer: measure what they cost
            # per second while idle and take that share out of each window.
            _control(pid, "-z")
            started = time.monotonic()
            time.sleep(args.idle)
            _control(pid, "-d")
            idle_rate = _instructions(out_dir, pid, seen) / (time.monotonic() - started)
            print(f"{v.name} idle: {idle_rate / 1e6:.2f} M instructions per second", flush=True)
            for method in methods:
                per = REWRAP_ITEMS if method == "rewrap" else 1
                calls = max(args.calls // per, 20)
                spec = broker.LoadSpec(IN_FLIGHT, IN_FLIGHT, 5.0, 600.0, calls, 300.0)
                marks: list[str] = []

                def mark(what: str, marks: list[str] = marks, pid: int = pid) -> None:
                    _control(pid, "-z" if what == "start" else "-d")
                    marks.append(what)

                m = broker.run_load(
                    loadgen,
                    kb,
                    METHODS[method],
                    spec,
                    work / "loadgen.log",
                    request=files.get(f"rewrap_{REWRAP_ITEMS}") if method == "rewrap" else None,
                    token=files.get("rewrap_token") if method == "rewrap" else None,
                    on_mark=mark,
                )
                if m.errors or marks != ["start", "end"]:
                    raise SystemExit(f"bench: {method}: {m.errors} errors, marks {marks}")
                total = _instructions(out_dir, pid, seen)
                ir = (total - idle_rate * m.seconds) / (m.ok * per)
                results[v.name, method] = ir
                unit = "item" if per > 1 else "call"
                print(
                    f"{v.name} {method}: {ir / 1e6:.3f} M instructions per {unit} "
                    f"({total / (m.ok * per) / 1e6:.3f} M before taking out the idle rate; "
                    f"{m.ok} calls in {m.seconds:.0f} s)",
                    flush=True,
                )
    names = list(dict.fromkeys(name for name, _ in results))
    for method in methods:
        base = results[names[0], method]
        print(
            f"{method}: "
            + ", ".join(
                f"{n} {results[n, method] / 1e6:.3f} M ({results[n, method] / base:.3f}x)"
                for n in names
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
