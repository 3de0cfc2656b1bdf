"""The keybroker side: a fresh dev environment, the broker as a subprocess, and load phases.

The broker runs exactly as an operator would start it (``keybroker serve --config ...``) with
environment overrides for processes, threads and the listen address. Requests are made once with
the Python client, checked, serialised to files and replayed by the C++ load generator
(bench/loadgen.cc), which needs no protobuf code of its own.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import procs
from grpc_health.v1 import health_pb2, health_pb2_grpc
from report import Measurement

from keybroker import settings as settings_mod
from keybroker.devenv import DevEnv, mint_token, provision
from keybroker.server.cpus import available_cpus
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

UNWRAP = "/keybroker.v1.KeyBroker/UnwrapDataKey"
GENERATE = "/keybroker.v1.KeyBroker/GenerateDataKey"
HEALTH = "/grpc.health.v1.Health/Check"

#: A realistic request: one recording, one purpose, one data subject, a small caller context.
RECORDING_ID = "rec-2026-11-22-000001"
UNIQUE_PLACEHOLDER = "U" * 20
"""In GenerateDataKey's recording id; the load generator writes a unique value there per call
(``--unique-at``): the broker registers each recording id once."""
PURPOSE = "support"
SUBJECT_IDS = ("subj-7f3a9c2e",)
CONTEXT = {"tenant": "acme", "system": "call-recorder"}

_LISTENING_RE = re.compile(r"listening on port (\d+)")


@dataclass(frozen=True)
class Broker:
    env: DevEnv
    port: int
    child: procs.Child
    processes: int
    files: Path
    """Directory holding token.txt, wrapped_key.bin and the serialised requests."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request_file(self, method: str) -> Path:
        return (
            self.files
            / {UNWRAP: "unwrap.bin", GENERATE: "generate.bin", HEALTH: "health.bin"}[method]
        )

    @property
    def token_file(self) -> Path:
        return self.files / "token.txt"

    @property
    def wrapped_key_file(self) -> Path:
        return self.files / "wrapped_key.bin"


def _serve_argv() -> list[str]:
    script = Path(sys.executable).parent / "keybroker"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "keybroker.cli.main", "serve"]


@contextmanager
def running_broker(
    work: Path,
    *,
    processes: int,
    threads: int,
    name: str = "",
    overrides: dict[str, str] | None = None,
    start_timeout: float = 60.0,
    wrapper: list[str] | None = None,
    call_timeout: float = 10.0,
) -> Iterator[Broker]:
    """Provision a fresh state directory, start the broker, prepare the requests; stop it after.
    ``processes`` 0: as many as ``[server] processes = "auto"`` starts (the default).

    ``name`` separates the state, requests and log of a second broker (``overrides``: its
    KEYBROKER_* settings, e.g. the journal turned off). ``wrapper``: a command the broker runs
    under (e.g. valgrind), given the interpreter and ``-m keybroker.cli.main serve``."""
    if processes == 0:  # "auto", the default: one per CPU the broker may use
        processes = available_cpus()
    suffix = f"-{name}" if name else ""
    state = work / f"state{suffix}"
    if state.exists():
        shutil.rmtree(state)
    port = procs.free_port()
    with _stdout_to_stderr():  # provisioning children print progress; keep stdout for the table
        env = provision(state, listen=f"127.0.0.1:{port}")
    _production_telemetry(env.config)
    environ = {
        **os.environ,
        "KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{port}",
        "KEYBROKER_SERVER_PROCESSES": str(processes),  # what "auto" gives, when asked for it
        "KEYBROKER_SERVER_THREADS": str(threads),
        **(overrides or {}),
    }
    serve = [sys.executable, "-m", "keybroker.cli.main", "serve"] if wrapper else _serve_argv()
    argv = [*(wrapper or []), *serve, "--config", str(env.config)]
    with _started(
        argv, work / f"broker{suffix}.log", environ, processes, timeout=start_timeout
    ) as child:
        files = work / f"requests{suffix}"
        files.mkdir(exist_ok=True)
        _prepare_requests(env, port, files, call_timeout)
        yield Broker(env, port, child, processes, files)


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for the block (child processes included)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _production_telemetry(config: Path) -> None:
    """Drop the dev config's span file: decision spans are still made for every call (as in
    production), but not written as JSON lines to local disk (a development aid that would
    grow by gigabytes here). No OTLP exporter either: no collector runs on this machine."""
    text = config.read_text()
    config.write_text(re.sub(r"(?m)^span_file\s*=.*\n", "", text))
    loaded = settings_mod.load(config, environ={})
    if getattr(loaded.telemetry, "span_file", None) is not None or loaded.telemetry.otlp_endpoint:
        raise SystemExit(f"bench: could not turn span export off in {config}")


