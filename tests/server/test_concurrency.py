"""Concurrency: many clients at once never crash the HSM (one PKCS#11 call at a time) or err."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker.devenv import DevEnv
from keybroker.server.app import RunningBroker
from keybroker.v1 import keybroker_pb2 as pb
from tests.conftest import TokenFactory
from tests.support.clients import auth, channel, generate_request, stub

CLIENTS = 8
CALLS_PER_CLIENT = 1000
TIME_LIMIT_S = 120


def test_eight_clients_thousand_mixed_calls_each(
    devenv: DevEnv, broker: RunningBroker, token: TokenFactory
) -> None:
    """8 clients (own connections) x 1,000 mixed generate/unwrap/rewrap calls: zero errors,
    every unwrap returns the right key, and the server is healthy afterwards."""
    t = token()
    deadline = time.monotonic() + TIME_LIMIT_S
    errors: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> int:
        done = 0
        with channel(devenv, broker.port, own_connection=True) as ch:
            kb = stub(ch)
            request = generate_request()  # each generate is for a new recording
            rid = request.recording_id
            gen = kb.GenerateDataKey(request, metadata=auth(t))
            wrapped, key = gen.wrapped_key, gen.data_key
            done += 1
            while done < CALLS_PER_CLIENT and time.monotonic() < deadline:
                try:
                    kind = done % 10
                    if kind == 0:
                        request = generate_request()
                        gen = kb.GenerateDataKey(request, metadata=auth(t))
                        rid, wrapped, key = request.recording_id, gen.wrapped_key, gen.data_key
                    elif kind == 1:
                        wrapped = kb.RewrapDataKey(
                            pb.RewrapDataKeyRequest(recording_id=rid, wrapped_key=wrapped),
                            metadata=auth(t),
                        ).wrapped_key
                    else:
                        out = kb.UnwrapDataKey(
                            pb.UnwrapDataKeyRequest(
                                recording_id=rid, wrapped_key=wrapped, purpose="support"
                            ),
                            metadata=auth(t),
                        )
                        if out.data_key != key:
                            raise AssertionError("unwrap returned another key")
                except Exception as exc:
                    with lock:
                        errors.append(f"client {n} call {done}: {exc!r}")
                done += 1
        return done

    with ThreadPoolExecutor(CLIENTS) as pool:
        counts = list(pool.map(client, range(CLIENTS)))
    assert errors == []
    assert counts == [CALLS_PER_CLIENT] * CLIENTS, "time limit reached before all calls ran"
    with channel(devenv, broker.port) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = health.Check(
            health_pb2.HealthCheckRequest(service="keybroker.v1.KeyBroker"), timeout=5
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
