"""The alert detectors: each fires at its threshold and not just under it; cool-down; threads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keybroker.adapters import alerts as al
from keybroker.adapters.alerts import Alert, AlertDetector
from keybroker.core.alerting import AlertThresholds, never_scheduled
from keybroker.core.decision import Decision, Outcome

SECRET_JTI = "jti-SECRET-7f3a"
SECRET_RECORDING = "rec-SECRET-91b2"
SECRET_CLIENT = "client-SECRET-55c1"
WRAPPED_KEY_B64 = "a2V5YnJva2VyLXdyYXBwZWQta2V5LVNFQ1JFVA=="


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    """A detector wired to in-memory span and metric sinks, with a pinned clock."""

    detector: AlertDetector
    clock: FakeClock
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    fired: list[Alert]

    def detectors(self) -> list[str]:
        """Detector names of the alerts fired so far, in order."""
        return [a.detector for a in self.fired]

    def alert_counts(self) -> dict[str, int]:
        """The ``keybroker.alerts`` counter, per ``detector`` attribute."""
        counts: dict[str, int] = {}
        data = self.reader.get_metrics_data()
        if data is None:
            return counts
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != "keybroker.alerts":
                        continue
                    for point in metric.data.data_points:
                        detector = str(point.attributes["detector"]) if point.attributes else ""
                        counts[detector] = int(getattr(point, "value", 0))
        return counts


def make(
    thresholds: AlertThresholds | None = None,
    scheduled: al.ScheduledForDestruction = never_scheduled,
) -> Iterator[Harness]:
    """Build a harness; shut the providers down afterwards."""
    clock = FakeClock()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    fired: list[Alert] = []
    detector = AlertDetector(
        thresholds,
        is_scheduled_for_destruction=scheduled,
        clock=clock,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        on_alert=fired.append,
    )
    yield Harness(detector, clock, spans, reader, fired)
    tracer_provider.shutdown()
    meter_provider.shutdown()


@pytest.fixture
def h() -> Iterator[Harness]:
    """Default thresholds except small counts, so scenarios stay short."""
    yield from make(
        AlertThresholds(
            denial_count=5,
            denial_window_s=60,
            tamper_count=3,
            tamper_global_count=4,
            tamper_window_s=30,
            cooldown_s=300,
        )
    )


def deny(
    subject: str | None = "alice",
    thumb: str | None = None,
    reason: str = "permission_denied",
    operation: str = "UnwrapDataKey",
) -> Decision:
    """A denied decision carrying identifiers that must never reach an alert."""
    return Decision(
        service="keybroker.v1.KeyBroker",
        operation=operation,
        outcome=Outcome.DENY,
        reason=reason,
        subject=subject,
        cert_thumbprint=thumb,
        token_id=SECRET_JTI,
        client_id=SECRET_CLIENT,
        recording_id=SECRET_RECORDING,
    )


def unwrap(subject: str = "alice", key_name: str = "recordings", key_version: int = 1) -> Decision:
    """An allowed UnwrapDataKey decision."""
    return Decision(
        service="keybroker.v1.KeyBroker",
        operation="UnwrapDataKey",
        outcome=Outcome.ALLOW,
        reason="ok",
        subject=subject,
        token_id=SECRET_JTI,
        recording_id=SECRET_RECORDING,
        key_name=key_name,
        key_version=key_version,
    )


# -- (a) repeated denials ---------------------------------------------------------------------


def test_denials_per_principal_fire_at_threshold(h: Harness) -> None:
    """Five denials of one principal within 60 s fire once, with count and window."""
    for _ in range(5):
        h.detector.record(deny("alice"))
        h.clock.advance(10)
    assert h.detectors() == [al.REPEATED_DENIALS_PRINCIPAL]
    alert = h.fired[0]
    assert (alert.subject, alert.count, alert.window_s) == ("alice", 5, 60)


def test_denials_per_principal_just_under_threshold(h: Harness) -> None:
    """Four denials, or five spread over more than the window, do not fire."""
    for _ in range(4):
        h.detector.record(deny("alice"))
    assert h.fired == []
    h.clock.advance(60)
    h.detector.record(deny("alice"))  # the first four are now outside the window
    assert h.fired == []


def test_denials_of_different_principals_do_not_add_up(h: Harness) -> None:
    """The per-principal count is per principal: four each for two principals fires nothing."""
    for _ in range(4):
        h.detector.record(deny("alice"))
        h.detector.record(deny("bob"))
    assert h.fired == []


def test_denials_per_certificate_fire_without_a_principal(h: Harness) -> None:
    """Token failures have no subject; the certificate thumbprint still accumulates."""
    for _ in range(5):
        h.detector.record(deny(None, thumb="ab" * 32, reason="token_invalid"))
    assert h.detectors() == [al.REPEATED_DENIALS_CERT]
    assert h.fired[0].subject == "ab" * 32


def test_denials_per_certificate_just_under_threshold(h: Harness) -> None:
    """Four denials of one certificate do not fire."""
    for _ in range(4):
        h.detector.record(deny(None, thumb="cd" * 32))
    assert h.fired == []


def test_allowed_and_error_calls_do_not_count_as_denials(h: Harness) -> None:
    """Only outcome deny counts; errors (HSM down) are not the caller's doing."""
    for _ in range(10):
        error = deny("alice", thumb="ef" * 32)
        error.outcome = Outcome.ERROR
        h.detector.record(error)
        h.detector.record(unwrap("alice"))
    assert h.fired == []


