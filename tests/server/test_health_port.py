"""The plaintext health port (`[server] health_listen`) for kubelet probes, with real processes:
readiness apart from liveness, served by the supervisor for every worker, nothing but health on
it; `keybroker health`; worker start-up errors reported as a single process reports them."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from keybroker.devenv import DevEnv, mint_token, provision
from keybroker.v1 import admin_pb2
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, free_port, run_cli

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_PID_RE = re.compile(r"listening on port \d+ \(pid (\d+)\)")


def _eventually(check: Callable[[], bool], timeout: float = 15.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


class Probe:
    """A plaintext client of the health port, as kubelet's gRPC probe is."""

    def __init__(self, port: int) -> None:
        self.target = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.target)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str) -> int:
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def two_workers(devenv: DevEnv, tmp_path: Path) -> Iterator[tuple[BrokerProcess, Probe, int]]:
    health = free_port()
    proc = BrokerProcess(
        devenv,
        tmp_path / "broker.log",
        {
            "KEYBROKER_SERVER_PROCESSES": "2",
            "KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{free_port()}",
            "KEYBROKER_SERVER_HEALTH_LISTEN": f"127.0.0.1:{health}",
            "KEYBROKER_SERVER_LIVENESS_TIMEOUT": "1",
            "KEYBROKER_HSM_HEALTH_INTERVAL": "0.2",
        },
    )
    probe = Probe(health)
    try:
        port = proc.wait_listening(count=2)
        yield proc, probe, port
    finally:
        probe.close()
        proc.stop()


