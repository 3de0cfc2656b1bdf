"""Recording encryption through a real broker: the asyncio client beside the blocking one, one run.

    .venv/bin/python bench/client_async.py [--sizes-kib 64,4096] [--count 24] [--concurrency 4]
                                           [--repeats 3] [--work bench/.work/client-async]

One broker (`keybroker serve`, 1 process, journal on, as deployed) on 127.0.0.1. For each
recording size, each variant encrypts --count recordings (`encrypt_recording`: one
GenerateDataKey call, then the stream in 256 KiB segments) and decrypts them again
(`decrypt_recording`: one UnwrapDataKey call, then the segments), checked byte for byte, in memory
(io.BytesIO), so the figures are the SDK's and the broker's, not the disk's:

- blocking, 1 at a time: one KeyBrokerClient, a plain loop;
- blocking, N threads: one KeyBrokerClient shared by N threads (the usual way to overlap calls);
- asyncio, 1 at a time: one AsyncKeyBrokerClient, awaited in a loop;
- asyncio, N tasks: one AsyncKeyBrokerClient, N concurrent tasks (file work in worker threads).

Variants run round-robin within each repeat so load hits them alike; medians over --repeats of
plaintext MB/s (encrypt + decrypt, both counted) and round trips per second; ratios to the
blocking client one at a time are taken within each repeat (median, range). Prints a markdown
table and writes it to bench/results/client_async.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import os
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import procs
from broker import running_broker

from keybroker.client import AsyncKeyBrokerClient, KeyBrokerClient, TlsFiles
from keybroker.devenv import DevEnv, mint_token

BENCH = Path(__file__).resolve().parent

RESULTS = BENCH / "results"


def _new_id(n: int) -> str:
    """A recording id used once: the broker registers each id once (ALREADY_EXISTS after)."""
    return f"bench-{n}-{uuid.uuid4().hex[:12]}"


def _round_trip(kb: KeyBrokerClient, n: int, audio: bytes) -> None:
    sealed = io.BytesIO()
    kb.encrypt_recording(io.BytesIO(audio), sealed, recording_id=_new_id(n), purposes=["support"])
    out = io.BytesIO()
    kb.decrypt_recording(io.BytesIO(sealed.getvalue()), out, purpose="support")
    assert out.getvalue() == audio


async def _round_trip_async(kb: AsyncKeyBrokerClient, n: int, audio: bytes) -> None:
    sealed = io.BytesIO()
    await kb.encrypt_recording(
        io.BytesIO(audio), sealed, recording_id=_new_id(n), purposes=["support"]
    )
    out = io.BytesIO()
    await kb.decrypt_recording(io.BytesIO(sealed.getvalue()), out, purpose="support")
    assert out.getvalue() == audio


def blocking(target: str, kwargs: dict[str, object], audio: bytes, count: int, conc: int) -> float:
    with KeyBrokerClient(target, **kwargs) as kb:  # type: ignore[arg-type]
        _round_trip(kb, -1, audio)  # connect outside the clock
        start = time.perf_counter()
        if conc == 1:
            for n in range(count):
                _round_trip(kb, n, audio)
        else:
            with ThreadPoolExecutor(conc) as pool:
                list(pool.map(lambda n: _round_trip(kb, n, audio), range(count)))
        return time.perf_counter() - start


def asynchronous(
    target: str, kwargs: dict[str, object], audio: bytes, count: int, conc: int
) -> float:
    async def run() -> float:
        async with AsyncKeyBrokerClient(target, **kwargs) as kb:  # type: ignore[arg-type]
            await _round_trip_async(kb, -1, audio)
            start = time.perf_counter()
            gate = asyncio.Semaphore(conc)

            async def one(n: int) -> None:
                async with gate:
                    await _round_trip_async(kb, n, audio)

            await asyncio.gather(*(one(n) for n in range(count)))
            return time.perf_counter() - start

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-kib", default="64,4096")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=BENCH / ".work" / "client-async")
    args = parser.parse_args()
    procs.stop_on_signals()
    args.work.mkdir(parents=True, exist_ok=True)
    conc = args.concurrency
    variants: dict[str, tuple[Callable[..., float], int]] = {
        "blocking, 1 at a time": (blocking, 1),
        f"blocking, {conc} threads": (blocking, conc),
        "asyncio, 1 at a time": (asynchronous, 1),
        f"asyncio, {conc} tasks": (asynchronous, conc),
    }
    rows = []
    with running_broker(args.work, processes=1, threads=4) as broker:
        env: DevEnv = broker.env
        token = mint_token(env, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
        tls = TlsFiles(env.ca_cert, env.cert("client"), env.key("client"))
        kwargs: dict[str, object] = {"tls": tls, "token": token, "timeout": 30}
        for size_kib in (int(s) for s in args.sizes_kib.split(",")):
            audio = os.urandom(size_kib * 1024)
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, (run, level) in variants.items():
                    seconds[name].append(run(broker.target, kwargs, audio, args.count, level))
            base = seconds["blocking, 1 at a time"]
            for name, runs in seconds.items():
                secs = statistics.median(runs)
                mbps = 2 * len(audio) * args.count / secs / 1e6
                ratios = [b / r for b, r in zip(base, runs, strict=True)]  # within each repeat
                rows.append(
                    f"| {size_kib:,} KiB | {name} | {args.count / secs:,.1f} | {mbps:,.0f} "
                    f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
                )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = "\n".join(
        [
            f"client recording encryption, {stamp}, {args.count} round trips per measurement, "
            f"median of {args.repeats}",
            "",
            "| recording | client | round trips/s | MB/s (enc + dec) "
            "| vs blocking 1 at a time (range) |",
            "|--:|---|--:|--:|--:|",
            *rows,
        ]
    )
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "client_async.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