# -- (b) unwrap volume -------------------------------------------------------------------------

VOLUME = AlertThresholds(
    volume_bucket_s=60, volume_factor=5, volume_min=20, volume_warmup=3, volume_alpha=0.5
)


def warm_up(h: Harness, per_minute: int, minutes: int) -> None:
    """``minutes`` full minutes of ``per_minute`` unwraps by alice, then the start of the next."""
    h.clock.now = 60_000.0
    for _ in range(minutes):
        for _ in range(per_minute):
            h.detector.record(unwrap("alice"))
        h.clock.advance(60)


def test_unwrap_volume_far_above_baseline_fires() -> None:
    """Baseline 10/min, factor 5: the 51st unwrap in the current minute fires."""
    for h in make(VOLUME):
        warm_up(h, per_minute=10, minutes=3)
        for _ in range(51):
            h.detector.record(unwrap("alice"))
        assert h.detectors() == [al.UNWRAP_VOLUME]
        assert h.fired[0].count == 51
        assert h.fired[0].window_s == 60


def test_unwrap_volume_at_the_limit_does_not_fire() -> None:
    """Exactly factor times baseline (50) in the current minute does not fire."""
    for h in make(VOLUME):
        warm_up(h, per_minute=10, minutes=3)
        for _ in range(50):
            h.detector.record(unwrap("alice"))
        assert h.fired == []


def test_unwrap_volume_needs_the_minimum_volume() -> None:
    """A quiet principal (baseline 1/min) does not fire below volume_min (20)."""
    for h in make(VOLUME):
        warm_up(h, per_minute=1, minutes=3)
        for _ in range(20):
            h.detector.record(unwrap("alice"))
        assert h.fired == []
        h.detector.record(unwrap("alice"))
        assert h.detectors() == [al.UNWRAP_VOLUME]


def test_unwrap_volume_waits_for_warmup() -> None:
    """With only two minutes of history (warmup 3), even a huge minute does not fire."""
    for h in make(VOLUME):
        warm_up(h, per_minute=10, minutes=2)
        for _ in range(1000):
            h.detector.record(unwrap("alice"))
        assert h.fired == []


def test_unwrap_volume_baseline_is_per_principal() -> None:
    """Bob's heavy steady use does not raise alice's baseline, nor trigger on its own."""
    for h in make(VOLUME):
        h.clock.now = 60_000.0
        for _ in range(4):
            for _ in range(200):
                h.detector.record(unwrap("bob"))
            for _ in range(10):
                h.detector.record(unwrap("alice"))
            h.clock.advance(60)
        for _ in range(200):
            h.detector.record(unwrap("bob"))
        assert h.fired == []
        for _ in range(51):
            h.detector.record(unwrap("alice"))
        assert [(a.detector, a.subject) for a in h.fired] == [(al.UNWRAP_VOLUME, "alice")]


