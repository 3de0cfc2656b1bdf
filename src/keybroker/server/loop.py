"""The gRPC server: the data plane runs on one thread per process, between completion-queue polls.

grpcio's stock server (``grpc.server``) gives every call to a thread pool: the polling thread and a
worker thread hand each call back and forth (new call, request message, reply), and on a small VM
those thread wake-ups and GIL hand-overs cost as much as the work (docs/PERFORMANCE.md). This
server polls gRPC core's completion queue on one thread and answers the data-plane methods
(``inline``) right there. Everything else — key administration, privacy calls that wait for
replicas, batch rewraps — goes to a small thread pool, so a slow call never holds up the data
plane. Streaming calls (reflection, health ``Watch``) hold a thread for as long as they are open,
so they get a pool of their own (``stream_threads``), admitted through a gate: at most
``streams_per_connection`` open per client connection and ``stream_queue`` waiting for a thread;
beyond, RESOURCE_EXHAUSTED at once. Idle watchers can thus never take the threads admin and
privacy calls need.

Group commit: a call answered inline hands its decision record to the loop instead of writing
it (see :class:`keybroker.server.guard.RecordDeferral`). When no more events are ready (or after
``max_turn`` calls), the loop writes the turn's records to the journal with one flush
(``fdatasync``), records the decisions live, and only then sends the replies; calls that arrive
meanwhile wait in gRPC core and make up the next turn. A record that cannot be made durable
turns its call into UNAVAILABLE: no data key leaves without its durable decision. Everything a
data-plane call needs thus happens on this one thread, gRPC core's socket I/O included
(:mod:`keybroker.server.grpc_settings`); other processes use the cores while one waits for the
disk. (Flushing on a thread of its own while the loop went on was tried and measured slower:
bench/NOTES.md, "2026-12-03: a commit thread".)

This module drives gRPC core through grpcio's Cython layer (``grpc._cython.cygrpc``), the calls
grpcio's own server makes, through one door: :mod:`keybroker.server.grpc_private` binds every
private name used here; pyproject.toml pins grpcio to the minor version it was written for.
TLS, HTTP/2, message-size limits and the auth context are gRPC core's, exactly as before.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeAlias

import grpc

from keybroker.server import grpc_private as cy
from keybroker.server.guard import (
    DeferredRecord,
    RecordDeferral,
    commit_deferred,
    record_live,
)
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
from keybroker.server.status import REASON_METADATA

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str | bytes], ...]
BatchStarter: TypeAlias = "Callable[[Any, tuple[Any, ...], Any], bool]"
_FLAGS = 0
_MALFORMED = MALFORMED
_ABANDON_AFTER = 1.0  # seconds a handler may still run after its call was cancelled at stop
LoopOptions = ServerOptions  # the name this module gave the options first
_IDLE_WAKE = 1.0  # seconds an idle loop waits for an event before it turns anyway (heartbeat)
_BEAT_INTERVAL = 0.25  # a turning loop beats at most this often (a beat costs ~0.4 µs)


class _Tag:
    """Completion-queue tags the loop tells apart by identity."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_NEW_CALL = _Tag("new call")
_FINISHED = _Tag("call finished")
_SHUTDOWN = _Tag("server shut down")


