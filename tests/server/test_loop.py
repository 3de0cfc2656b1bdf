"""The gRPC server loop (keybroker.server.loop) on its own: real mTLS, test handlers.

The broker's own behaviour through this server is covered by every other test in tests/server;
here are the server's contracts: inline calls are not held up by pool calls, deferred decision
records are durable before any reply of their turn leaves (one flush for many calls), a failed
flush fails the turn's calls closed, every failure is a precise status, streams work, and stop
honours the grace period.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import pytest

from keybroker.core.decision import Decision, Outcome
from keybroker.devenv import DevEnv
from keybroker.errors import JournalUnavailableError
from keybroker.server.guard import DeferredRecord
from keybroker.server.handlers import HandlerRegistry
from keybroker.server.loop import LoopContext, LoopOptions, LoopServer
from keybroker.server.status import REASON_METADATA
from tests.support.clients import channel

pytestmark = pytest.mark.loop_only(
    reason="LoopServer itself: inline calls, group commit per turn, the loop's own stop"
)


SERVICE = "test.Loop"


class Journal:
    """A durable recorder with group commit that remembers its flushes; can be made to fail."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.flushes: list[tuple[float, int]] = []  # (monotonic time, records)
        self.delay = delay
        self.fail = False
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._seq = self._durable = self._pending = 0

    def record(self, decision: Decision) -> None:
        self.record_many([decision])

    def record_many(self, decisions: Sequence[Decision]) -> None:
        self.flush(self.append_many(decisions))

    def append_many(self, decisions: Sequence[Decision]) -> int:
        with self._lock:
            self._seq += len(decisions)
            self._pending += len(decisions)
            return self._seq

    def flush(self, ticket: object) -> None:
        assert isinstance(ticket, int)
        with self._flush_lock:
            if ticket <= self._durable:
                return
            time.sleep(self.delay)
            with self._lock:
                head, count, self._pending = self._seq, self._pending, 0
            if self.fail:
                raise JournalUnavailableError
            self._durable = head
            self.flushes.append((time.monotonic(), count))


class Live:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)