def test_health_port_answers_readiness_and_liveness_and_nothing_else(
    devenv: DevEnv, two_workers: tuple[BrokerProcess, Probe, int]
) -> None:
    """Plaintext, no client certificate: `readiness` (and "") and `liveness` are SERVING once
    both workers serve; any other service is NOT_FOUND; every broker method, reflection
    included, is UNIMPLEMENTED there; the mTLS port's health service is unchanged."""
    proc, probe, port = two_workers
    _eventually(lambda: probe.status("readiness") == probe.status("liveness") == SERVING)
    assert probe.status("") == SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        probe.status("keybroker.v1.KeyBroker")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    token = mint_token(devenv, scopes=["keys:generate", "keys:admin"], purposes=["support"])
    kb = stub(probe.channel)
    calls: list[Callable[[], object]] = [
        lambda: kb.GenerateDataKey(generate_request(), metadata=auth(token), timeout=5),
        lambda: probe.channel.unary_unary(
            "/keybroker.v1.KeyAdmin/ListKeys",
            request_serializer=admin_pb2.ListKeysRequest.SerializeToString,
            response_deserializer=admin_pb2.ListKeysResponse.FromString,
        )(admin_pb2.ListKeysRequest(), metadata=tuple(auth(token)), timeout=5),
        lambda: list(
            reflection_pb2_grpc.ServerReflectionStub(probe.channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # the data port still serves (and its own health, behind mTLS, is as before)
    with channel(devenv, port) as ch:
        assert len(stub(ch).GenerateDataKey(generate_request(), metadata=auth(token)).data_key)
        mtls = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="keybroker.v1.KeyBroker"), timeout=5
        )
        assert mtls.status == SERVING
    # Watch: the status now (a person may watch; kubelet checks)
    watch = probe.health.Watch(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
    assert next(watch).status == SERVING
    watch.cancel()
    assert proc.output().count("health probes (plaintext, grpc.health.v1 only)") == 1


def test_a_stuck_worker_is_not_live_but_still_ready(
    two_workers: tuple[BrokerProcess, Probe, int],
) -> None:
    """One worker stopped (SIGSTOP: its loops no longer turn): `liveness` turns NOT_SERVING
    within liveness_timeout plus the loops' interval (2 s here); `readiness` is another
    question and stays as it was. Resumed, liveness is SERVING again."""
    proc, probe, _port = two_workers
    _eventually(lambda: probe.status("liveness") == SERVING)
    pids = [int(p) for p in _PID_RE.findall(proc.output())]
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGSTOP)
    try:
        took = _eventually(lambda: probe.status("liveness") == NOT_SERVING, timeout=10)
        assert took > 1.0  # not before the bound
        assert probe.status("readiness") == SERVING
    finally:
        os.kill(pids[1], signal.SIGCONT)
    _eventually(lambda: probe.status("liveness") == SERVING, timeout=10)
    assert re.search(r"liveness: NOT_SERVING, no turn for over 2 s: worker \d: ", proc.output())


def test_shutdown_is_not_ready_before_the_port_closes(
    two_workers: tuple[BrokerProcess, Probe, int],
) -> None:
    """SIGTERM: `readiness` turns NOT_SERVING while the workers drain and stop (the pod leaves
    the Service first); the health port closes after them and the broker exits 0."""
    proc, probe, _port = two_workers
    _eventually(lambda: probe.status("readiness") == SERVING)
    proc.proc.send_signal(signal.SIGTERM)
    seen: list[int] = []
    closed = None
    deadline = time.monotonic() + 30
    while closed is None and time.monotonic() < deadline:
        try:
            seen.append(probe.status("readiness"))
        except grpc.RpcError as exc:
            closed = exc.code()
        time.sleep(0.02)
    assert closed == grpc.StatusCode.UNAVAILABLE
    assert NOT_SERVING in seen, seen
    first = seen.index(NOT_SERVING)
    assert seen[first:] == [NOT_SERVING] * (len(seen) - first)  # never ready again
    assert proc.proc.wait(30) == 0


@pytest.fixture
def own_env(tmp_path: Path) -> DevEnv:
    return provision(tmp_path / "state", listen="127.0.0.1:0")


def test_an_hsm_outage_is_not_ready_but_live(own_env: DevEnv, tmp_path: Path) -> None:
    """The HSM token gone (its directory renamed): `readiness` NOT_SERVING (kubelet takes the
    pod out of the Service), `liveness` SERVING throughout (kubelet does not restart it); the
    token back, ready again by itself, same process. One worker: the supervisor still serves
    the health port."""
    health = free_port()
    proc = BrokerProcess(
        own_env,
        tmp_path / "broker.log",
        {
            "KEYBROKER_SERVER_PROCESSES": "1",
            "KEYBROKER_SERVER_HEALTH_LISTEN": f"127.0.0.1:{health}",
            "KEYBROKER_HSM_HEALTH_INTERVAL": "0.2",
        },
    )
    probe = Probe(health)
    away = tmp_path / "tokens-away"
    try:
        proc.wait_listening()
        _eventually(lambda: probe.status("readiness") == SERVING)
        own_env.token_dir.rename(away)
        _eventually(lambda: probe.status("readiness") == NOT_SERVING)
        for _ in range(10):
            assert probe.status("liveness") == SERVING
            assert probe.status("readiness") == NOT_SERVING
            time.sleep(0.2)
        away.rename(own_env.token_dir)
        _eventually(lambda: probe.status("readiness") == SERVING)
        assert probe.status("liveness") == SERVING
        assert proc.proc.poll() is None
        assert proc.output().count("listening on port") == 1  # never restarted
    finally:
        if away.exists():
            away.rename(own_env.token_dir)
        probe.close()
    assert proc.stop(signal.SIGTERM) == 0


# -- keybroker health --------------------------------------------------------------------------


def _config_with_health(devenv: DevEnv, tmp_path: Path, health: str) -> Path:
    path = devenv.root / f"health-{tmp_path.name}.toml"
    text = devenv.config.read_text()
    path.write_text(text.replace("[server]\n", f'[server]\nhealth_listen = "{health}"\n', 1))
    return path


def test_health_command_prints_both_and_exits_by_them(
    devenv: DevEnv, two_workers: tuple[BrokerProcess, Probe, int], tmp_path: Path
) -> None:
    """`keybroker health`: 0 and both SERVING; a stuck worker: 1, and `--service readiness`
    alone still 0 (an exec readiness probe is not failed by liveness, nor the reverse)."""
    proc, probe, _port = two_workers
    config = _config_with_health(devenv, tmp_path, probe.target)
    _eventually(lambda: probe.status("readiness") == probe.status("liveness") == SERVING)
    out = run_cli("health", "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^readiness\s+SERVING$", out.stdout, re.M), out.stdout
    assert re.search(r"^liveness\s+SERVING$", out.stdout, re.M), out.stdout
    pid = int(_PID_RE.findall(proc.output())[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        _eventually(lambda: probe.status("liveness") == NOT_SERVING, timeout=10)
        out = run_cli("health", "--config", str(config))
        assert out.returncode == 1
        assert re.search(r"^liveness\s+NOT_SERVING$", out.stdout, re.M), out.stdout
        ready = run_cli("health", "--config", str(config), "--service", "readiness")
        assert ready.returncode == 0, ready.stdout + ready.stderr
        assert "liveness" not in ready.stdout
    finally:
        os.kill(pid, signal.SIGCONT)


def test_health_command_without_a_port_or_a_broker(devenv: DevEnv, tmp_path: Path) -> None:
    """No `[server] health_listen`: a configuration error (2) saying what to set. Nobody
    listening: 1 (a runtime failure, as for every command), naming the address."""
    out = run_cli("health", "--config", str(devenv.config))
    assert out.returncode == 2
    assert "[server] health_listen" in out.stderr
    assert "Traceback" not in out.stderr
    nobody = _config_with_health(devenv, tmp_path, f"0.0.0.0:{free_port()}")
    out = run_cli("health", "--config", str(nobody), "--timeout", "1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "127.0.0.1:" in out.stderr and "UNAVAILABLE" in out.stderr
    assert "Traceback" not in out.stderr


# -- worker start-up errors --------------------------------------------------------------------


def _serve(devenv: DevEnv, tmp_path: Path, processes: int, **env: str) -> tuple[int, str]:
    out = run_cli(
        "serve",
        "--config",
        str(devenv.config),
        env={
            "KEYBROKER_SERVER_PROCESSES": str(processes),
            "KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{free_port()}",
            "KEYBROKER_AUDIT_DIR": str(tmp_path / f"journal-{processes}"),
            **env,
        },
    )
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stderr


@pytest.mark.parametrize("processes", [2])
def test_worker_start_up_errors_read_as_a_single_process_s(
    devenv: DevEnv, tmp_path: Path, processes: int
) -> None:
    """A wrong PIN with several workers: exit 2 and the single process's one line, once (not a
    traceback per worker and exit 1); an unreachable database: the single process's line and
    exit code too (1: a runtime failure, worth a restart; not a configuration error)."""
    pin = tmp_path / "wrong.pin"
    pin.write_text("0000\n")
    wrong_pin = {"KEYBROKER_HSM_PIN_FILE": str(pin)}
    no_db = {"KEYBROKER_STATE_URL": f"postgresql://keybroker@127.0.0.1:{free_port()}/keybroker"}
    for env, code in ((wrong_pin, 2), (no_db, 1)):
        single = _serve(devenv, tmp_path, 1, **env)
        several = _serve(devenv, tmp_path, processes, **env)
        assert single[0] == several[0] == code, (single, several)
        ours = [line for line in several[1].splitlines() if line.startswith("keybroker: ")]
        theirs = [line for line in single[1].splitlines() if line.startswith("keybroker: ")]
        assert len(theirs) == 1, single[1]
        assert ours == theirs, several[1]
        if code == 2:
            assert ours[0].startswith("keybroker: configuration error: [hsm] pin_file: ")