class _Aborted(Exception):
    """Raised by :meth:`LoopContext.abort`: the handler ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code.name)
        self.code = code
        self.details = details


class LoopContext(grpc.ServicerContext, RecordDeferral):
    """The ``ServicerContext`` of one call; deferring when the call runs inline."""

    def __init__(self, event: Any, *, deferring: bool, peer: str | None = None) -> None:
        self._call = event.call
        self._peer = peer
        self._metadata: Metadata = tuple(event.invocation_metadata or ())
        self._deadline: float = event.call_details.deadline
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] | None = []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: Metadata = ()
        self.deferred: list[DeferredRecord] | None = [] if deferring else None

    # -- record deferral (inline calls) ---------------------------------------------------------

    def defer(self, record: DeferredRecord) -> bool:
        if self.deferred is None:
            return False
        self.deferred.append(record)
        return True

    # -- what handlers read --------------------------------------------------------------------

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def peer(self) -> str:
        if self._peer is None:
            self._peer = bytes(self._call.peer()).decode("utf-8", "replace")
        return self._peer

    def auth_context(self) -> Mapping[str, Any]:  # name -> list of values
        auth = cy.auth_context(self._call) or {}
        return {bytes(k).decode("ascii", "replace") if isinstance(k, bytes) else k: v
                for k, v in auth.items()}  # fmt: skip

    def peer_identities(self) -> Sequence[bytes] | None:
        identities: Sequence[bytes] | None = cy.peer_identities(self._call)
        return identities

    def peer_identity_key(self) -> str | None:
        key = cy.peer_identity_key(self._call)
        return None if key is None else bytes(key).decode("ascii", "replace")

    def time_remaining(self) -> float:
        return max(self._deadline - time.time(), 0.0)

    def is_active(self) -> bool:
        with self._lock:
            return self._callbacks is not None

    # -- what handlers set ---------------------------------------------------------------------

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        if code == grpc.StatusCode.OK:  # an abort is never a success
            code, details = grpc.StatusCode.INTERNAL, "internal error"
        raise _Aborted(code, details)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.trailing = tuple(status.trailing_metadata or ())
        self.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self.trailing = tuple(trailing_metadata)

    def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        raise NotImplementedError("keybroker handlers send no initial metadata")

    def cancel(self) -> None:
        self._call.cancel()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._callbacks is None:
                return False
            self._callbacks.append(callback)
            return True

    def _terminated(self) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks or [], None
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("call termination callback failed")


@dataclass(slots=True)
class _Unary:
    """A unary call whose request message is on its way (the tag of that receive)."""

    event: Any
    handler: Handler
    inline: bool
    peer: str
    """Read when the call arrived: once gRPC core has failed a call (e.g. an oversized
    message), its peer reads empty."""


@dataclass(slots=True)
class _Reply:
    """An inline call's outcome, waiting for its turn's journal flush."""

    context: LoopContext
    code: grpc.StatusCode
    details: str
    response: bytes | None


def _final_ops(
    code: grpc.StatusCode, details: str, trailing: Metadata, response: bytes | None
) -> tuple[Any, ...]:
    ops: list[Any] = [cy.SendInitialMetadataOperation(None, _FLAGS)]
    if response is not None:
        ops.append(cy.SendMessageOperation(response, _FLAGS))
    ops.append(
        cy.SendStatusFromServerOperation(
            trailing or None, code.value[0], details.encode("utf-8"), _FLAGS
        )
    )
    ops.append(cy.ReceiveCloseOnServerOperation(_FLAGS))
    return tuple(ops)


def _run_unary(
    handler: Handler, request: bytes, context: LoopContext
) -> tuple[grpc.StatusCode, str, bytes | None]:
    """Run one unary-unary handler; every outcome becomes a status (never UNKNOWN)."""
    try:
        message = handler.request_deserializer(request) if handler.request_deserializer else request
    except Exception:  # noqa: BLE001 - a request that does not parse changes nothing
        return grpc.StatusCode.INVALID_ARGUMENT, _MALFORMED, None
    behaviour = handler.unary_unary
    if behaviour is None:
        log.error("not a unary-unary handler: %r", handler)
        return grpc.StatusCode.INTERNAL, "internal error", None
    try:
        response = behaviour(message, context)
    except _Aborted as aborted:
        return aborted.code, aborted.details, None
    except Exception:
        log.exception("unexpected error in a call handler")
        return grpc.StatusCode.INTERNAL, "internal error", None
    if context.code not in (None, grpc.StatusCode.OK):
        return context.code, context.details, None
    serialized = handler.response_serializer(response) if handler.response_serializer else response
    return grpc.StatusCode.OK, "", serialized


class _Closing:
    """Tag of a streaming call's close-on-server receive: the call has ended."""

    __slots__ = ("context",)

    def __init__(self, context: LoopContext) -> None:
        self.context = context