@contextmanager
def _started(
    argv: list[str],
    log: Path,
    environ: dict[str, str],
    processes: int,
    *,
    attempts: int = 3,
    timeout: float = 60.0,
) -> Iterator[procs.Child]:
    """Start the broker; retry a start whose worker lost a race for the token (see
    bench/NOTES.md: workers starting at once sometimes fail to find the SoftHSM token)."""
    for attempt in range(1, attempts + 1):
        child = procs.Child(argv, log=log, env=environ)
        try:
            _wait_listening(child, processes, timeout)
        except SystemExit as exc:
            child.stop()
            if attempt == attempts or "no token labelled" not in str(exc):
                raise
            print(
                f"bench: broker start {attempt} failed (a worker did not find the token); retrying",
                file=sys.stderr,
            )
            continue
        with child:
            yield child
        return


def _wait_listening(child: procs.Child, processes: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_LISTENING_RE.findall(child.output())) >= processes:
            return
        if not child.alive():
            raise SystemExit(f"bench: the broker exited early:\n{child.output()}")
        time.sleep(0.1)
    raise SystemExit(f"bench: the broker did not start in {timeout:.0f}s:\n{child.output()}")


def _prepare_requests(env: DevEnv, port: int, files: Path, timeout: float = 10.0) -> None:
    """Check the broker end to end once and write the requests the load generator replays."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=env.ca_cert.read_bytes(),
        private_key=env.key("client").read_bytes(),
        certificate_chain=env.cert("client").read_bytes(),
    )
    token = mint_token(env, scopes=["keys:unwrap", "keys:generate"], purposes=[PURPOSE])
    metadata = [("authorization", f"Bearer {token}")]
    recording_id = f"{RECORDING_ID}-{secrets.token_hex(4)}"  # registered once per broker state
    generate = pb.GenerateDataKeyRequest(
        recording_id=f"bench-{UNIQUE_PLACEHOLDER}",
        purposes=[PURPOSE],
        subject_ids=list(SUBJECT_IDS),
        context=CONTEXT,
    )
    health_request = health_pb2.HealthCheckRequest(service="")
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_request, timeout=timeout).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise SystemExit(f"bench: broker health is {status}, not SERVING")
        stub = pb_grpc.KeyBrokerStub(channel)  # type: ignore[no-untyped-call]
        check = pb.GenerateDataKeyRequest()
        check.CopyFrom(generate)
        check.recording_id = recording_id
        generated: pb.GenerateDataKeyResponse = stub.GenerateDataKey(
            check, metadata=metadata, timeout=timeout
        )
        unwrap = pb.UnwrapDataKeyRequest(
            recording_id=recording_id,
            wrapped_key=generated.wrapped_key,
            purpose=PURPOSE,
            context=CONTEXT,
        )
        unwrapped: pb.UnwrapDataKeyResponse = stub.UnwrapDataKey(
            unwrap, metadata=metadata, timeout=timeout
        )
        if unwrapped.data_key != generated.data_key or len(generated.data_key) != 32:
            raise SystemExit("bench: UnwrapDataKey did not return the generated data key")
    token_file = files / "token.txt"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    (files / "wrapped_key.bin").write_bytes(generated.wrapped_key)
    (files / "generate.bin").write_bytes(generate.SerializeToString())
    (files / "unwrap.bin").write_bytes(unwrap.SerializeToString())
    (files / "health.bin").write_bytes(health_request.SerializeToString())


@dataclass(frozen=True)
class LoadSpec:
    concurrency: int
    connections: int
    warmup: float
    duration: float
    max_calls: int
    call_timeout: float = 10.0
    """Each call's deadline, seconds."""


