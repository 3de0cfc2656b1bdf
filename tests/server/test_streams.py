"""Streams cannot starve the control planes (issue 14, item 10): health Watch and reflection run
on their own bounded pool, at most ``streams_per_connection`` per connection and ``stream_queue``
waiting; admin, privacy and RewrapDataKeys keep their threads."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker.devenv import DevEnv, mint_token
from keybroker.server.app import RunningBroker, create_server
from keybroker.server.refusals import TOO_MANY_STREAMS
from keybroker.v1 import privacy_pb2 as ppb
from keybroker.v1 import privacy_pb2_grpc as ppb_grpc
from tests.conftest import load_settings
from tests.support.clients import auth, channel, generate_request, stub


@pytest.fixture
def running(devenv: DevEnv, tmp_path: Path) -> Iterator[RunningBroker]:
    broker = create_server(
        load_settings(
            devenv,
            state_url=f"sqlite:{tmp_path / 'kb.db'}",
            audit_dir=str(tmp_path / "journal"),
        )
    )
    yield broker
    broker.stop(1)


def _watch(ch: grpc.Channel) -> Any:
    health = health_pb2_grpc.HealthStub(ch)
    return health.Watch(health_pb2.HealthCheckRequest(service=""))


def _served(watches: list[Any], timeout: float) -> list[Any]:
    """The watches whose first message arrives within ``timeout`` (read on helper threads: a
    stream still waiting for a stream thread would block a plain ``next`` for ever)."""
    served: list[Any] = []
    lock = threading.Lock()

    def read(w: Any) -> None:
        try:
            first = next(w)
        except (grpc.RpcError, StopIteration):
            return
        if first.status == health_pb2.HealthCheckResponse.SERVING:
            with lock:
                served.append(w)

    threads = [threading.Thread(target=read, args=(w,), daemon=True) for w in watches]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return list(served)


def _erase_seconds(devenv: DevEnv, port: int) -> float:
    """Time of one GenerateWrappedDataKey + EraseRecording, over a fresh connection."""
    data = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
    dpo = mint_token(devenv, scopes=["privacy:erase"], amr=["mfa"], subject="dpo-1")
    rec = f"rec-{uuid.uuid4().hex[:10]}"
    with channel(devenv, port, own_connection=True) as ch:
        stub(ch).GenerateWrappedDataKey(generate_request(rec), metadata=auth(data), timeout=10)
        privacy = ppb_grpc.PrivacyStub(ch)  # type: ignore[no-untyped-call]
        started = time.monotonic()
        privacy.EraseRecording(
            ppb.EraseRecordingRequest(recording_id=rec, reason="art. 17"),
            metadata=auth(dpo),
            timeout=10,
        )
        return time.monotonic() - started


def test_fifty_idle_watch_streams_do_not_delay_an_erasure(
    devenv: DevEnv, running: RunningBroker
) -> None:
    """50 Watch streams over 10 connections, left open and idle: an erasure still answers in
    its normal time; the streams beyond the limits are refused at once, not queued for ever."""
    normal = _erase_seconds(devenv, running.port)
    channels = [channel(devenv, running.port, own_connection=True) for _ in range(10)]
    watches = [_watch(ch) for ch in channels for _ in range(5)]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(w.done() for w in watches) < 30:
            time.sleep(0.05)
        loaded = _erase_seconds(devenv, running.port)
        assert loaded < max(2.0, 5 * normal), (normal, loaded)
        refused = [w for w in watches if w.done()]
        # 10 connections x 5: one over the per-connection cap on each (10), and of the 40 left
        # only 4 running + 16 waiting are admitted (20 more)
        assert len(refused) == 30
        assert {w.code() for w in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        waiting = [w for w in watches if not w.done()]
        assert len(_served(waiting, 3.0)) == 4  # 4 stream threads serve; 16 wait their turn
    finally:
        for w in watches:
            w.cancel()
        for ch in channels:
            ch.close()
    refusals = running.server.refusals
    assert refusals is not None
    assert refusals.totals["127.0.0.1", TOO_MANY_STREAMS] == 30


def test_streams_per_connection_are_capped(devenv: DevEnv, running: RunningBroker) -> None:
    """One connection may hold 4 streams; the 5th is refused with RESOURCE_EXHAUSTED, and once
    one ends, a new one is admitted."""
    with channel(devenv, running.port, own_connection=True) as ch:
        watches = [_watch(ch) for _ in range(4)]
        extra: list[Any] = []
        try:
            assert len(_served(watches, 5.0)) == 4  # each admitted and running
            extra.append(_watch(ch))
            deadline = time.monotonic() + 5
            while not extra[0].done() and time.monotonic() < deadline:  # refused at once
                time.sleep(0.02)
            assert extra[0].done() and extra[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            watches[0].cancel()
            deadline = time.monotonic() + 5
            while True:  # the cancelled stream's thread lets go of its slot shortly
                extra.append(_watch(ch))
                if _served(extra[-1:], 2.0):
                    break
                assert time.monotonic() < deadline, "a slot never came free"
                time.sleep(0.05)
        finally:
            for w in [*watches, *extra]:
                w.cancel()
