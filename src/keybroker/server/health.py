"""Health: NOT_SERVING until every dependency (HSM, audit journal) is ready, and while any fails.

Each dependency signals changes itself (on a failed call or a recovery); a background monitor also
probes them every ``interval`` seconds, so health recovers even when no traffic arrives.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from grpc_health.v1 import health, health_pb2

from keybroker.errors import UnavailableError

log = logging.getLogger(__name__)


class Health:
    """Publishes the combined state of named dependencies to the gRPC health service."""

    def __init__(self, servicer: health.HealthServicer, services: Sequence[str]) -> None:
        self._servicer = servicer
        self._services = services
        self._state: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._followers: list[Callable[[bool], None]] = []
        self._failing: list[str] = []  # the dependencies that were down at the last publication

    def follow(self, follower: Callable[[bool], None]) -> None:
        """Also tell ``follower`` the combined state on every publication (the health port's
        readiness: keybroker.server.probes)."""
        with self._lock:
            self._followers.append(follower)

    def watch(self, name: str, healthy: bool) -> Callable[[bool], None]:
        """Register a dependency; returns the callback it calls on every change."""
        self._state[name] = healthy

        def changed(ok: bool) -> None:
            with self._lock:
                self._state[name] = ok
                self._publish()

        return changed

    def _publish(self) -> None:
        ok = all(self._state.values())
        failing = sorted(name for name, up in self._state.items() if not up)
        if failing != self._failing:
            if failing and "starting" not in failing:
                log.warning("health: NOT_SERVING (%s)", ", ".join(failing))
            elif self._failing and "starting" not in self._failing:
                log.info("health: SERVING again")
            self._failing = failing
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self._services):
            self._servicer.set(name, status)
        for follower in self._followers:
            follower(ok)

    def publish(self) -> None:
        with self._lock:
            self._publish()


class HealthMonitor:
    """Background thread running each probe every ``interval`` seconds."""

    def __init__(
        self,
        probes: Sequence[Callable[[], None]],
        interval: float,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        """``heartbeat`` is called after each probe (liveness: keybroker.server.probes)."""
        self._probes = probes
        self._interval = interval
        self._heartbeat = heartbeat or (lambda: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        self._heartbeat()
        while not self._stop.wait(self._interval):
            for probe in self._probes:
                try:
                    probe()
                except UnavailableError:
                    pass  # the dependency logged and signalled it
                except Exception:  # a monitor must never die silently
                    log.exception("health probe failed unexpectedly")
                self._heartbeat()