class _Stream:
    """A streaming call (reflection, health ``Watch``), run on a pool thread.

    The thread starts each receive and send itself and waits for its completion, which the loop
    thread routes back here by tag (the stream object itself)."""

    def __init__(self, event: Any, handler: Handler, start_batch: BatchStarter) -> None:
        self._call = event.call
        self._handler = handler
        self._start = start_batch
        self.context = LoopContext(event, deferring=False)
        self._completions: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sent_initial = False

    def on_event(self, event: Any) -> None:
        self._completions.put(event)

    def _batch(self, ops: tuple[Any, ...]) -> bool:
        if not self._start(self._call, ops, self):
            return False
        return bool(self._completions.get().success)

    def _requests(self) -> Iterator[Any]:
        while True:
            if not self._start(self._call, (cy.ReceiveMessageOperation(_FLAGS),), self):
                return
            event = self._completions.get()
            message = event.batch_operations[0].message() if event.success else None
            if message is None:
                return
            deserialize = self._handler.request_deserializer
            yield deserialize(message) if deserialize else message

    def _responses(self) -> Iterator[Any]:
        handler = self._handler
        if handler.request_streaming:
            if handler.stream_stream is None:
                raise TypeError("not a stream-stream handler")
            yield from handler.stream_stream(self._requests(), self.context)
            return
        request = next(self._requests(), None)
        if request is None:
            raise _Aborted(grpc.StatusCode.INVALID_ARGUMENT, ONE_REQUEST)
        if handler.unary_stream is None:
            raise TypeError("not a unary-stream handler")
        yield from handler.unary_stream(request, self.context)

    def run(self) -> None:
        self._start(self._call, (cy.ReceiveCloseOnServerOperation(_FLAGS),), _Closing(self.context))
        code, details = grpc.StatusCode.OK, ""
        try:
            serialize = self._handler.response_serializer
            for response in self._responses():
                ops: list[Any] = []
                if not self._sent_initial:
                    ops.append(cy.SendInitialMetadataOperation(None, _FLAGS))
                    self._sent_initial = True
                ops.append(cy.SendMessageOperation(
                    serialize(response) if serialize else response, _FLAGS
                ))  # fmt: skip
                if not self._batch(tuple(ops)):
                    break  # the client went away; the status below completes the call
            else:
                if self.context.code not in (None, grpc.StatusCode.OK):
                    code, details = self.context.code, self.context.details
        except _Aborted as aborted:
            code, details = aborted.code, aborted.details
        except Exception:
            log.exception("unexpected error in a streaming call")
            code, details = grpc.StatusCode.INTERNAL, "internal error"
        ops = [] if self._sent_initial else [cy.SendInitialMetadataOperation(None, _FLAGS)]
        ops.append(cy.SendStatusFromServerOperation(
            self.context.trailing or None, code.value[0], details.encode("utf-8"), _FLAGS
        ))  # fmt: skip
        self._start(self._call, tuple(ops), _FINISHED)


@dataclass
class _Stopping:
    grace_timer: threading.Timer | None = None
    done: threading.Event = field(default_factory=threading.Event)