def test_idle_minutes_lower_the_baseline() -> None:
    """Empty minutes count as history with zero volume, so the baseline decays."""
    for h in make(VOLUME):
        warm_up(h, per_minute=100, minutes=3)  # baseline 100: limit 500
        h.clock.advance(60 * 10)  # ten idle minutes: baseline ~0.1, limit volume_min
        for _ in range(21):
            h.detector.record(unwrap("alice"))
        assert h.detectors() == [al.UNWRAP_VOLUME]


def test_denied_unwraps_and_other_operations_do_not_count_as_volume() -> None:
    """Only allowed UnwrapDataKey calls feed the volume detector."""
    for h in make(VOLUME):
        warm_up(h, per_minute=1, minutes=3)
        for _ in range(100):
            wrap = unwrap("alice")
            wrap.operation = "WrapDataKey"
            h.detector.record(wrap)
        assert al.UNWRAP_VOLUME not in h.detectors()


# -- (c) wrapped keys failing authentication ----------------------------------------------------


def test_tamper_burst_per_principal_fires(h: Harness) -> None:
    """Three wrapped_key_invalid of one principal within 30 s fire the per-principal detector."""
    for _ in range(3):
        h.detector.record(deny("mallory", reason="wrapped_key_invalid"))
        h.clock.advance(5)
    assert h.detectors() == [al.TAMPER_BURST_PRINCIPAL]
    assert h.fired[0].subject == "mallory"


def test_tamper_burst_per_principal_just_under_threshold(h: Harness) -> None:
    """Two in the window, or three spread over more than 30 s, do not fire."""
    for _ in range(3):
        h.detector.record(deny("mallory", reason="wrapped_key_invalid"))
        h.clock.advance(16)
    assert h.fired == []


def test_tamper_burst_global_fires_across_principals(h: Harness) -> None:
    """Four failures from four principals fire the global detector (subject "*")."""
    for who in ("a", "b", "c", "d"):
        h.detector.record(deny(who, reason="wrapped_key_invalid"))
    assert h.detectors() == [al.TAMPER_BURST_GLOBAL]
    assert h.fired[0].subject == al.GLOBAL_SUBJECT


def test_tamper_burst_global_just_under_threshold(h: Harness) -> None:
    """Three failures from three principals fire nothing."""
    for who in ("a", "b", "c"):
        h.detector.record(deny(who, reason="wrapped_key_invalid"))
    assert h.fired == []


# -- (d) key versions scheduled for destruction -------------------------------------------------


def doomed(key_name: str, version: int) -> bool:
    """recordings/1 is scheduled for destruction."""
    return (key_name, version) == ("recordings", 1)


def test_allow_with_a_version_scheduled_for_destruction_fires() -> None:
    """An allowed unwrap under recordings/1 fires, naming the key version."""
    for h in make(scheduled=doomed):
        h.detector.record(unwrap("alice", key_version=1))
        assert h.detectors() == [al.SCHEDULED_KEY_USE]
        alert = h.fired[0]
        assert alert.subject == "alice"
        assert alert.extra == {"keybroker.key.name": "recordings", "keybroker.key.version": 1}


def test_other_versions_and_other_denials_do_not_fire() -> None:
    """recordings/2 is fine; a call under recordings/1 denied for another reason used nothing."""
    for h in make(scheduled=doomed):
        h.detector.record(unwrap("alice", key_version=2))
        denied = unwrap("alice", key_version=1)
        denied.outcome = Outcome.DENY
        denied.reason = "purpose_not_bound"
        h.detector.record(denied)
        assert h.fired == []


def test_a_call_refused_because_its_version_is_scheduled_fires() -> None:
    """The broker refuses such a version; the attempt itself is what the alert is about."""
    for h in make():  # the refusal reason is enough: no oracle needed
        refused = unwrap("alice", key_version=1)
        refused.outcome = Outcome.DENY
        refused.reason = al.SCHEDULED_VERSION_REFUSED
        h.detector.record(refused)
        assert h.detectors() == [al.SCHEDULED_KEY_USE]