def run_load(
    loadgen: Path,
    broker: Broker,
    method: str,
    spec: LoadSpec,
    log: Path,
    *,
    request: Path | None = None,
    token: Path | None = None,
    on_mark: Callable[[str], None] | None = None,
) -> Measurement:
    """One closed-loop phase of the C++ load generator; server CPU sampled at its window marks.
    ``request`` and ``token`` replace the broker's prepared ones (other methods, scopes);
    ``on_mark("start" | "end")`` is called at the window marks too (e.g. callgrind_control)."""
    argv = [
        str(loadgen),
        "--target", broker.target,
        "--ca", str(broker.env.ca_cert),
        "--cert", str(broker.env.cert("client")),
        "--key", str(broker.env.key("client")),
        "--method", method,
        "--request", str(request or broker.request_file(method)),
        "--concurrency", str(spec.concurrency),
        "--connections", str(spec.connections),
        "--warmup", str(spec.warmup),
        "--duration", str(spec.duration),
        "--max-calls", str(spec.max_calls),
        "--call-timeout", f"{spec.call_timeout:g}",
    ]  # fmt: skip
    if method != HEALTH:
        argv += ["--token-file", str(token or broker.token_file)]
    if method == GENERATE and request is None:
        offset = broker.request_file(method).read_bytes().find(UNIQUE_PLACEHOLDER.encode())
        argv += ["--unique-at", str(offset)]
    roots = [broker.child.pid]
    before = after = None
    result: dict[str, object] | None = None
    with log.open("ab") as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
        watchdog = threading.Timer(spec.warmup + spec.duration + spec.call_timeout + 60, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("MEASURE_START"):
                    if on_mark is not None:
                        on_mark("start")
                    before = procs.snapshot(roots)
                elif line.startswith("MEASURE_END"):
                    after = procs.snapshot(roots)
                    if on_mark is not None:
                        on_mark("end")
                elif line.startswith("RESULT "):
                    result = json.loads(line.removeprefix("RESULT "))
            code = proc.wait(30)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if code != 0 or result is None or before is None or after is None:
        raise SystemExit(f"bench: load generator failed (exit {code}); see {log}")
    return _measurement(result, procs.delta(before, after))


def _measurement(result: dict[str, object], cpu: procs.CpuDelta) -> Measurement:
    def num(key: str) -> float:
        value = result[key]
        assert isinstance(value, int | float)
        return float(value)

    ok, errors = int(num("ok")), int(num("errors"))
    shares = sorted(
        (v / cpu.seconds for v in cpu.per_pid.values() if cpu.seconds > 0), reverse=True
    )
    shares = [s for s in shares if s >= 0.01]  # the workers (not the idle parent, the tracker)
    return Measurement(
        ok=ok,
        errors=errors,
        seconds=num("seconds"),
        rate=num("rate"),
        p50_ms=num("p50_us") / 1000,
        p99_ms=num("p99_us") / 1000,
        server_cpu_us=cpu.seconds * 1e6 / ok if ok else None,
        server_cores=cpu.cores,
        client_cpu_us=num("client_cpu_us_per_call"),
        all_in_cpu_us=cpu.all_in_us(num("client_cpu_us_per_call") * (ok + errors) / 1e6, ok),
        machine_busy=cpu.machine_busy_fraction,
        split=tuple(shares),
        extra={"error_codes": result.get("error_codes"), "first_error": result.get("first_error")},
    )
