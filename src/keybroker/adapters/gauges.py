"""Gauges of the broker's state, observed at each metrics collection (OTLP export or Prometheus
scrape), so an alert fires even while no call arrives:

========================================  =========================  ===============================
instrument                                kind, unit                 attributes
========================================  =========================  ===============================
``keybroker.hsm.healthy``                 gauge (1 or 0)             (none)
``keybroker.state.staleness``             gauge, ``s``               store: ``keys`` or ``privacy``
``keybroker.journal.backlog``             gauge, ``{record}``        (none)
``keybroker.journal.healthy``             gauge (1 or 0)             (none)
========================================  =========================  ===============================

- ``keybroker.hsm.healthy``: 1 while the worker's HSM connection is up (logged in, probe passing),
  0 while it is down (calls fail closed with UNAVAILABLE, health NOT_SERVING).
- ``keybroker.state.staleness``: seconds since the worker last read the key metadata (``keys``)
  or the erasure and hold state (``privacy``) from the store successfully. It stays below
  ``[state] refresh_interval`` plus a query's time while the store answers; above
  ``[state] max_staleness`` the worker refuses unwraps (fail closed).
- ``keybroker.journal.backlog``: decision records appended to the worker's journal but not yet
  durable (the group commit in progress and the one queued behind it); a backlog that stays up
  means the journal's disk is slow.
- ``keybroker.journal.healthy``: 1 while the journal can be written, 0 while it cannot (calls fail
  closed). Absent without a journal (``[audit] enabled = false``), like the backlog.

The journal's export lag (``keybroker.journal.export.lag``) is in keybroker.adapters.metrics.
Every value is read without a lock from a field its owner updates (a plain int, float or bool).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from opentelemetry import metrics

from keybroker import __version__

METER_NAME = "keybroker"


@dataclass(frozen=True)
class JournalState:
    """What the journal gauges read: records not yet durable, and whether it can be written."""

    backlog: Callable[[], int]
    healthy: Callable[[], bool]


class StateGauges:
    """Registers the gauges above on ``meter_provider``; the callables are read at collection."""

    def __init__(
        self,
        meter_provider: metrics.MeterProvider,
        *,
        hsm_healthy: Callable[[], bool],
        staleness: Mapping[str, Callable[[], float]],
        journal: JournalState | None = None,
    ) -> None:
        meter = meter_provider.get_meter(METER_NAME, __version__)
        self._hsm_healthy = hsm_healthy
        self._staleness = dict(staleness)
        self._journal = journal
        self._store_attrs = {store: {"store": store} for store in self._staleness}
        meter.create_observable_gauge(
            "keybroker.hsm.healthy",
            callbacks=[self._observe_hsm],
            description="1 while the HSM connection is up, 0 while it is down",
        )
        meter.create_observable_gauge(
            "keybroker.state.staleness",
            callbacks=[self._observe_staleness],
            unit="s",
            description="Seconds since the last successful read of the state store, by store",
        )
        if journal is not None:
            meter.create_observable_gauge(
                "keybroker.journal.backlog",
                callbacks=[self._observe_backlog],
                unit="{record}",
                description="Journal records appended but not yet durable",
            )
            meter.create_observable_gauge(
                "keybroker.journal.healthy",
                callbacks=[self._observe_journal_health],
                description="1 while the audit journal can be written, 0 while it cannot",
            )

    def _observe_hsm(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(1 if self._hsm_healthy() else 0)]

    def _observe_staleness(
        self, _options: metrics.CallbackOptions
    ) -> Iterable[metrics.Observation]:
        return [
            metrics.Observation(round(age(), 3), self._store_attrs[store])
            for store, age in self._staleness.items()
        ]

    def _observe_backlog(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        journal = self._journal
        return [] if journal is None else [metrics.Observation(max(0, journal.backlog()))]

    def _observe_journal_health(
        self, _options: metrics.CallbackOptions
    ) -> Iterable[metrics.Observation]:
        journal = self._journal
        return [] if journal is None else [metrics.Observation(1 if journal.healthy() else 0)]