def test_default_oracle_never_fires() -> None:
    """Without a lifecycle oracle no version is scheduled for destruction."""
    for h in make():
        h.detector.record(unwrap("alice", key_version=1))
        assert h.fired == []


def test_a_failing_oracle_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    """The lifecycle callable raising is logged and treated as "not scheduled"."""

    def broken(key_name: str, version: int) -> bool:
        raise RuntimeError("lifecycle store down")

    for h in make(scheduled=broken):
        with caplog.at_level(logging.ERROR, logger="keybroker.alerts"):
            h.detector.record(unwrap("alice"))
        assert h.fired == []
        assert "lifecycle check failed" in caplog.text


# -- cool-down, emission, threads ---------------------------------------------------------------


def test_cooldown_limits_each_detector_and_subject_to_one_alert(h: Harness) -> None:
    """Within 300 s further denials do not re-fire; another subject still can; then it re-arms."""
    for _ in range(20):
        h.detector.record(deny("alice"))
    assert h.detectors() == [al.REPEATED_DENIALS_PRINCIPAL]
    for _ in range(5):
        h.detector.record(deny("bob"))
    assert [a.subject for a in h.fired] == ["alice", "bob"]
    h.clock.advance(299)
    for _ in range(5):
        h.detector.record(deny("alice"))
    assert len(h.fired) == 2
    h.clock.advance(1)
    h.detector.record(deny("alice"))  # the window holds five recent denials again
    assert [a.subject for a in h.fired] == ["alice", "bob", "alice"]


def test_scheduled_key_cooldown_is_per_key_version() -> None:
    """Repeated use of one doomed version alerts once; a second doomed version alerts too."""
    for h in make(scheduled=lambda name, version: version < 3):
        for _ in range(10):
            h.detector.record(unwrap("alice", key_version=1))
        h.detector.record(unwrap("alice", key_version=2))
        assert [a.extra["keybroker.key.version"] for a in h.fired] == [1, 2]


