"""Decision and component metrics, read back through an in-memory metric reader."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.resources import Resource

from keybroker.adapters.metrics import DecisionMetrics, configure_metrics
from keybroker.core.decision import Decision, Outcome

MS = 1_000_000


@pytest.fixture
def reader() -> InMemoryMetricReader:
    """A fresh in-memory reader."""
    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    """A MeterProvider reading into ``reader``, shut down after the test."""
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield provider
    provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    """The data points of one metric in the reader's current collection."""
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def by_attrs(found: list[Any]) -> dict[tuple[tuple[str, Any], ...], Any]:
    """Data points keyed by their sorted attributes."""
    return {tuple(sorted((p.attributes or {}).items())): p for p in found}


def decision(
    operation: str = "UnwrapDataKey",
    outcome: Outcome = Outcome.ALLOW,
    reason: str = "ok",
    duration_ms: int = 2,
) -> Decision:
    """A finished decision with identifiers that must not become metric attributes."""
    return Decision(
        service="keybroker.v1.KeyBroker",
        operation=operation,
        outcome=outcome,
        reason=reason,
        subject="alice",
        token_id="jti-1",
        cert_thumbprint="ab" * 32,
        recording_id="rec-1",
        started_ns=10_000 * MS,
        ended_ns=(10_000 + duration_ms) * MS,
    )


def test_decisions_are_counted_by_operation_outcome_and_reason(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Three allows and two denials of one reason give two counter points: 3 and 2."""
    m = DecisionMetrics(provider)
    for _ in range(3):
        m.record(decision())
    for _ in range(2):
        m.record(decision(outcome=Outcome.DENY, reason="permission_denied"))
    m.record(decision("WrapDataKey"))
    counts = {k: p.value for k, p in by_attrs(points(reader, "keybroker.decisions")).items()}
    assert counts == {
        (("operation", "UnwrapDataKey"), ("outcome", "allow"), ("reason", "ok")): 3,
        (
            ("operation", "UnwrapDataKey"),
            ("outcome", "deny"),
            ("reason", "permission_denied"),
        ): 2,
        (("operation", "WrapDataKey"), ("outcome", "allow"), ("reason", "ok")): 1,
    }


def test_call_duration_is_a_histogram_in_seconds(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Durations come from started_ns/ended_ns, in seconds, by operation and outcome."""
    m = DecisionMetrics(provider)
    m.record(decision(duration_ms=2))
    m.record(decision(duration_ms=4))
    m.record(decision(outcome=Outcome.DENY, reason="token_invalid", duration_ms=1))
    hist = by_attrs(points(reader, "keybroker.call.duration"))
    allow = hist[(("operation", "UnwrapDataKey"), ("outcome", "allow"))]
    assert isinstance(allow, HistogramDataPoint)
    assert allow.count == 2
    assert allow.sum == pytest.approx(0.006)
    assert allow.min == pytest.approx(0.002)
    assert allow.max == pytest.approx(0.004)
    assert 0.001 in allow.explicit_bounds  # second-scale buckets, not the SDK's ms defaults
    deny = hist[(("operation", "UnwrapDataKey"), ("outcome", "deny"))]
    assert deny.count == 1


def test_decisions_without_timestamps_are_counted_but_not_timed(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """A decision with no start time has no duration to record."""
    m = DecisionMetrics(provider)
    d = decision()
    d.started_ns = 0
    m.record(d)
    assert len(points(reader, "keybroker.decisions")) == 1
    assert points(reader, "keybroker.call.duration") == []


def test_metric_attributes_never_carry_identifiers(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """Only operation/outcome/reason: no principal, certificate, token or recording id."""
    m = DecisionMetrics(provider)
    m.record(decision())
    data = reader.get_metrics_data()
    text = data.to_json() if data is not None else ""
    for ident in ("alice", "ab" * 32, "jti-1", "rec-1"):
        assert ident not in text
    keys = {k for p in points(reader, "keybroker.decisions") for k in (p.attributes or {})}
    assert keys == {"operation", "outcome", "reason"}


def test_hsm_and_journal_instruments(provider: MeterProvider, reader: InMemoryMetricReader) -> None:
    """hsm_call and journal_flush feed their histograms."""
    m = DecisionMetrics(provider)
    m.hsm_call(0.00002, "decrypt")
    m.hsm_call(0.00004, "decrypt")
    m.hsm_call(0.00001, "random")
    m.journal_flush(0.003, 17)
    hsm = by_attrs(points(reader, "keybroker.hsm.duration"))
    assert hsm[(("operation", "decrypt"),)].count == 2
    assert hsm[(("operation", "decrypt"),)].sum == pytest.approx(0.00006)
    assert hsm[(("operation", "random"),)].count == 1
    [flush] = points(reader, "keybroker.journal.flush.duration")
    assert (flush.count, flush.sum) == (1, pytest.approx(0.003))
    [records] = points(reader, "keybroker.journal.flush.records")
    assert (records.count, records.sum) == (1, 17)


def test_export_lag_gauge_reads_its_source(
    provider: MeterProvider, reader: InMemoryMetricReader
) -> None:
    """The gauge reports the callable's value at collection; it can be set later or cleared."""
    lag = [42]
    m = DecisionMetrics(provider, export_lag=lambda: lag[0])
    [point] = points(reader, "keybroker.journal.export.lag")
    assert isinstance(point, NumberDataPoint)
    assert point.value == 42
    m.observe_export_lag(lambda: 7)
    assert [p.value for p in points(reader, "keybroker.journal.export.lag")] == [7]
    m.observe_export_lag(None)
    assert points(reader, "keybroker.journal.export.lag") == []


def test_configure_metrics_without_endpoint_exports_nothing() -> None:
    """No endpoint: a working MeterProvider with only the extra readers."""
    reader = InMemoryMetricReader()
    provider = configure_metrics(
        "", insecure=True, timeout=1.0, resource=Resource.create(), extra_readers=[reader]
    )
    try:
        DecisionMetrics(provider).record(decision())
        assert len(points(reader, "keybroker.decisions")) == 1
    finally:
        provider.shutdown()


def test_configure_metrics_with_endpoint_builds_an_otlp_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An endpoint adds a periodic OTLP/gRPC exporter with the given settings; shutdown is bounded."""
    from opentelemetry.exporter.otlp.proto.grpc import metric_exporter

    built: list[dict[str, Any]] = []

    class Spy(metric_exporter.OTLPMetricExporter):
        def __init__(self, **kwargs: Any) -> None:
            built.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(metric_exporter, "OTLPMetricExporter", Spy)
    provider = configure_metrics(
        "127.0.0.1:9", insecure=True, timeout=0.2, resource=Resource.create({"x": "y"})
    )
    started = time.monotonic()
    provider.shutdown(timeout_millis=2000)
    assert built == [{"endpoint": "127.0.0.1:9", "insecure": True, "timeout": 0.2}]
    assert time.monotonic() - started < 5
