"""HSM adapter throughput: OS locking and the session pool against the one process-wide lock.

Measures ``Pkcs11Keks`` in one process, without gRPC around it:

- ``unwrap``: one AES-GCM decrypt of a 32-byte data key with a 100-byte AAD (the broker's unwrap);
- ``generate``: 44 random bytes then one AES-GCM encrypt (the broker's GenerateDataKey);

with T threads calling at once, for ``--seconds`` each, every configuration in a fresh process
(a PKCS#11 module is initialised once per process), interleaved ``--rounds`` times; the median is
printed. Two sets:

1. SoftHSM2, 1 and 4 threads: this tree (OS locking, ``[hsm] sessions`` 4), this tree with
   ``[hsm] locking = "global"`` (one lock, one session: the old arrangement), and the code in
   ``--before DIR`` (a checkout of the previous version, e.g. ``git worktree add /tmp/kb-before
   main``; its ``src`` is put first on the path), if given.
2. The strict-HSM test module (tests/support/strict_pkcs11) forwarding to SoftHSM with 1 ms of
   simulated latency per PKCS#11 call (a network HSM), 8 threads, sessions 1, 2, 4, 8, and the
   global lock.

Usage: ``.venv/bin/python bench/hsm_sessions.py [--before DIR] [--seconds 3] [--rounds 3]``.
This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "hsm-sessions"

CHILD = textwrap.dedent(
    """
    import dataclasses, inspect, json, sys, threading, time
    from keybroker.adapters.hsm import HsmConfig, Pkcs11Keks

    module, label, op, threads, seconds, sessions, locking = sys.argv[1:8]
    pin = sys.stdin.readline().strip()
    fields = {f.name for f in dataclasses.fields(HsmConfig)}
    extra = {}
    if "sessions" in fields:  # the code before the pool has neither
        extra = {"sessions": int(sessions), "locking": locking}
    keks = Pkcs11Keks(HsmConfig(module, label, pin, **extra), probe_key="recordings")
    keks.connect()
    key = keks.current("recordings")
    aad = b"a" * 100
    v1_api = len(inspect.signature(keks.encrypt).parameters) == 4  # (key, nonce, plain, aad)
    if v1_api:  # the code before wrapped-key v2: the caller makes the nonce
        material = keks.random(44)
        dek, nonce = material[:32], material[32:]
        blob = keks.encrypt(key, nonce, dek, aad)
    else:
        dek = keks.random(32)
        nonce, blob = keks.encrypt(key, dek, aad)

    def unwrap():
        keks.decrypt(key, nonce, blob, aad)

    def generate():
        if v1_api:
            m = keks.random(44)
            keks.encrypt(key, m[32:], m[:32], aad)
        else:
            keks.encrypt(key, keks.random(32), aad)

    call = unwrap if op == "unwrap" else generate
    for _ in range(200):
        call()
    counts = []
    start = time.monotonic() + 0.2
    end = start + float(seconds)

    def work():
        n = 0
        while time.monotonic() < start:
            time.sleep(0.001)
        while time.monotonic() < end:
            call()
            n += 1
        counts.append(n)

    pool = [threading.Thread(target=work) for _ in range(int(threads))]
    cpu = time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    cpu = time.process_time() - cpu
    print("RESULT " + json.dumps({"ops_per_s": sum(counts) / float(seconds),
                                  "cpu_us": cpu / max(1, sum(counts)) * 1e6}))
    """
)


def provision() -> Any:
    sys.path.insert(0, str(ROOT))
    from keybroker.devenv import provision as make_env

    return make_env(WORK / "state", listen="127.0.0.1:0")


def run(
    env: Any,
    module: str,
    op: str,
    threads: int,
    seconds: float,
    *,
    sessions: int = 4,
    locking: str = "os",
    src: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> tuple[float, float]:
    """(calls per second, process CPU microseconds per call)."""
    environ = {**os.environ, "SOFTHSM2_CONF": str(env.softhsm_conf.resolve()), **(extra_env or {})}
    if src is not None:
        environ["PYTHONPATH"] = str(src)
    args = [
        module,
        "keybroker-dev",
        op,
        str(threads),
        str(seconds),
        str(sessions),
        locking,
    ]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        input=env.pin_file.read_text().strip() + "\n",  # never on a command line
        env=environ,
        capture_output=True,
        text=True,
        check=False,
        timeout=120 + seconds,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench child failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    found = json.loads(line[len("RESULT ") :])
    return float(found["ops_per_s"]), float(found["cpu_us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="checkout of the previous code")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["softhsm", "strict"], help="run one set only")
    args = parser.parse_args()
    env = provision()
    from keybroker import settings as settings_mod
    from tests.support.strict_pkcs11 import build

    softhsm = settings_mod.load(env.config, environ={}).hsm.module
    cases: list[tuple[str, dict[str, Any]]] = []
    for op in ("unwrap", "generate") if args.only != "strict" else ():
        for threads in (1, 4):
            if args.before is not None:
                cases.append(
                    (
                        f"softhsm {op} threads={threads} before",
                        {"module": softhsm, "op": op, "threads": threads,
                         "src": args.before.resolve() / "src"},
                    )
                )  # fmt: skip
            cases.append(
                (
                    f"softhsm {op} threads={threads} after",
                    {"module": softhsm, "op": op, "threads": threads},
                )
            )
            cases.append(
                (
                    f"softhsm {op} threads={threads} after, global lock",
                    {"module": softhsm, "op": op, "threads": threads, "locking": "global"},
                )
            )
    strict = build(WORK / "strict")
    latency = strict.environ(iv="keep", copy="allow", latency_us=1000)
    for sessions in (1, 2, 4, 8) if args.only != "softhsm" else ():
        cases.append(
            (
                f"strict 1ms unwrap threads=8 sessions={sessions}",
                {"module": str(strict.library), "op": "unwrap", "threads": 8,
                 "sessions": sessions, "extra_env": latency},
            )
        )  # fmt: skip
    if args.only != "softhsm":
        cases.append(
            (
                "strict 1ms unwrap threads=8 global lock",
                {"module": str(strict.library), "op": "unwrap", "threads": 8,
                 "locking": "global", "extra_env": latency},
            )
        )  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in cases}
    for _ in range(args.rounds):
        for name, kwargs in cases:
            results[name].append(run(env, seconds=args.seconds, **kwargs))
    print(f"{'case':<45} {'median ops/s':>12} {'median CPU us/op':>16}  runs (ops/s)")
    for name, values in results.items():
        rates = [v[0] for v in values]
        cpu = statistics.median(v[1] for v in values)
        runs = " ".join(f"{v:.0f}" for v in rates)
        print(f"{name:<45} {statistics.median(rates):>12.0f} {cpu:>16.1f}  {runs}")


if __name__ == "__main__":
    main()