class LoopServer:
    """A gRPC server: inline methods on the loop thread, the others on a thread pool."""

    engine = "loop"

    def __init__(
        self,
        handlers: HandlerRegistry,
        *,
        inline: frozenset[str],
        options: ServerOptions,
        refusals: RefusalLog | None = None,
        heartbeats: Callable[[str], Callable[[], None]] | None = None,
    ) -> None:
        """``refusals`` counts calls refused before any handler ran; the server starts and
        stops it (:mod:`keybroker.server.refusals`). ``heartbeats`` gives the heartbeat of a
        thread by name (``"server"``: the loop), called as it turns, at least every second while
        idle (liveness: :mod:`keybroker.server.probes`)."""
        unknown = sorted(m for m in inline if handlers.lookup(m) is None)
        if unknown:
            raise ValueError(f"inline methods without a handler: {unknown}")
        self._handlers = handlers
        self.refusals = refusals
        self._inline = inline
        self._options = options
        self._cq = cy.CompletionQueue()
        self._server = cy.Server(options.channel_options, False)
        self._server.register_completion_queue(self._cq)
        self._pool = futures.ThreadPoolExecutor(
            max_workers=options.pool_threads, thread_name_prefix="kb-call"
        )
        self._streams = futures.ThreadPoolExecutor(
            max_workers=options.stream_threads, thread_name_prefix="kb-stream"
        )
        self._stream_gate = StreamGate(options)
        beats = heartbeats or _no_heartbeats
        self._heartbeat = beats("server")
        self._thread = threading.Thread(target=self._run, name="kb-loop", daemon=True)
        self._in_flight = 0  # loop thread only
        self._stopping: _Stopping | None = None
        self._destroyed = False
        self._abandon_at: float | None = None
        self._lock = threading.Lock()
        self.failed = False
        """Set when the loop died of a bug: the process should exit (``keybroker serve`` does)."""

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        port: int = self._server.add_http2_port(
            address.encode("utf-8"),
            cy.core_credentials(credentials),
        )
        return port

    def add_insecure_port(self, address: str) -> int:
        """A plaintext port (the health probes' only: :mod:`keybroker.server.probes`)."""
        port: int = self._server.add_http2_port(address.encode("utf-8"), None)
        return port

    def start(self) -> None:
        self._server.start()
        self._server.request_call(self._cq, self._cq, _NEW_CALL)
        if self.refusals is not None:
            self.refusals.start()
        self._thread.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls; cancel those still running after ``grace`` seconds (now if None).
        The returned event is set once every call has ended and the loop has exited."""
        with self._lock:
            if self._stopping is not None:
                return self._stopping.done
            self._stopping = stopping = _Stopping()
        self._server.shutdown(self._cq, _SHUTDOWN)
        if grace:
            stopping.grace_timer = threading.Timer(grace, self._cancel_all)
            stopping.grace_timer.daemon = True
            stopping.grace_timer.start()
        else:
            self._cancel_all()
        return stopping.done

    def _start_batch(self, call: Any, ops: tuple[Any, ...], tag: Any) -> bool:
        """Start a batch from a pool thread; False once the server is gone (a handler that
        outlived shutdown must not touch its call: gRPC core aborts the process)."""
        with self._lock:
            if self._destroyed:
                return False
            call.start_server_batch(ops, tag)
            return True

    def _cancel_all(self) -> None:
        with self._lock:
            if not self._destroyed:
                self._server.cancel_all_calls()
                self._abandon_at = time.monotonic() + _ABANDON_AFTER

    def _fail_all(self) -> None:
        """After a bug in the loop: stop the server, cancel every call, and wait (bounded) for
        gRPC core to confirm, so that destroying the server afterwards is safe."""
        with self._lock:
            if self._stopping is None:
                self._stopping = _Stopping()
        try:
            self._server.shutdown(self._cq, _SHUTDOWN)
        except Exception:  # noqa: BLE001 - already shutting down
            log.debug("server already shutting down")
        self._cancel_all()
        give_up = time.monotonic() + 2.0
        while time.monotonic() < give_up:
            event = self._cq.poll(time.time() + 0.1)
            if event.completion_type != cy.CompletionType.queue_timeout and (
                event.tag is _SHUTDOWN
            ):
                return

    def _abandoned(self) -> bool:
        """After cancelling, handlers get a last moment to return before the loop exits."""
        return self._abandon_at is not None and time.monotonic() >= self._abandon_at

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        replies: list[_Reply] = []
        shut_down = False
        pulse = _Pulse(self._heartbeat)
        pulse()
        try:
            while not (shut_down and (self._in_flight == 0 or self._abandoned())):
                # replies waiting: only take what is ready; stopping: look at the clock now and
                # then; idle: wake up now and then, so that the heartbeat says the loop turns
                wait = 0.0 if replies else (0.1 if shut_down else _IDLE_WAKE)
                event = self._cq.poll(time.time() + wait)
                pulse()
                if event.completion_type == cy.CompletionType.queue_timeout:
                    self._end_turn(replies)
                    replies = []
                    continue
                tag = event.tag
                if tag is _SHUTDOWN:
                    shut_down = True
                else:
                    self._dispatch(tag, event, replies)
                if len(replies) >= self._options.max_turn:
                    self._end_turn(replies)
                    replies = []
            self._end_turn(replies)
            if self._in_flight:
                log.warning("stopped with %d calls whose handlers never returned", self._in_flight)
        except Exception:  # a bug here must not leave callers hanging
            log.exception("gRPC server loop failed; cancelling every call")
            self.failed = True
            self._fail_all()
        finally:
            with self._lock:
                self._destroyed = True
                self._server.destroy()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._streams.shutdown(wait=False, cancel_futures=True)
            if self.refusals is not None:
                self.refusals.stop()  # logs the last interval
            if self._stopping is not None:
                if self._stopping.grace_timer is not None:
                    self._stopping.grace_timer.cancel()
                self._stopping.done.set()

    def _end_turn(self, replies: list[_Reply]) -> None:
        """Group commit: make the turn's records durable (one flush per journal), then record
        them live and send the replies. A record that could not be made durable turns its
        call into UNAVAILABLE (see :func:`_send`)."""
        if not replies:
            return
        _commit_and_send(replies, _start_now)

    def _dispatch(self, tag: Any, event: Any, replies: list[_Reply]) -> None:
        if tag is _FINISHED:
            self._in_flight -= 1
        elif type(tag) is _Unary:
            self._received(tag, event, replies)
        elif tag is _NEW_CALL:
            self._new_call(event)
        elif type(tag) is _Stream:
            tag.on_event(event)
        elif type(tag) is _Closing:
            tag.context._terminated()  # the loop owns call lifetimes
        else:  # pragma: no cover
            log.error("unexpected completion-queue tag %r", tag)

    def _new_call(self, event: Any) -> None:
        if self._stopping is None:
            self._server.request_call(self._cq, self._cq, _NEW_CALL)
        if not event.success:
            return  # the server is shutting down
        self._in_flight += 1
        method = bytes(event.call_details.method).decode("utf-8", "replace")
        handler = self._handlers.lookup(method)
        if handler is None:
            self._refused(_peer_of(event.call), UNKNOWN_METHOD)
            event.call.start_server_batch(
                _final_ops(grpc.StatusCode.UNIMPLEMENTED, METHOD_NOT_FOUND, (), None),
                _FINISHED,
            )
        elif handler.request_streaming or handler.response_streaming:
            self._new_stream(event, handler)
        else:
            event.call.start_server_batch(
                (cy.ReceiveMessageOperation(_FLAGS),),
                _Unary(event, handler, method in self._inline, _peer_of(event.call)),
            )

    def _received(self, tag: _Unary, event: Any, replies: list[_Reply]) -> None:
        message = event.batch_operations[0].message() if event.success else None
        call = tag.event.call
        if message is None:
            self._refused(tag.peer, NO_MESSAGE)
            call.start_server_batch(
                _final_ops(grpc.StatusCode.INVALID_ARGUMENT, ONE_REQUEST, (),
                           None),
                _FINISHED,
            )  # fmt: skip
            return
        if tag.inline:
            context = LoopContext(tag.event, deferring=True, peer=tag.peer)
            code, details, response = _run_unary(tag.handler, message, context)
            if details is _MALFORMED:
                self._refused(tag.peer, MALFORMED_MESSAGE)
            replies.append(_Reply(context, code, details, response))
        else:
            self._pool.submit(_run_in_pool, tag, message, self._start_batch, self._refused)

    def _new_stream(self, event: Any, handler: Handler) -> None:
        peer = _peer_of(event.call)
        refusal = self._stream_gate.enter(peer)
        if refusal is not None:
            self._refused(peer, TOO_MANY_STREAMS)
            event.call.start_server_batch(
                _final_ops(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal, (), None), _FINISHED
            )
            return
        stream = _Stream(event, handler, self._start_batch)

        def run() -> None:
            try:
                stream.run()
            finally:
                self._stream_gate.leave(peer)

        self._streams.submit(run)

    def _refused(self, peer: str, kind: str) -> None:
        """Count a call refused before any handler (never fails the loop)."""
        if self.refusals is None:
            return
        try:
            self.refusals.note(peer, kind)
        except Exception:
            log.exception("counting a refused call failed")


def _no_heartbeat() -> None:
    pass


class _Pulse:
    """Calls a heartbeat at once, then at most every ``_BEAT_INTERVAL`` seconds (a beat costs
    more than a look at the clock)."""

    __slots__ = ("_beat", "_next")

    def __init__(self, beat: Callable[[], None]) -> None:
        self._beat = beat
        self._next = 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._beat()
            self._next = now + _BEAT_INTERVAL


def _no_heartbeats(_name: str) -> Callable[[], None]:
    return _no_heartbeat


def _peer_of(call: Any) -> str:
    return bytes(call.peer()).decode("utf-8", "replace")


def _run_in_pool(
    tag: _Unary, message: bytes, start_batch: BatchStarter, refused: Callable[[str, str], None]
) -> None:
    event = tag.event
    context = LoopContext(event, deferring=False, peer=tag.peer)
    code, details, response = _run_unary(tag.handler, message, context)
    if details is _MALFORMED:
        refused(tag.peer, MALFORMED_MESSAGE)
    start_batch(event.call, _final_ops(code, details, context.trailing, response), _FINISHED)


def _start_now(call: Any, ops: tuple[Any, ...], tag: Any) -> bool:
    """Start a batch on the loop thread (the server is alive while the loop runs)."""
    call.start_server_batch(ops, tag)
    return True


def _commit_and_send(replies: Sequence[_Reply], start_batch: BatchStarter) -> None:
    records = [r for reply in replies for r in reply.context.deferred or ()]
    commit_deferred(records)  # never raises: a failure fails its records closed
    record_live(records)  # as for any call: durable, then live, then the reply
    _send(replies, start_batch)


def _send(replies: Sequence[_Reply], start_batch: BatchStarter) -> None:
    """Send each reply, or UNAVAILABLE where its decision could not be made durable. One reply
    that cannot be sent (a bug, or a call gRPC core refuses) does not hold up the others."""
    for reply in replies:
        context = reply.context
        failed = next((r.error for r in context.deferred or () if r.error), None)
        if failed is not None:  # fail closed: nothing of this call leaves
            reply.code, reply.details, reply.response = (
                grpc.StatusCode.UNAVAILABLE, failed.message, None
            )  # fmt: skip
            context.trailing = ((REASON_METADATA, failed.reason),)
        try:
            start_batch(
                context._call,
                _final_ops(reply.code, reply.details, context.trailing, reply.response),
                _FINISHED,
            )
        except Exception:
            log.exception("sending a reply failed")
