"""An optional Prometheus scrape endpoint (``[telemetry] prometheus_listen``), per worker process.

The metrics are the OpenTelemetry ones (keybroker.adapters.metrics, keybroker.adapters.gauges),
read by the SDK's own Prometheus reader (opentelemetry-exporter-prometheus) and served as the
Prometheus text format on ``http://HOST:PORT/metrics`` by prometheus_client's small HTTP server,
in a thread of its own.

**Several worker processes**: each worker serves its own metrics on its own port, the configured
port plus its index (worker 0 on PORT, worker 1 on PORT + 1, …), and every series carries the
worker's ``service_instance_id`` and ``keybroker_worker`` labels (OpenTelemetry resource
attributes copied as labels). Why not one endpoint for all workers: the workers share nothing
(that is how they scale, docs/CONCURRENCY.md), so one endpoint would need a process that gathers
the others' metrics at each scrape, a hop that can stall or fail for all of them at once; with a
port each, a scrape costs one worker a few milliseconds of one thread, a stuck worker shows as
its own failed target (``up == 0``), and Prometheus sums series across workers with ``sum`` as
it does across replicas. Port 0 takes any free port for each worker (tests); the port is logged.

Each endpoint also serves the worker's process metrics (``process_*``: CPU, memory, open files)
and Python's (``python_gc_*``, ``python_info``), in a registry of its own. The endpoint has no
TLS and no authentication: it carries counts and timings only (never principals, recordings,
keys or tokens), but bind it to loopback or a network only the scraper reaches.
"""

from __future__ import annotations

import logging
import socket
import threading
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from keybroker.errors import ConfigurationError
from keybroker.settings import validate_listen

log = logging.getLogger(__name__)

KEY = "[telemetry] prometheus_listen"
#: Resource attributes copied onto every series as labels (dots become underscores).
LABELLED_RESOURCE_ATTRIBUTES = frozenset({"service.instance.id", "keybroker.worker"})


def worker_address(listen: str, worker: int) -> tuple[str, int]:
    """(host, port) worker ``worker`` serves on: the configured port plus the worker index (port
    0 stays 0: any free port)."""
    address = validate_listen(listen, KEY)
    if address is None:
        raise ConfigurationError(f"{KEY}: expected HOST:PORT (no unix socket)")
    host, port = address
    if port and port + worker > 65535:
        raise ConfigurationError(f"{KEY}: port {port} + worker {worker} is beyond 65535")
    return host, port + worker if port else 0


def check_ports(listen: str, processes: int) -> None:
    """Before the workers start: each one's port can be bound (a configuration error, exit 2,
    naming the first that cannot, rather than a worker failing after the others started)."""
    for worker in range(processes):
        host, port = worker_address(listen, worker)
        if not port:
            return  # any free port: nothing to check
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ConfigurationError(
                    f"{KEY}: cannot listen on {host}:{port} for worker {worker} "
                    f"({exc.strerror or exc}); worker N listens on the port plus N: choose a "
                    "port with enough free ports after it"
                ) from None


class PrometheusEndpoint:
    """The reader to add to the worker's MeterProvider, and the HTTP server that serves it."""

    def __init__(self, listen: str, worker: int) -> None:
        self.host, self._port = worker_address(listen, worker)
        self.worker = worker
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.reader = PrometheusMetricReader(
            scope_info_enabled=False,  # one meter, "keybroker": its name on every series is noise
            resource_attribute_filter=LABELLED_RESOURCE_ATTRIBUTES.__contains__,
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port served on (the one the system chose, for port 0), once started."""
        return self._port

    def start(self) -> int:
        """Listen and serve; a port that cannot be bound is a configuration error (exit 2)."""
        try:
            server, thread = start_http_server(self._port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(
                f"{KEY}: cannot listen on {self.host}:{self._port} for worker {self.worker} "
                f"({exc.strerror or exc}); worker N listens on the port plus N: choose a port "
                "with enough free ports after it"
            ) from None
        self._server, self._thread = server, thread
        self._port = int(server.server_address[1])
        log.info(
            "prometheus metrics on http://%s/metrics (worker %d)",
            f"[{self.host}]:{self._port}" if ":" in self.host else f"{self.host}:{self._port}",
            self.worker,
        )
        return self._port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
