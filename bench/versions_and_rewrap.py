"""Key lifecycle at speed: unwrap with 100 key versions vs 1, and bulk rewrap vs OpenBao.

    .venv/bin/python bench/versions_and_rewrap.py [--rounds R] [--duration S]

Issue #3: unwrap throughput with 100 versions of a key within 10 % of one version; and
``RewrapDataKeys`` throughput in keys/s beside OpenBao transit batch rewrap with a policy-scoped
token, in the same run, OpenBao with its file audit device on. Two brokers (``processes = "auto"`` x
4 threads, durable journal, retention epochs off so both wrap under ``recordings`` itself) start
from fresh dev environments; the second one's key is rotated 99 times through KeyAdmin after 200
wrapped keys were made under version 1. Phases, each with the other servers frozen, in R interleaved
rounds:

* UnwrapDataKey of a v1 key on the 1-version broker, of the same kind of v1 key and of a
  current-version key on the 100-version broker (C++ load generator, mTLS);
* RewrapDataKeys of 100 and of 200 v1 keys per call on the 100-version broker;
* OpenBao transit batch rewrap (``batch_input``) of 100 and 200 v1 ciphertexts per request after a
  rotation, with the typical and the lean policy-scoped tokens (wrk).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import broker  # noqa: E402
import deps  # noqa: E402
import openbao  # noqa: E402
import procs  # noqa: E402
from report import Measurement  # noqa: E402

from keybroker.client import KeyBrokerClient, TlsFiles  # noqa: E402
from keybroker.client.admin import KeyAdminClient  # noqa: E402
from keybroker.core.wrapped_key import WrappedKey  # noqa: E402
from keybroker.devenv import mint_token  # noqa: E402
from keybroker.server.cpus import available_cpus  # noqa: E402
from keybroker.v1 import keybroker_pb2 as pb  # noqa: E402

WORK = BENCH / ".work" / "lifecycle"
REWRAP = "/keybroker.v1.KeyBroker/RewrapDataKeys"
BATCHES = openbao.REWRAP_BATCHES
NO_EPOCHS = {"KEYBROKER_KEYS_RETENTION_EPOCHS": "false"}


def prepare(b: broker.Broker, versions: int, timeout: float | None = None) -> dict[str, Path]:
    """On broker ``b``: 200 wrapped keys under v1, then ``versions - 1`` rotations; request files
    for unwrap (v1, current) and RewrapDataKeys (100, 200 items), and a keys:rewrap token."""
    env = b.env
    tls = TlsFiles(env.ca_cert, env.cert("client"), env.key("client"))
    data = mint_token(env, scopes=["keys:generate", "keys:unwrap"], purposes=[broker.PURPOSE])
    admin = mint_token(env, scopes=["keys:admin"], amr=["mfa"])
    rewrap = b.files / "token_rewrap.txt"
    rewrap.write_text(mint_token(env, scopes=["keys:rewrap"]))
    files = {"rewrap_token": rewrap}
    with KeyBrokerClient(b.target, tls=tls, token=data, timeout=timeout) as kb:
        old = [
            (f"rec-{i:04d}", kb.generate_wrapped_data_key(f"rec-{i:04d}", purposes=["support"]))
            for i in range(max(BATCHES))
        ]
        with KeyAdminClient(b.target, tls=tls, token=admin, timeout=timeout) as keys:
            for _ in range(versions - 1):
                keys.rotate_key("recordings")
            if len(keys.get_key("recordings").versions) != versions:
                raise SystemExit("bench: rotation did not make the versions asked for")
        deadline = time.monotonic() + 10  # every worker process sees the rotations (<= 0.25 s)
        attempt = 0  # a recording id is registered once: a new one per attempt
        current_id = f"rec-current-{attempt}"
        current = kb.generate_wrapped_data_key(current_id, purposes=["support"])
        while current.key_ref.version != versions and time.monotonic() < deadline:
            time.sleep(0.1)
            attempt += 1
            current_id = f"rec-current-{attempt}"
            current = kb.generate_wrapped_data_key(current_id, purposes=["support"])
        if current.key_ref.version != versions or old[0][1].key_ref.version != 1:
            raise SystemExit("bench: unexpected key versions")
        for recording, wrapped in (("rec-0000", old[0][1]), (current_id, current)):
            kb.unwrap_data_key(recording, wrapped.wrapped, purpose="support")  # they work
    for name, (recording, wrapped) in (
        ("unwrap_v1", old[0]),
        ("unwrap_current", (current_id, current)),
    ):
        request = pb.UnwrapDataKeyRequest(
            recording_id=recording, wrapped_key=wrapped.wrapped, purpose=broker.PURPOSE
        )
        files[name] = b.files / f"{name}.bin"
        files[name].write_bytes(request.SerializeToString())
    for size in BATCHES:
        items = [
            pb.RewrapDataKeyRequest(recording_id=r, wrapped_key=w.wrapped) for r, w in old[:size]
        ]
        files[f"rewrap_{size}"] = b.files / f"rewrap_{size}.bin"
        files[f"rewrap_{size}"].write_bytes(
            pb.RewrapDataKeysRequest(items=items).SerializeToString()
        )
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16, help="unwrap calls in flight (16)")
    p.add_argument("--batch-concurrency", type=int, default=4, help="batch calls in flight (4)")
    p.add_argument("--unwrap-only", action="store_true", help="only the three unwrap phases")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 10 or not 1 <= args.duration <= 120:
        p.error("--rounds must be 1..10 and --duration 1..120")
    WORK.mkdir(parents=True, exist_ok=True)
    loadgen, bao_bin = deps.tools(openbao=True)
    assert bao_bin is not None
    log = WORK / "load.log"
    unwrap = broker.LoadSpec(args.concurrency, args.concurrency, args.warmup, args.duration, 10**6)
    batch = broker.LoadSpec(
        args.batch_concurrency, args.batch_concurrency, args.warmup, args.duration, 10**6
    )
    results: dict[str, list[Measurement]] = {}
    with ExitStack() as stack:
        one = stack.enter_context(
            broker.running_broker(WORK, processes=0, threads=4, name="v1", overrides=NO_EPOCHS)
        )
        many = stack.enter_context(
            broker.running_broker(WORK, processes=0, threads=4, name="v100", overrides=NO_EPOCHS)
        )
        print("bench: preparing keys and rotating to 100 versions", file=sys.stderr)
        files_one, files_many = prepare(one, 1), prepare(many, 100)
        request = pb.UnwrapDataKeyRequest.FromString(files_one["unwrap_v1"].read_bytes())
        aad = WrappedKey.parse(request.wrapped_key).aad  # OpenBao gets the same additional data
        bao = stack.enter_context(openbao.running_openbao(bao_bin, WORK, aad, audit=True))
        servers = [one.child, many.child, bao.child]

        def kb(
            b: broker.Broker,
            method: str,
            spec: broker.LoadSpec,
            *,
            request: Path | None = None,
            token: Path | None = None,
        ) -> Measurement:
            return broker.run_load(loadgen, b, method, spec, log, request=request, token=token)

        phases: dict[str, tuple[procs.Child, Callable[[], Measurement]]] = {
            "unwrap 1 version (v1 key)": (
                one.child,
                lambda: kb(one, broker.UNWRAP, unwrap, request=files_one["unwrap_v1"]),
            ),
            "unwrap 100 versions (v1 key)": (
                many.child,
                lambda: kb(many, broker.UNWRAP, unwrap, request=files_many["unwrap_v1"]),
            ),
            "unwrap 100 versions (v100 key)": (
                many.child,
                lambda: kb(many, broker.UNWRAP, unwrap, request=files_many["unwrap_current"]),
            ),
        }
        for size in () if args.unwrap_only else BATCHES:

            def rewrap(size: int = size) -> Measurement:
                return kb(
                    many,
                    REWRAP,
                    batch,
                    request=files_many[f"rewrap_{size}"],
                    token=files_many["rewrap_token"],
                )

            phases[f"keybroker RewrapDataKeys x{size}"] = (many.child, rewrap)
            for kind in ("typical", "lean"):

                def bao_rewrap(size: int = size, kind: str = kind) -> Measurement:
                    return openbao.run_wrk(
                        bao,
                        openbao.REWRAP,
                        kind,
                        connections=args.batch_concurrency,
                        threads=min(2, args.batch_concurrency),
                        warmup=args.warmup,
                        duration=args.duration,
                        log=log,
                        body=f"rewrap-{size}",
                    )

                phases[f"OpenBao batch rewrap x{size} ({kind}, file audit)"] = (
                    bao.child,
                    bao_rewrap,
                )
        names = list(phases)
        for round_no in range(1, args.rounds + 1):
            # the three unwrap phases take turns going first (no phase always follows another)
            shift = (round_no - 1) % 3
            order = names[shift:3] + names[:shift] + names[3:]
            for name in order:
                server, measure = phases[name]
                with procs.paused(c for c in servers if c is not server):
                    procs.wait_quiet()
                    m = measure()
                results.setdefault(name, []).append(m)
                print(
                    f"bench: round {round_no} {name}: {m.rate:,.0f}/s, {m.errors} errors",
                    file=sys.stderr,
                )
    print(render(args, results))
    return 0


def _keys_per_call(name: str) -> int:
    return int(name.split(" x")[1].split(maxsplit=1)[0]) if " x" in name else 1


def render(args: argparse.Namespace, results: dict[str, list[Measurement]]) -> str:
    def med(name: str, attr: str) -> float:
        return statistics.median(float(getattr(m, attr) or 0.0) for m in results[name])

    def ratio(a: str, b: str) -> float:
        return statistics.median(
            (x.rate * _keys_per_call(a)) / (y.rate * _keys_per_call(b))
            for x, y in zip(results[a], results[b], strict=True)
        )

    only = " --unwrap-only" if args.unwrap_only else ""
    lines = [
        f"`.venv/bin/python bench/versions_and_rewrap.py --rounds {args.rounds} --duration"
        f" {args.duration:g}{only}` (brokers: processes = auto ({available_cpus()}) x 4 threads,"
        f" durable journal; unwrap concurrency {args.concurrency}, batch calls in flight"
        f" {args.batch_concurrency}, for OpenBao, with its file audit device, as many"
        f" connections; medians of {args.rounds} interleaved rounds)",
        "",
        "| phase | calls/s | keys/s | p50 ms | p99 ms | server CPU µs/call | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        calls = med(name, "rate")
        lines.append(
            f"| {name} | {calls:,.0f} | {calls * _keys_per_call(name):,.0f} |"
            f" {med(name, 'p50_ms'):.2f} | {med(name, 'p99_ms'):.2f} |"
            f" {med(name, 'server_cpu_us'):,.0f} | {sum(m.errors for m in runs)} |"
        )
    lines += [
        "",
        "Ratios (per round, then the median):",
        f"- unwrap, 100 versions (v1 key) / 1 version: "
        f"**{ratio('unwrap 100 versions (v1 key)', 'unwrap 1 version (v1 key)'):.2f}**"
        " (target >= 0.90)",
        f"- unwrap, 100 versions (current key) / 1 version: "
        f"**{ratio('unwrap 100 versions (v100 key)', 'unwrap 1 version (v1 key)'):.2f}**"
        " (target >= 0.90)",
    ]
    for size in BATCHES:
        if f"keybroker RewrapDataKeys x{size}" not in results:
            continue  # --unwrap-only
        for kind in ("typical", "lean"):
            value = ratio(
                f"keybroker RewrapDataKeys x{size}",
                f"OpenBao batch rewrap x{size} ({kind}, file audit)",
            )
            lines.append(
                f"- keys/s, keybroker RewrapDataKeys x{size} / OpenBao batch rewrap x{size}"
                f" ({kind} token): **{value:.2f}**"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
