"""``[server] engine``: the loop and grpcio's public server give the same answers.

Both engines serve the same small service over real mTLS here, side by side; the broker's own
behaviour on each engine is covered by running tests/server on both (``make test``)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from keybroker import settings as settings_mod
from keybroker.devenv import DevEnv
from keybroker.errors import ConfigurationError
from keybroker.server.app import RunningBroker
from keybroker.server.engines import ENGINES, Engine, create_engine
from keybroker.server.handlers import HandlerRegistry, ServerOptions
from keybroker.server.refusals import (
    MALFORMED_MESSAGE,
    NO_MESSAGE,
    TOO_MANY_STREAMS,
    UNKNOWN_METHOD,
    RefusalLog,
)
from keybroker.server.status import REASON_METADATA
from tests.conftest import ENGINE
from tests.support.clients import channel
from tests.support.process import run_fresh

SERVICE = "test.Engines"


class Service:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.terminated = threading.Event()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo:" + request

    def deny(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata(((REASON_METADATA, "not_allowed"),))
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not allowed")

    def boom(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("secret-detail")

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.release.wait(10)
        return b"slow"

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(self.terminated.set)
        for i in range(int(request or b"3")):
            yield str(i).encode()
        if request == b"1000":
            self.release.wait(10)

    def broken_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        raise RuntimeError("secret-detail")


def _parse_strict(data: bytes) -> bytes:
    if data.startswith(b"\xff"):
        raise ValueError("not a message")
    return data


def _credentials(devenv: DevEnv) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(devenv.key("server").read_bytes(), devenv.cert("server").read_bytes())],
        root_certificates=devenv.ca_cert.read_bytes(),
        require_client_auth=True,
    )


@pytest.fixture(params=ENGINES)
def served(
    request: pytest.FixtureRequest, devenv: DevEnv
) -> Iterator[tuple[Service, Engine, grpc.Channel]]:
    """The test service on one engine (each test runs on both), with a refusal log."""
    svc = Service()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Echo": grpc.unary_unary_rpc_method_handler(svc.echo, request_deserializer=_parse_strict),
        "Deny": grpc.unary_unary_rpc_method_handler(svc.deny),
        "Boom": grpc.unary_unary_rpc_method_handler(svc.boom),
        "Slow": grpc.unary_unary_rpc_method_handler(svc.slow),
        "Count": grpc.unary_stream_rpc_method_handler(svc.count),
        "Broken": grpc.unary_stream_rpc_method_handler(svc.broken_stream),
    }
    registry = HandlerRegistry()
    registry.add_registered_method_handlers(SERVICE, handlers)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registry)
    reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), registry)  # type: ignore[arg-type]
    server = create_engine(
        request.param,
        registry,
        inline=frozenset({f"/{SERVICE}/Echo", f"/{SERVICE}/Deny", f"/{SERVICE}/Boom"}),
        options=ServerOptions(
            pool_threads=2,
            stream_threads=1,
            streams_per_connection=3,
            stream_queue=1,
            channel_options=(("grpc.max_receive_message_length", 1024),),
        ),
        refusals=RefusalLog(),
    )
    assert server.engine == request.param
    port = server.add_secure_port("127.0.0.1:0", _credentials(devenv))
    server.start()
    ch = channel(devenv, port, own_connection=True)
    try:
        yield svc, server, ch
    finally:
        svc.release.set()
        ch.close()
        assert server.stop(None).wait(10)


def _unary(ch: grpc.Channel, name: str, service: str = SERVICE) -> Any:
    return ch.unary_unary(f"/{service}/{name}", request_serializer=None, response_deserializer=None)


def _stream(ch: grpc.Channel, name: str) -> Any:
    return ch.unary_stream(
        f"/{SERVICE}/{name}", request_serializer=None, response_deserializer=None
    )


def _status(call: Any) -> tuple[grpc.StatusCode, str, tuple[Any, ...]]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), err.details(), tuple(err.trailing_metadata() or ())


def _counted(server: Engine, kind: str, expected: int) -> bool:
    refusals = server.refusals
    assert refusals is not None
    deadline = time.monotonic() + 5
    while refusals.totals["127.0.0.1", kind] != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return refusals.totals["127.0.0.1", kind] == expected


def test_answers_and_refusals_are_the_same_on_both_engines(
    served: tuple[Service, Engine, grpc.Channel],
) -> None:
    """Success, an abort with its reason trailer, a handler bug, a request that does not parse,
    an unknown method, a unary call without its message, one over the size limit: the same
    status code and message on each engine, and each refusal counted per peer IP."""
    _svc, server, ch = served
    assert _unary(ch, "Echo")(b"hi", timeout=5) == b"echo:hi"
    code, details, trailers = _status(lambda: _unary(ch, "Deny")(b"", timeout=5))
    assert (code, details) == (grpc.StatusCode.PERMISSION_DENIED, "not allowed")
    assert (REASON_METADATA, "not_allowed") in trailers
    code, details, _ = _status(lambda: _unary(ch, "Boom")(b"", timeout=5))
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error")  # never UNKNOWN
    code, details, _ = _status(lambda: _unary(ch, "Echo")(b"\xff\x00", timeout=5))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")
    assert _counted(server, MALFORMED_MESSAGE, 1)
    code, details, _ = _status(lambda: _unary(ch, "Nope")(b"", timeout=5))
    assert (code, details) == (grpc.StatusCode.UNIMPLEMENTED, "method not found")
    assert _counted(server, UNKNOWN_METHOD, 1)
    none = ch.stream_unary(f"/{SERVICE}/Echo", request_serializer=None, response_deserializer=None)
    code, details, _ = _status(lambda: none(iter(()), timeout=5))
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "one request message expected")
    assert _counted(server, NO_MESSAGE, 1)
    code, _, _ = _status(lambda: _unary(ch, "Echo")(b"x" * 4096, timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC core's answer, on both
    assert _counted(server, NO_MESSAGE, 2)
    assert _unary(ch, "Echo")(b"ok", timeout=5) == b"echo:ok"  # still serving


def test_streams_on_both_engines(served: tuple[Service, Engine, grpc.Channel]) -> None:
    """Streams run, a failing one ends INTERNAL, a cancelled one ends on the server, reflection
    answers, and a health Watch sees its first status."""
    svc, _server, ch = served
    count = _stream(ch, "Count")
    assert list(count(b"3", timeout=5)) == [b"0", b"1", b"2"]
    broken = _stream(ch, "Broken")
    stream = broken(b"", timeout=5)
    assert next(stream) == b"first"
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    err: Any = info.value
    assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, "internal error")
    running = count(b"1000", timeout=10)
    next(running)
    running.cancel()
    assert svc.terminated.wait(5)
    reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
    [answer] = list(
        reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    assert {s.name for s in answer.list_services_response.service} >= {SERVICE}
    watch: Any = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_a_stream_its_client_cancels_ends_quietly(
    served: tuple[Service, Engine, grpc.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    """A reflection stream the client cancels while the server waits for its next request ends
    without an error in the log (it is no handler failure), and frees its stream thread."""
    _svc, _server, ch = served
    reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
    requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    requests.put(request)
    stream: Any = reflect.ServerReflectionInfo(iter(requests.get, None), timeout=10)
    with caplog.at_level(logging.ERROR):
        assert next(stream).list_services_response.service
        stream.cancel()
        time.sleep(0.5)
        again: Any = reflect.ServerReflectionInfo(iter([request]), timeout=5)
        assert len(list(again)) == 1  # the one stream thread is free again
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_stream_limits_on_both_engines(served: tuple[Service, Engine, grpc.Channel]) -> None:
    """One stream thread, one more waiting for it, 3 per connection: the first stream runs,
    the second waits for the thread, the third is refused at once with RESOURCE_EXHAUSTED and
    counted; once the running one ends, the waiting one runs."""
    _svc, server, ch = served
    count = _stream(ch, "Count")
    running = count(b"1000", timeout=20)
    assert next(running) == b"0"
    waiting = count(b"2", timeout=20)
    time.sleep(0.3)
    refused = count(b"1", timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        list(refused)
    err: Any = info.value
    assert (err.code(), err.details()) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many streaming calls; retry later",
    )
    assert _counted(server, TOO_MANY_STREAMS, 1)
    assert not waiting.done()
    running.cancel()
    assert list(waiting) == [b"0", b"1"]


def test_stop_waits_for_in_flight_calls(served: tuple[Service, Engine, grpc.Channel]) -> None:
    """A call in flight when stop begins finishes within the grace period."""
    svc, server, ch = served
    with futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_unary(ch, "Slow"), b"", timeout=20)
        time.sleep(0.3)
        stopped = server.stop(5)
        time.sleep(0.2)
        svc.release.set()
        assert slow.result(10) == b"slow"
        assert stopped.wait(10)


def test_the_suite_runs_on_the_engine_it_was_asked_for(broker: RunningBroker) -> None:
    """``KEYBROKER_SERVER_ENGINE`` reaches the suite's brokers (make test's second pass)."""
    assert broker.server.engine == ENGINE


def test_the_setting(devenv: DevEnv) -> None:
    assert settings_mod.load(devenv.config, environ={}).server.engine == "loop"
    env = {"KEYBROKER_SERVER_ENGINE": "grpc"}
    assert settings_mod.load(devenv.config, environ=env).server.engine == "grpc"
    with pytest.raises(ConfigurationError, match=r"\[server\] engine: expected"):
        settings_mod.load(devenv.config, environ={"KEYBROKER_SERVER_ENGINE": "aio"})
    with pytest.raises(ConfigurationError, match=r"\[server\] engine"):
        create_engine("aio", HandlerRegistry(), inline=frozenset(), options=ServerOptions(),
                      refusals=None)  # fmt: skip


def test_the_grpc_engine_serves_without_grpcio_private_layer() -> None:
    """With keybroker's door to grpcio's private layer unimportable (as after a grpcio release
    that moved it), the broker's server module still imports and the grpc engine serves."""
    out = run_fresh(
        """
import sys
sys.modules["keybroker.server.grpc_private"] = None  # any import of it now fails
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
import keybroker.server.app
from keybroker.server.engines import create_engine
from keybroker.server.handlers import HandlerRegistry, ServerOptions
try:
    import keybroker.server.loop
except ImportError:
    print("loop unavailable")
registry = HandlerRegistry()
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), registry)
server = create_engine("grpc", registry, inline=frozenset(), options=ServerOptions(),
                       refusals=None)
port = server.add_secure_port("127.0.0.1:0", grpc.local_server_credentials())
server.start()
with grpc.secure_channel(f"127.0.0.1:{port}", grpc.local_channel_credentials()) as ch:
    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
print("status", reply.status)
server.stop(None).wait(10)
"""
    )
    assert "loop unavailable" in out
    assert "status 1" in out  # SERVING
