"""``[server] engine``: which gRPC server runs the broker's services.

* ``"loop"`` (default): :class:`keybroker.server.loop.LoopServer`, the data plane answered on
  one thread per process through grpcio's private layer (fastest; grpcio pinned to one minor
  version).
* ``"grpc"``: :class:`keybroker.server.engine_grpc.GrpcServer`, grpcio's public server API (any
  grpcio release; slower: docs/PERFORMANCE.md, "Engines").

Each engine is imported only when chosen, so a broker on the ``grpc`` engine never loads the
private layer the loop needs (a grpcio release that moved it still serves).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import grpc

from keybroker.errors import ConfigurationError
from keybroker.server.handlers import HandlerRegistry, ServerOptions
from keybroker.server.refusals import RefusalLog

LOOP = "loop"
GRPC = "grpc"
ENGINES = (LOOP, GRPC)


class Engine(Protocol):
    """What the broker needs of a server engine."""

    @property
    def engine(self) -> str: ...

    refusals: RefusalLog | None
    failed: bool

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int: ...
    def add_insecure_port(self, address: str) -> int: ...
    def start(self) -> None: ...
    def stop(self, grace: float | None) -> threading.Event: ...


def create_engine(
    engine: str,
    handlers: HandlerRegistry,
    *,
    inline: frozenset[str],
    options: ServerOptions,
    refusals: RefusalLog | None,
    heartbeats: Callable[[str], Callable[[], None]] | None = None,
) -> Engine:
    """The server ``engine`` names; ``inline`` methods are answered on the loop thread (the
    ``loop`` engine; the ``grpc`` engine runs every call on its pool); ``heartbeats`` gives the
    liveness heartbeat ``"server"`` by name (keybroker.server.probes)."""
    if engine == LOOP:
        from keybroker.server.loop import LoopServer

        return LoopServer(
            handlers, inline=inline, options=options, refusals=refusals, heartbeats=heartbeats
        )
    if engine == GRPC:
        from keybroker.server.engine_grpc import GrpcServer

        return GrpcServer(handlers, options=options, refusals=refusals, heartbeats=heartbeats)
    raise ConfigurationError(f'[server] engine: expected "loop" or "grpc", got {engine!r}')
