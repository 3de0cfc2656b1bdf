"""Metrics: decision counts and latencies, HSM and journal timings, via the OpenTelemetry API.

:class:`DecisionMetrics` is a :class:`~keybroker.core.ports.DecisionRecorder` and also holds the
instruments other components call (:meth:`~DecisionMetrics.hsm_call`,
:meth:`~DecisionMetrics.journal_flush`, the export-lag gauge). :func:`configure_metrics` builds the
SDK MeterProvider at start-up, exporting over OTLP/gRPC when an endpoint is set.

Instruments (all attribute values have low cardinality: never recording ids, principals,
certificates or tokens):

========================================  =========================  ===============================
instrument                                kind, unit                 attributes
========================================  =========================  ===============================
``keybroker.decisions``                   counter, ``{decision}``    operation, outcome, reason
``keybroker.call.duration``               histogram, ``s``           operation, outcome
``keybroker.hsm.duration``                histogram, ``s``           operation
``keybroker.journal.flush.duration``      histogram, ``s``           (none)
``keybroker.journal.flush.records``       histogram, ``{record}``    (none)
``keybroker.journal.export.lag``          observable gauge           (none)
``keybroker.tls.certificate.expires_in``  observable gauge, ``s``    certificate
========================================  =========================  ===============================

``keybroker.tls.certificate.expires_in`` (:func:`observe_certificate_expiry`): seconds until a
certificate expires, negative once it has; ``certificate`` is ``server`` (the certificate the
broker serves) or ``client_ca`` (the first to expire of the client CA bundle).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from keybroker import __version__
from keybroker.core.decision import Decision

METER_NAME = "keybroker"

#: Bucket boundaries in seconds: 50 µs … 10 s (calls take 0.1 to 1 ms; HSM 10 to 100 µs).
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
RECORD_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

#: Returns the number of journal records not yet exported.
LagSource = Callable[[], int]


class DecisionMetrics:
    """Decision counter and latency histogram, plus HSM/journal instruments.

    ``meter_provider`` defaults to the global one. ``export_lag`` feeds the
    ``keybroker.journal.export.lag`` gauge; it can also be set later with
    :meth:`observe_export_lag` (the journal exporter starts after this object).
    """

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        export_lag: LagSource | None = None,
    ) -> None:
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(METER_NAME, __version__)
        self._decisions = meter.create_counter(
            "keybroker.decisions", unit="{decision}", description="Decisions, by outcome and reason"
        )
        self._duration = meter.create_histogram(
            "keybroker.call.duration",
            unit="s",
            description="Call duration, from the start of the call to its decision record",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self._hsm = meter.create_histogram(
            "keybroker.hsm.duration",
            unit="s",
            description="Duration of one HSM operation",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self._flush = meter.create_histogram(
            "keybroker.journal.flush.duration",
            unit="s",
            description="Duration of one journal flush (write and fsync of a group commit)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
        )
        self._flush_records = meter.create_histogram(
            "keybroker.journal.flush.records",
            unit="{record}",
            description="Records written by one journal flush",
            explicit_bucket_boundaries_advisory=RECORD_BUCKETS,
        )
        self._lag_source = export_lag
        meter.create_observable_gauge(
            "keybroker.journal.export.lag",
            callbacks=[self._observe_lag],
            unit="{record}",
            description="Journal records not yet exported over OTLP",
        )
        # Attribute dicts are reused per (operation, outcome, reason): a small, fixed set.
        self._count_attrs: dict[tuple[str, str, str], dict[str, str]] = {}
        self._duration_attrs: dict[tuple[str, str], dict[str, str]] = {}
        self._hsm_attrs: dict[str, dict[str, str]] = {}

    def record(self, decision: Decision) -> None:
        """Count the decision and, if it has both timestamps, record its duration."""
        outcome = decision.outcome.value
        key = (decision.operation, outcome, decision.reason)
        attrs = self._count_attrs.get(key)
        if attrs is None:
            attrs = {"operation": key[0], "outcome": outcome, "reason": key[2]}
            self._count_attrs[key] = attrs
        self._decisions.add(1, attrs)
        if decision.started_ns and decision.ended_ns >= decision.started_ns:
            dkey = (decision.operation, outcome)
            dattrs = self._duration_attrs.get(dkey)
            if dattrs is None:
                dattrs = self._duration_attrs[dkey] = {"operation": dkey[0], "outcome": outcome}
            self._duration.record((decision.ended_ns - decision.started_ns) / 1e9, dattrs)

    def hsm_call(self, duration_s: float, operation: str) -> None:
        """Record one HSM operation (``operation`` from a fixed set: encrypt, decrypt, random…)."""
        attrs = self._hsm_attrs.get(operation)
        if attrs is None:
            attrs = self._hsm_attrs[operation] = {"operation": operation}
        self._hsm.record(duration_s, attrs)

    def journal_flush(self, duration_s: float, records: int) -> None:
        """Record one journal flush: its duration and how many records it wrote."""
        self._flush.record(duration_s)
        self._flush_records.record(records)

    def observe_export_lag(self, source: LagSource | None) -> None:
        """Set (or clear) the callable that feeds ``keybroker.journal.export.lag``."""
        self._lag_source = source

    def _observe_lag(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        source = self._lag_source
        if source is None:
            return []
        return [metrics.Observation(source())]


#: Returns the seconds until each watched certificate expires, by name.
ExpirySource = Callable[[], Mapping[str, float]]


def observe_certificate_expiry(meter_provider: metrics.MeterProvider, source: ExpirySource) -> None:
    """Register the ``keybroker.tls.certificate.expires_in`` gauge, read from ``source`` (the
    files in use at each collection, so a renewed certificate shows at once)."""

    def observe(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [
            metrics.Observation(seconds, {"certificate": name})
            for name, seconds in source().items()
        ]

    meter_provider.get_meter(METER_NAME, __version__).create_observable_gauge(
        "keybroker.tls.certificate.expires_in",
        callbacks=[observe],
        unit="s",
        description="Seconds until the certificate expires (negative once it has)",
    )


def configure_metrics(
    endpoint: str,
    insecure: bool,
    timeout: float,
    resource: Resource | None = None,
    *,
    export_interval_s: float = 60.0,
    extra_readers: Iterable[MetricReader] = (),
) -> MeterProvider:
    """Build the SDK MeterProvider; with an ``endpoint``, export over OTLP/gRPC periodically.

    ``timeout`` (seconds) bounds each export, so flush and shutdown stay short while a collector is
    down. Without an endpoint the provider has only ``extra_readers`` (possibly none): instruments
    still work, and nothing leaves the process.
    """
    readers: list[MetricReader] = list(extra_readers)
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(endpoint=endpoint, insecure=insecure, timeout=timeout)
        readers.append(
            PeriodicExportingMetricReader(
                exporter,
                export_interval_millis=export_interval_s * 1000,
                export_timeout_millis=timeout * 1000,
            )
        )
    return MeterProvider(metric_readers=readers, resource=resource or Resource.create())
