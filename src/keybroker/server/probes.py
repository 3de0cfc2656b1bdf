"""The plaintext health port for kubelet probes (``[server] health_listen``).

kubelet's gRPC probe cannot present a client certificate, and the broker's own port wants one. So
``keybroker serve`` can listen on a second, plaintext port that serves ``grpc.health.v1.Health``
(``Check`` and ``Watch``) and nothing else: every other method gets UNIMPLEMENTED. It answers two
questions apart, so that an outage of a dependency takes a replica out of rotation without
restarting it:

- **readiness** (service ``"readiness"``, or ``""``): SERVING only while every worker process is
  ready, i.e. its HSM login, KEK self-tests, state store (erasure list) and audit journal are
  usable and it is not shutting down: the same state the mTLS health service publishes.
- **liveness** (service ``"liveness"``): SERVING while every loop of every worker turns: the
  server loop, the key catalog's background loop and the health monitor each record a heartbeat
  on every turn; a
  heartbeat older than ``[server] liveness_timeout`` (plus the loop's own
  interval) means a stuck process, which a restart cures. An unreachable HSM or database is no
  reason: those loops keep turning (each call to them has its own timeout).

Who answers: the supervisor process of ``keybroker serve``, never a worker. With a health port
configured the supervisor always spawns the workers (also when there is only one) and serves the
health port itself; the workers write their readiness and heartbeats into a small block of shared
memory (:class:`ProbeBoard`) that the supervisor reads on each probe. So a probe is never answered
by a process that also serves the data plane (gRPC core polls every socket of a process from
whichever thread waits on it: a second server's thread in a worker could take socket I/O of
data-plane connections off the server loop), and one probe speaks for every worker (with
``SO_REUSEPORT`` a per-worker listener would answer for a random one). docs/OPERATIONS.md says
the same for operators.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, MutableSequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker.server.engines import LOOP, Engine, create_engine
from keybroker.server.handlers import HandlerRegistry, ServerOptions
from keybroker.server.startup import bind_error

log = logging.getLogger(__name__)

READINESS = "readiness"
LIVENESS = "liveness"
#: The loops each worker reports a heartbeat for, in board order.
LOOPS = ("server", "catalog", "health-monitor")
_READY, _FIRST_BEAT = 0, 1
_SLOTS = _FIRST_BEAT + len(LOOPS)
_WATCH_INTERVAL = 1.0  # seconds between the checks a Watch stream makes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ProbeBoard:
    """Each worker's readiness and loop heartbeats (``time.monotonic()``, one clock for every
    process of the host), in shared memory from :meth:`shared` or in a list (one process).

    Single floats written by one thread each and read by the supervisor: no lock is needed."""

    def __init__(self, workers: int, cells: MutableSequence[float] | None = None) -> None:
        self.workers = workers
        self._cells: MutableSequence[float] = (
            cells if cells is not None else [0.0] * (workers * _SLOTS)
        )

    @classmethod
    def shared(cls, workers: int, ctx: Any) -> ProbeBoard:
        """A board in shared memory, for workers spawned from ``ctx`` (a multiprocessing
        context); pass :meth:`for_worker` views to them."""
        return cls(workers, ctx.RawArray("d", workers * _SLOTS))

    def for_worker(self, worker: int) -> WorkerProbe:
        if not 0 <= worker < self.workers:
            raise ValueError(f"no worker {worker} on a board of {self.workers}")
        return WorkerProbe(self._cells, worker * _SLOTS)

    # -- what the supervisor reads ---------------------------------------------------------------

    def ready(self) -> bool:
        return all(self._cells[w * _SLOTS + _READY] == 1.0 for w in range(self.workers))

    def stale(self, bound: float, now: float | None = None) -> list[str]:
        """``worker N: loop`` for every loop whose last turn is older than ``bound`` seconds
        (or that never turned); empty when every loop of every worker turns."""
        now = time.monotonic() if now is None else now
        found = []
        for w in range(self.workers):
            for i, loop in enumerate(LOOPS):
                beat = self._cells[w * _SLOTS + _FIRST_BEAT + i]
                if beat == 0.0 or now - beat > bound:
                    found.append(f"worker {w}: {loop}")
        return found


@dataclass(frozen=True)
class WorkerProbe:
    """One worker's cells of a :class:`ProbeBoard`: what the worker writes (picklable with
    its shared memory when handed to a spawned process)."""

    cells: MutableSequence[float]
    offset: int

    def set_ready(self, ready: bool) -> None:
        self.cells[self.offset + _READY] = 1.0 if ready else 0.0

    def heartbeat(self, loop: str) -> Callable[[], None]:
        """The callable ``loop`` calls on every turn."""
        index = self.offset + _FIRST_BEAT + LOOPS.index(loop)
        cells, clock = self.cells, time.monotonic

        def beat() -> None:
            cells[index] = clock()

        return beat


class ProbeServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped stubs
    """``grpc.health.v1.Health`` over a :class:`ProbeBoard`: readiness and liveness."""

    def __init__(self, board: ProbeBoard, liveness_bound: float) -> None:
        self._board = board
        self._bound = liveness_bound
        self._reported: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def status(self, service: str) -> Any:
        """SERVING or NOT_SERVING for ``service``; None for a service this port does not know."""
        if service in ("", READINESS):
            return SERVING if self._board.ready() else NOT_SERVING
        if service == LIVENESS:
            stale = tuple(self._board.stale(self._bound))
            self._log_change(stale)
            return NOT_SERVING if stale else SERVING
        return None

    def _log_change(self, stale: tuple[str, ...]) -> None:
        with self._lock:
            if stale == self._reported:
                return
            self._reported = stale
        if stale:
            log.error(
                "liveness: NOT_SERVING, no turn for over %.0f s: %s", self._bound, ", ".join(stale)
            )
        else:
            log.info("liveness: SERVING (every loop turns)")

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (checked every second) until the client leaves."""
        status = self.status(request.service)
        if status is None:  # the protocol: SERVICE_UNKNOWN, and keep watching
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        ended = threading.Event()
        context.add_callback(ended.set)
        sent = None
        while not ended.is_set():
            if status != sent:
                yield health_pb2.HealthCheckResponse(status=status)
                sent = status
            ended.wait(_WATCH_INTERVAL)
            status = self.status(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


CHECK_METHOD = "/grpc.health.v1.Health/Check"
PROBE_OPTIONS = ServerOptions(
    pool_threads=1,
    stream_threads=2,  # Watch streams: kubelet uses Check; a person may watch
    streams_per_connection=1,
    stream_queue=2,
    channel_options=(
        ("grpc.max_receive_message_length", 4096),  # a HealthCheckRequest is a service name
        ("grpc.so_reuseport", 0),  # nobody else may bind this port, least of all the broker
    ),
)


def probe_server(
    board: ProbeBoard, listen: str, liveness_bound: float, engine: str = LOOP
) -> tuple[Engine, int]:
    """A started plaintext server answering the health service and nothing else on ``listen``,
    and its port, on ``engine`` (``[server] engine``). A ConfigurationError when the address
    cannot be bound."""
    registry = HandlerRegistry()
    health_pb2_grpc.add_HealthServicer_to_server(ProbeServicer(board, liveness_bound), registry)
    server = create_engine(
        engine, registry, inline=frozenset({CHECK_METHOD}), options=PROBE_OPTIONS, refusals=None
    )
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0:
        raise bind_error(listen, key="health_listen", reuseport=False)
    server.start()
    log.info("health probes (plaintext, grpc.health.v1 only) on port %d", port)
    return server, port