def test_alert_is_a_log_line_a_span_and_a_count(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """One alert: a WARNING on keybroker.alerts, a span with the documented attributes, count 1."""
    with caplog.at_level(logging.WARNING, logger="keybroker.alerts"):
        for _ in range(5):
            h.detector.record(deny("alice"))
    [record] = [r for r in caplog.records if r.name == "keybroker.alerts"]
    assert record.levelno == logging.WARNING
    assert al.REPEATED_DENIALS_PRINCIPAL in record.getMessage()
    assert "alice" in record.getMessage()
    [span] = h.spans.get_finished_spans()
    assert span.name == f"keybroker.alert/{al.REPEATED_DENIALS_PRINCIPAL}"
    assert dict(span.attributes or {}) == {
        "keybroker.alert.detector": al.REPEATED_DENIALS_PRINCIPAL,
        "keybroker.alert.subject": "alice",
        "keybroker.alert.count": 5,
        "keybroker.alert.window_s": 60.0,
    }
    assert h.alert_counts() == {al.REPEATED_DENIALS_PRINCIPAL: 1}


def test_alerts_carry_no_token_wrapped_key_or_recording_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every detector fires; no log line, span or metric mentions a token, wrapped key or recording."""
    thresholds = AlertThresholds(
        denial_count=2,
        tamper_count=2,
        tamper_global_count=2,
        volume_min=1,
        volume_warmup=1,
        volume_factor=1,
    )
    for h in make(thresholds, scheduled=doomed):
        with caplog.at_level(logging.DEBUG, logger="keybroker.alerts"):
            for _ in range(2):
                h.detector.record(deny("alice", thumb="ab" * 32, reason="wrapped_key_invalid"))
            h.clock.now = 60_000.0
            h.detector.record(unwrap("alice"))
            h.clock.advance(60)
            for _ in range(3):
                h.detector.record(unwrap("alice"))
            h.detector.record(
                Decision(
                    service="keybroker.v1.KeyAdmin",
                    operation="Reconcile",
                    outcome=Outcome.ERROR,
                    reason="hsm_object_rejected",
                    key_name="recordings",
                    key_version=99,
                    recording_id=SECRET_RECORDING,
                )
            )
        assert set(h.detectors()) == set(al.DETECTORS)
        spans = h.spans.get_finished_spans()
        assert len(spans) == len(al.DETECTORS)
        emitted = [caplog.text, repr(h.reader.get_metrics_data())]
        emitted += [f"{s.name} {dict(s.attributes or {})}" for s in spans]
        for text in emitted:
            for secret in (SECRET_JTI, SECRET_RECORDING, SECRET_CLIENT, WRAPPED_KEY_B64):
                assert secret not in text


def test_control_characters_in_a_subject_cannot_forge_log_lines(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A subject with a newline is escaped in the log line."""
    with caplog.at_level(logging.WARNING, logger="keybroker.alerts"):
        for _ in range(5):
            h.detector.record(deny("eve\nalert forged"))
    assert "\n" not in caplog.records[-1].getMessage()


def test_threads_recording_at_once(h: Harness) -> None:
    """Eight threads of 2,000 decisions: no error, and each subject fires exactly once."""
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            start.wait()
            for _ in range(1000):
                h.detector.record(deny(f"p{i}", thumb="shared" * 8))
                h.detector.record(unwrap(f"p{i}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(a.subject for a in h.fired if a.detector == al.REPEATED_DENIALS_PRINCIPAL) == [
        f"p{i}" for i in range(8)
    ]
    assert [a.detector for a in h.fired].count(al.REPEATED_DENIALS_CERT) == 1
    assert h.alert_counts() == {al.REPEATED_DENIALS_PRINCIPAL: 8, al.REPEATED_DENIALS_CERT: 1}


def test_stale_state_is_swept(h: Harness) -> None:
    """After the sweep interval, per-subject state of quiet subjects is dropped."""
    for i in range(100):
        h.detector.record(deny(f"p{i}", thumb=f"{i:064x}"))
    assert len(h.detector._denials_principal) == 100
    h.clock.advance(400)  # past the window, the cool-down and the sweep interval
    h.detector.record(deny("late"))
    assert list(h.detector._denials_principal) == ["late"]
    assert h.detector._denials_cert == {}


@pytest.mark.parametrize(
    "bad",
    [
        {"denial_count": 0},
        {"tamper_window_s": 0},
        {"volume_alpha": 0},
        {"volume_alpha": 1.5},
        {"cooldown_s": -1},
        {"volume_warmup": -1},
    ],
)
def test_thresholds_are_validated(bad: dict[str, float]) -> None:
    """Nonsensical thresholds are rejected at construction."""
    with pytest.raises(ValueError, match="must"):
        AlertThresholds(**bad)  # type: ignore[arg-type]


def test_a_rejected_hsm_object_alerts_once_per_key_version(h: Harness) -> None:
    """The lifecycle's Reconcile event for an object that failed the adoption checks (an error
    decision, reason hsm_object_rejected) fires foreign_kek_object, once per version."""

    def rejected(version: int) -> Decision:
        return Decision(
            service="keybroker.v1.KeyAdmin",
            operation="Reconcile",
            outcome=Outcome.ERROR,
            reason="hsm_object_rejected",
            subject="keybroker:scheduler",
            key_name="recordings",
            key_version=version,
        )

    for _ in range(3):
        h.detector.record(rejected(99))
    h.detector.record(rejected(98))
    assert [(a.detector, a.extra["keybroker.key.version"]) for a in h.fired] == [
        (al.FOREIGN_KEK_OBJECT, 99),
        (al.FOREIGN_KEK_OBJECT, 98),
    ]
    h.detector.record(
        Decision(
            service="keybroker.v1.KeyAdmin",
            operation="Reconcile",
            outcome=Outcome.ERROR,
            reason="hsm_object_missing",
            subject="keybroker:scheduler",
            key_name="recordings",
            key_version=97,
        )
    )
    assert len(h.fired) == 2  # other errors alert nothing
