"""What both server engines share: the method handlers, their options and the stream gate.

Public grpcio API only: the ``grpc`` engine (:mod:`keybroker.server.engine_grpc`) imports this
module and never :mod:`keybroker.server.grpc_private`, so it keeps working on a grpcio release
whose private layer the ``loop`` engine (:mod:`keybroker.server.loop`) does not know yet.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
GenericHandler: TypeAlias = "grpc.GenericRpcHandler[Any, Any]"
Metadata = tuple[tuple[str, str | bytes], ...]

MALFORMED = "malformed request message"
"""The status message of a request that does not parse (INVALID_ARGUMENT), on both engines."""
ONE_REQUEST = "one request message expected"
"""The status message of a unary call without its request message (INVALID_ARGUMENT)."""
METHOD_NOT_FOUND = "method not found"
"""The status message of a call to a method no service has (UNIMPLEMENTED)."""
TOO_MANY_STREAMS_IN_TOTAL = "too many streaming calls; retry later"
TOO_MANY_STREAMS_ON_CONNECTION = "too many streaming calls on this connection"


@dataclass(frozen=True)
class ServerOptions:
    """How an engine runs (see ``[server]`` and ``[limits]`` in docs/CONFIGURATION.md)."""

    pool_threads: int = 4
    max_turn: int = 64
    channel_options: tuple[tuple[str, Any], ...] = ()
    stream_threads: int = 4
    streams_per_connection: int = 4
    stream_queue: int = 16


class StreamGate:
    """Admits streaming calls: bounded per connection and in total (threads + queue)."""

    def __init__(self, options: ServerOptions) -> None:
        self._capacity = options.stream_threads + options.stream_queue
        self._per_connection = options.streams_per_connection
        self._lock = threading.Lock()
        self._open = 0
        self._by_peer: dict[str, int] = {}

    def enter(self, peer: str) -> str | None:
        """None when admitted (call :meth:`leave` when it ends), else why not."""
        with self._lock:
            if self._open >= self._capacity:
                return TOO_MANY_STREAMS_IN_TOTAL
            if self._by_peer.get(peer, 0) >= self._per_connection:
                return TOO_MANY_STREAMS_ON_CONNECTION
            self._open += 1
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
            return None

    def leave(self, peer: str) -> None:
        with self._lock:
            self._open -= 1
            left = self._by_peer.get(peer, 1) - 1
            if left:
                self._by_peer[peer] = left
            else:
                self._by_peer.pop(peer, None)


@dataclass(frozen=True, slots=True)
class _CallDetails(grpc.HandlerCallDetails):
    method: str
    invocation_metadata: Metadata


class HandlerRegistry:
    """Collects the method handlers that generated ``add_*_to_server`` functions register."""

    def __init__(self) -> None:
        self._registered: dict[str, Handler] = {}
        self._generic: list[GenericHandler] = []

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        for name, handler in handlers.items():
            self._registered[f"/{service}/{name}"] = handler

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[GenericHandler]) -> None:
        self._generic.extend(generic_handlers)

    def lookup(self, method: str) -> Handler | None:
        handler = self._registered.get(method)
        if handler is not None:
            return handler
        details = _CallDetails(method, ())
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None
