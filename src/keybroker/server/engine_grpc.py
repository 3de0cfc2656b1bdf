"""The ``grpc`` engine (``[server] engine = "grpc"``): grpcio's public server API, same handlers.

The default engine, the server loop (:mod:`keybroker.server.loop`), drives gRPC core through
grpcio's private Cython layer and so ties keybroker to the grpcio minor version it was written
for. This engine runs the very same servicers on ``grpc.server`` — public, stable API only (it
never imports :mod:`keybroker.server.grpc_private`) — so a grpcio release with a security fix
can be taken the day it ships, whatever it changed inside. It is slower (every call is handed
from gRPC's polling thread to a pool thread and back: docs/PERFORMANCE.md, "Engines") and gives
the same answers:

* the same status codes, messages and ``keybroker-reason`` trailers: every call still runs
  through :class:`keybroker.server.guard.CallGuard`; a handler that fails unexpectedly ends
  with INTERNAL "internal error" here too (grpcio alone would answer UNKNOWN);
* the same decision records, durable before the reply: the guard writes each record from the
  pool thread that ran the call, and concurrent calls share one journal flush
  (:meth:`keybroker.adapters.journal.Journal.record`) instead of one flush per loop turn;
* the same refusals before any handler, counted per peer IP (:mod:`keybroker.server.refusals`):
  unknown methods, requests that do not parse, unary calls without their request message and
  streams over the limits. grpcio calls no application code for a call before its handler, so
  here each refusal is made by a wrapper at the start of the handler: unknown methods reach a
  catch-all handler, unary methods are registered as stream-unary so that a missing message is
  seen, and request parsing never raises into grpcio;
* the same stream limits: at most ``[limits] streams_per_connection`` per connection,
  ``stream_threads`` running and ``stream_queue`` waiting for one; beyond, RESOURCE_EXHAUSTED.
  grpcio has one thread pool, so a waiting stream waits on one of its threads (idle): the pool
  has ``threads + stream_threads + stream_queue`` threads, and streams never take the
  ``threads`` that other calls need.

Threads: every call runs on that pool, the data plane included. Processes, ``SO_REUSEPORT``, TLS,
message-size limits and graceful shutdown are gRPC's, configured exactly as for the loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc

from keybroker.server.handlers import (
    MALFORMED,
    METHOD_NOT_FOUND,
    ONE_REQUEST,
    Handler,
    HandlerRegistry,
    ServerOptions,
    StreamGate,
)
from keybroker.server.refusals import (
    MALFORMED_MESSAGE,
    NO_MESSAGE,
    TOO_MANY_STREAMS,
    UNKNOWN_METHOD,
    RefusalLog,
)

log = logging.getLogger(__name__)

R = TypeVar("R")
Context = grpc.ServicerContext
_INTERNAL = "internal error"
_BEAT_INTERVAL = 0.25  # seconds between liveness heartbeats (each a task on the call pool)
_SLOT_POLL = 0.5  # seconds between checks that a stream waiting for a thread is still wanted
_NOT_AN_ABORT = frozenset({None, grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN})


class _Malformed:
    """What the request deserializer returns for bytes that do not parse (never raises)."""

    __slots__ = ()


_MALFORMED_REQUEST = _Malformed()


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # noqa: BLE001 - refused by the handler wrapper, as on the loop
            return _MALFORMED_REQUEST

    return parse


def _fail(context: Context) -> NoReturn:
    """End the call after an exception from a handler: the status an abort set, else INTERNAL
    (grpcio would answer UNKNOWN, which keybroker never sends)."""
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    if code in _NOT_AN_ABORT:
        log.exception("unexpected error in a call handler")
        context.abort(grpc.StatusCode.INTERNAL, _INTERNAL)
    details: str | bytes | None = context.details()  # type: ignore[attr-defined]
    text = details.decode("utf-8", "replace") if isinstance(details, bytes) else details or ""
    assert code is not None  # noqa: S101 - _NOT_AN_ABORT holds None
    context.abort(code, text)


def _guarded(run: Callable[[], R], context: Context) -> R:
    try:
        return run()
    except Exception:  # noqa: BLE001 - every failure ends as a status, never UNKNOWN
        _fail(context)


class GrpcServer:
    """``grpc.server`` with keybroker's handlers, refusal counting and stream limits."""

    engine = "grpc"

    def __init__(
        self,
        handlers: HandlerRegistry,
        *,
        options: ServerOptions,
        refusals: RefusalLog | None = None,
        heartbeats: Callable[[str], Callable[[], None]] | None = None,
    ) -> None:
        """``heartbeats``: the liveness heartbeat ``"server"`` (keybroker.server.probes),
        beaten from a task run on the call pool every
        ``_BEAT_INTERVAL`` seconds, so they stop when no pool thread takes work any more."""
        self._handlers = handlers
        self._beats = [heartbeats("server")] if heartbeats is not None else []
        self._beating = threading.Event()
        self.refusals = refusals
        self.failed = False
        """Never set: this engine has no loop of its own to die (kept for the serve loop)."""
        self._gate = StreamGate(options)
        self._stream_slots = threading.BoundedSemaphore(options.stream_threads)
        self._pool = futures.ThreadPoolExecutor(
            # the calls' threads, the running streams' and the waiting streams' (idle)
            max_workers=options.pool_threads + options.stream_threads + options.stream_queue,
            thread_name_prefix="kb-grpc",
        )
        self._wrapped: dict[str, Handler] = {}
        self._unknown = grpc.stream_stream_rpc_method_handler(self._unknown_method)
        self._lock = threading.Lock()
        self._done: threading.Event | None = None
        self._server = grpc.server(
            self._pool,
            handlers=[_Dispatch(self.handler)],
            options=list(options.channel_options),
        )

    # -- the public server API -----------------------------------------------------------------

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, credentials)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def start(self) -> None:
        self._server.start()
        if self.refusals is not None:
            self.refusals.start()
        if self._beats:
            self._beat()  # before the port is announced: liveness never sees a beat missing
            threading.Thread(target=self._heartbeat, name="kb-grpc-beat", daemon=True).start()

    def _heartbeat(self) -> None:
        """Beat at once (a probe may ask as soon as the worker listens), then every interval;
        one beat task at a time, so a busy pool does not pile them up."""
        pending: futures.Future[None] | None = None
        while True:
            if pending is None or pending.done():
                try:
                    pending = self._pool.submit(self._beat)
                except RuntimeError:  # the pool is shut down
                    return
            if self._beating.wait(_BEAT_INTERVAL):
                return

    def _beat(self) -> None:
        for beat in self._beats:
            beat()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls; cancel those still running after ``grace`` seconds (now if None).
        The returned event is set once gRPC has stopped."""
        with self._lock:
            if self._done is not None:
                return self._done
            self._done = done = threading.Event()
        self._beating.set()
        stopped = self._server.stop(grace)

        def finish() -> None:
            stopped.wait()
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self.refusals is not None:
                self.refusals.stop()  # logs the last interval
            done.set()

        threading.Thread(target=finish, name="kb-grpc-stop", daemon=True).start()
        return done

    # -- handlers ------------------------------------------------------------------------------

    def handler(self, method: str) -> Handler:
        """The wrapped handler of ``method`` (the catch-all refusal for an unknown one)."""
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = self._handlers.lookup(method)
        if handler is None:
            return self._unknown  # not cached: unknown names are the caller's to choose
        wrapped = self._wrap(handler)
        with self._lock:
            return self._wrapped.setdefault(method, wrapped)

    def _wrap(self, handler: Handler) -> Handler:
        if handler.request_streaming or handler.response_streaming:
            return self._wrap_stream(handler)
        behaviour = handler.unary_unary
        if behaviour is None:
            raise TypeError(f"not a unary-unary handler: {handler!r}")

        def unary(requests: Iterator[Any], context: Context) -> Any:
            peer = context.peer()  # read first: once gRPC core fails a call, it reads empty
            request = self._one_request(requests, context, peer)
            if request is _MALFORMED_REQUEST:
                self._refused(peer, MALFORMED_MESSAGE)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
            return _guarded(lambda: behaviour(request, context), context)

        # stream-unary: grpcio would answer a missing request message itself (UNIMPLEMENTED)
        return grpc.stream_unary_rpc_method_handler(
            unary,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(self, handler: Handler) -> Handler:
        """Streams as on the loop: admitted through the gate, then run holding one of
        ``stream_threads`` slots (those admitted beyond wait for one, as in the loop's queue)."""
        behaviour: Any = handler.stream_stream or handler.unary_stream

        def stream(requests: Iterator[Any], context: Context) -> Iterator[Any]:
            peer = context.peer()
            self._admit(peer, context)
            while not self._stream_slots.acquire(timeout=_SLOT_POLL):
                if not context.is_active():
                    return  # gave up waiting: the client went away
            try:
                if handler.request_streaming:
                    responses = behaviour(requests, context)
                else:
                    responses = behaviour(self._one_request(requests, context, peer), context)
                yield from responses
            except grpc.RpcError:
                if context.is_active():  # not the client going away: a handler's own failure
                    _fail(context)
            except Exception:  # noqa: BLE001 - every failure ends as a status
                _fail(context)
            finally:
                self._stream_slots.release()

        # Never grpcio's non-blocking streaming (health Watch offers it): with grpcio's server,
        # HealthServicer.set waits for the send under the servicer's lock while the server's
        # polling thread, running a closed Watch's callback, waits for that lock (a deadlock seen
        # in this suite). Without it, Watch blocks a stream thread, exactly as on the loop.
        return grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- refusals ------------------------------------------------------------------------------

    def _one_request(self, requests: Iterator[Any], context: Context, peer: str) -> Any:
        """The call's one request message; INVALID_ARGUMENT when it never arrives (the client
        sent none, went away, or gRPC core refused it as too large: then the client already has
        RESOURCE_EXHAUSTED)."""
        try:
            return next(requests)
        except (StopIteration, grpc.RpcError):
            self._refused(peer, NO_MESSAGE)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, ONE_REQUEST)

    def _admit(self, peer: str, context: Context) -> None:
        """Admit a streaming call through the gate, or refuse it with RESOURCE_EXHAUSTED."""
        refusal = self._gate.enter(peer)
        if refusal is not None:
            self._refused(peer, TOO_MANY_STREAMS)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        if not context.add_callback(lambda: self._gate.leave(peer)):  # already over
            self._gate.leave(peer)

    def _unknown_method(self, _requests: Iterator[Any], context: Context) -> NoReturn:
        self._refused(context.peer(), UNKNOWN_METHOD)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, METHOD_NOT_FOUND)

    def _refused(self, peer: str, kind: str) -> None:
        """Count a call refused before its handler ran (never fails the call's status)."""
        if self.refusals is None:
            return
        try:
            self.refusals.note(peer, kind)
        except Exception:
            log.exception("counting a refused call failed")


class _Dispatch(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Every method through :meth:`GrpcServer.handler` (so unknown ones are counted too)."""

    def __init__(self, handler: Callable[[str], Handler]) -> None:
        self._handler = handler

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler:
        return self._handler(handler_call_details.method)
