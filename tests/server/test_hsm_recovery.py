"""HSM loss and recovery without restart: UNAVAILABLE and NOT_SERVING while the token is gone,
serving again by itself once it is back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker.devenv import DevEnv, mint_token, provision
from keybroker.v1 import keybroker_pb2 as pb
from tests.conftest import code_of
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess


@pytest.fixture
def own_env(tmp_path: Path) -> DevEnv:
    return provision(tmp_path / "state", listen="127.0.0.1:0")


@pytest.fixture
def running(own_env: DevEnv, tmp_path: Path) -> Iterator[tuple[BrokerProcess, int]]:
    proc = BrokerProcess(own_env, tmp_path / "broker.log", {"KEYBROKER_HSM_HEALTH_INTERVAL": "0.2"})
    port = proc.wait_listening()
    yield proc, port
    proc.stop()


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


def test_token_loss_gives_unavailable_and_recovers_without_restart(
    own_env: DevEnv, running: tuple[BrokerProcess, int], tmp_path: Path
) -> None:
    """Removing the token directory makes calls UNAVAILABLE and health NOT_SERVING; restoring it
    brings both back with the same process, and old wrapped keys still unwrap."""
    proc, port = running
    token = mint_token(own_env, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    with channel(own_env, port) as ch:
        kb = stub(ch)
        health = health_pb2_grpc.HealthStub(ch)

        def status() -> int:
            resp = health.Check(
                health_pb2.HealthCheckRequest(service="keybroker.v1.KeyBroker"), timeout=5
            )
            return int(resp.status)

        request = generate_request()
        gen = kb.GenerateDataKey(request, metadata=auth(token))
        assert status() == health_pb2.HealthCheckResponse.SERVING

        hidden = tmp_path / "tokens-away"
        own_env.token_dir.rename(hidden)
        _eventually(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
        unwrap = pb.UnwrapDataKeyRequest(
            recording_id=request.recording_id, wrapped_key=gen.wrapped_key, purpose="support"
        )
        for call in (
            lambda: kb.GenerateDataKey(generate_request(), metadata=auth(token)),
            lambda: kb.UnwrapDataKey(unwrap, metadata=auth(token)),
        ):
            assert code_of(call) == (
                grpc.StatusCode.UNAVAILABLE,
                "key store temporarily unavailable",
            )

        hidden.rename(own_env.token_dir)
        _eventually(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
        assert kb.UnwrapDataKey(unwrap, metadata=auth(token)).data_key == gen.data_key
        assert len(kb.GenerateDataKey(generate_request(), metadata=auth(token)).data_key) == 32
    assert proc.proc.poll() is None, "the broker must not restart or die"