class Service:
    def __init__(self) -> None:
        self.journal = Journal()
        self.live = Live()
        self.release = threading.Event()
        self.terminated = threading.Event()
        self.slow_returned = threading.Event()

    def fast(self, request: bytes, context: LoopContext) -> bytes:
        decision = Decision(service=SERVICE, operation="Fast", outcome=Outcome.ALLOW)
        if not context.defer(DeferredRecord(decision, self.journal, self.live)):
            self.journal.record(decision)
        return b"fast:" + request

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            self.release.wait(10)
            return b"slow"
        finally:
            self.slow_returned.set()

    def boom(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("secret-detail")

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(self.terminated.set)
        for i in range(int(request or b"3")):
            yield str(i).encode()
        if request == b"1000":
            self.release.wait(10)

    def echo(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield request[::-1]


def _parse_strict(data: bytes) -> bytes:
    if data.startswith(b"\xff"):
        raise ValueError("not a message")
    return data


def _start(devenv: DevEnv) -> tuple[Service, LoopServer, int]:
    svc = Service()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Fast": grpc.unary_unary_rpc_method_handler(svc.fast, request_deserializer=_parse_strict),
        "Slow": grpc.unary_unary_rpc_method_handler(svc.slow),
        "Boom": grpc.unary_unary_rpc_method_handler(svc.boom),
        "Count": grpc.unary_stream_rpc_method_handler(svc.count),
        "Echo": grpc.stream_stream_rpc_method_handler(svc.echo),
    }
    registry = HandlerRegistry()
    registry.add_registered_method_handlers(SERVICE, handlers)
    server = LoopServer(
        registry,
        inline=frozenset({f"/{SERVICE}/Fast", f"/{SERVICE}/Boom"}),
        options=LoopOptions(pool_threads=2),
    )
    creds = grpc.ssl_server_credentials(
        [(devenv.key("server").read_bytes(), devenv.cert("server").read_bytes())],
        root_certificates=devenv.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return svc, server, port


@pytest.fixture
def service(devenv: DevEnv) -> Iterator[tuple[Service, LoopServer, grpc.Channel]]:
    svc, server, port = _start(devenv)
    ch = channel(devenv, port)
    try:
        yield svc, server, ch
    finally:
        svc.release.set()
        ch.close()
        assert server.stop(None).wait(10)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def unary(ch: grpc.Channel, name: str) -> Any:
    return ch.unary_unary(f"/{SERVICE}/{name}", request_serializer=None, response_deserializer=None)


def unary_stream(ch: grpc.Channel, name: str) -> Any:
    return ch.unary_stream(
        f"/{SERVICE}/{name}", request_serializer=None, response_deserializer=None
    )


def test_inline_calls_are_answered_while_pool_calls_block(
    service: tuple[Service, LoopServer, grpc.Channel],
) -> None:
    svc, _server, ch = service
    with futures.ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(unary(ch, "Slow"), b"", timeout=20) for _ in range(2)]
        time.sleep(0.2)
        started = time.monotonic()
        for i in range(50):
            assert unary(ch, "Fast")(str(i).encode(), timeout=5) == f"fast:{i}".encode()
        assert time.monotonic() - started < 5
        assert not any(f.done() for f in slow)  # both pool threads really were busy
        svc.release.set()
        assert [f.result() for f in slow] == [b"slow", b"slow"]


def test_records_are_durable_before_replies_and_share_flushes(
    service: tuple[Service, LoopServer, grpc.Channel],
) -> None:
    svc, _server, ch = service
    svc.journal.delay = 0.05  # a slow disk: calls pile up behind each flush
    fast = unary(ch, "Fast")

    def call(i: int) -> float:
        fast(str(i).encode(), timeout=10)
        return time.monotonic()

    with futures.ThreadPoolExecutor(16) as pool:
        answered = list(pool.map(call, range(64)))
    records = [n for _, n in svc.journal.flushes]
    assert sum(records) == 64
    assert len(records) < 64 and max(records) > 1  # group commit
    # the k-th answer cannot come before the flush that made k records durable
    durable_at: list[float] = []
    for at, n in svc.journal.flushes:
        durable_at += [at] * n
    assert all(a >= d for a, d in zip(sorted(answered), durable_at, strict=True))
    assert eventually(lambda: len(svc.live.decisions) == 64)  # live, after the durable record


def test_a_failed_flush_fails_the_calls_closed(
    service: tuple[Service, LoopServer, grpc.Channel],
) -> None:
    svc, _server, ch = service
    svc.journal.fail = True
    with pytest.raises(grpc.RpcError) as info:
        unary(ch, "Fast").with_call(b"x", timeout=5)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert (REASON_METADATA, "journal_unavailable") in tuple(err.trailing_metadata())
    assert eventually(lambda: bool(svc.live.decisions))  # live recording follows the reply
    assert svc.live.decisions[-1].outcome == Outcome.ERROR
    svc.journal.fail = False
    assert unary(ch, "Fast")(b"y", timeout=5) == b"fast:y"  # and it recovers


@pytest.mark.parametrize(
    ("method", "request_bytes", "code"),
    [
        ("Nope", b"", grpc.StatusCode.UNIMPLEMENTED),
        ("Boom", b"", grpc.StatusCode.INTERNAL),
        ("Fast", b"\xff\x00", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_failures_are_precise_and_leak_nothing(
    service: tuple[Service, LoopServer, grpc.Channel],
    method: str,
    request_bytes: bytes,
    code: grpc.StatusCode,
) -> None:
    _svc, _server, ch = service
    with pytest.raises(grpc.RpcError) as info:
        unary(ch, method)(request_bytes, timeout=5)
    err: Any = info.value
    assert err.code() == code
    assert "secret" not in err.details()
    assert unary(ch, "Fast")(b"ok", timeout=5) == b"fast:ok"  # still serving


def test_streams(service: tuple[Service, LoopServer, grpc.Channel]) -> None:
    svc, _server, ch = service
    assert list(unary_stream(ch, "Count")(b"3", timeout=5)) == [b"0", b"1", b"2"]
    echo = ch.stream_stream(f"/{SERVICE}/Echo", request_serializer=None, response_deserializer=None)
    assert list(echo(iter([b"abc", b"de"]), timeout=5)) == [b"cba", b"ed"]
    # a client that cancels a stream ends it on the server (termination callbacks run)
    svc.terminated.clear()
    stream = unary_stream(ch, "Count")(b"1000", timeout=10)
    next(stream)
    stream.cancel()
    assert svc.terminated.wait(5)


def test_stop_waits_for_in_flight_calls_then_cancels_them(
    service: tuple[Service, LoopServer, grpc.Channel],
) -> None:
    _svc, server, ch = service
    with futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(unary(ch, "Slow"), b"", timeout=20)
        time.sleep(0.2)
        started = time.monotonic()
        assert server.stop(0.5).wait(5)
        elapsed = time.monotonic() - started
        assert 0.4 < elapsed < 3
        with pytest.raises(grpc.RpcError):
            slow.result(5)


def test_a_handler_that_outlives_its_server_leaves_its_call_alone(devenv: DevEnv) -> None:
    """A pool handler that returns after its server is stopped and gone must not touch its call:
    gRPC core aborts the whole process (seen once while writing these tests)."""
    svc, server, port = _start(devenv)
    with channel(devenv, port) as ch, futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(unary(ch, "Slow"), b"", timeout=20)
        time.sleep(0.2)
        assert server.stop(0.1).wait(5)  # cancelled, then abandoned after 1 s
        with pytest.raises(grpc.RpcError):
            call.result(5)
    del server
    gc.collect()  # the server object and its completion queue may be gone now
    svc.release.set()
    assert svc.slow_returned.wait(5)
    time.sleep(0.3)  # the pool thread has tried to finish its call by now; we are still here


def test_a_bug_in_the_loop_fails_calls_and_marks_the_server_failed(
    devenv: DevEnv, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If the loop itself raises, callers are cancelled rather than left hanging, and
    ``failed`` tells ``keybroker serve`` to exit (so a supervisor restarts the worker)."""

    def broken(self: LoopServer, tag: Any, event: Any, replies: Any) -> None:
        raise RuntimeError("bug in the loop")

    monkeypatch.setattr(LoopServer, "_dispatch", broken)
    _svc, server, port = _start(devenv)
    with channel(devenv, port) as ch, pytest.raises(grpc.RpcError) as info:
        unary(ch, "Fast")(b"x", timeout=10)
    err: Any = info.value
    assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert eventually(lambda: server.failed)
    assert "gRPC server loop failed" in caplog.text
    server.stop(None).wait(5)


def test_a_journal_bug_fails_the_call_closed_and_the_loop_keeps_serving(
    service: tuple[Service, LoopServer, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush that raises something unexpected is treated as a failed flush (UNAVAILABLE, no
    reply data), not a reason to stop sending replies."""
    svc, _server, ch = service

    def broken_flush(ticket: object) -> None:
        raise RuntimeError("bug in the journal")

    monkeypatch.setattr(svc.journal, "flush", broken_flush)
    with pytest.raises(grpc.RpcError) as info:
        unary(ch, "Fast")(b"x", timeout=5)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert (REASON_METADATA, "journal_unavailable") in tuple(err.trailing_metadata())
    monkeypatch.undo()
    assert unary(ch, "Fast")(b"y", timeout=5) == b"fast:y"


def test_a_failing_live_recorder_never_holds_a_reply(
    service: tuple[Service, LoopServer, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, _server, ch = service

    def broken_record(decision: Decision) -> None:
        raise RuntimeError("bug in a live recorder")

    monkeypatch.setattr(svc.live, "record", broken_record)
    assert unary(ch, "Fast")(b"x", timeout=5) == b"fast:x"
    assert unary(ch, "Fast")(b"y", timeout=5) == b"fast:y"
