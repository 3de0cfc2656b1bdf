"""Alerting on suspicious decision patterns: a :class:`~keybroker.core.ports.DecisionRecorder`.

:class:`AlertDetector` sees every final decision (allow, deny or error) and runs four built-in
detectors over them:

``repeated_denials_principal`` / ``repeated_denials_cert``
    at least ``denial_count`` denials for one principal (``decision.subject``) or one client
    certificate (``decision.cert_thumbprint``) within ``denial_window_s`` seconds.
``unwrap_volume``
    a principal's allowed ``UnwrapDataKey`` calls in the current minute exceed
    ``max(volume_min, volume_factor * baseline)``, where the baseline is an exponentially weighted
    moving average of that principal's previous minutes, once it has ``volume_warmup`` minutes of
    history.
``tamper_burst_global`` / ``tamper_burst_principal``
    at least ``tamper_global_count`` (all callers together) or ``tamper_count`` (one principal)
    decisions with reason ``wrapped_key_invalid`` within ``tamper_window_s`` seconds: someone is
    feeding the broker altered wrapped keys.
``scheduled_key_use``
    a call that tried to use a key version scheduled for destruction: refused for that reason, or
    allowed while the injected ``is_scheduled_for_destruction(key_name, version)`` says so (a
    replica whose metadata was a moment behind).
``foreign_kek_object``
    an object under a ``kek:<name>:v<version>`` label on the HSM token fails the adoption checks
    (not an AES-256 key generated in the HSM, never extractable: e.g. one planted with a known
    value); the broker never uses it. Fed by the lifecycle's ``Reconcile`` event with reason
    ``hsm_object_rejected`` at start-up; once per key version per ``cooldown_s``.

Each alert fires at most once per (detector, subject) per ``cooldown_s``. An alert is a WARNING
log line on the ``keybroker.alerts`` logger, a span ``keybroker.alert/<detector>`` and one count on
the ``keybroker.alerts`` counter (attribute ``detector``). Alerts carry identifiers only (principal,
certificate thumbprint, key name and version): never key material, wrapped keys or tokens.

Cost: every call does O(1) work under one lock (bounded deques, dict look-ups); stale state is
swept at most once per ``sweep_interval_s``, which is O(tracked subjects) and so O(1) amortised.
Nothing does I/O unless an alert fires, and alerts are emitted after the lock is released.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry import metrics, trace

from keybroker import __version__
from keybroker.core.alerting import AlertThresholds, never_scheduled
from keybroker.core.decision import Decision, Outcome

log = logging.getLogger("keybroker.alerts")

INSTRUMENTATION_NAME = "keybroker.alerts"
UNWRAP_OPERATION = "UnwrapDataKey"
TAMPER_REASON = "wrapped_key_invalid"
GLOBAL_SUBJECT = "*"

REPEATED_DENIALS_PRINCIPAL = "repeated_denials_principal"
REPEATED_DENIALS_CERT = "repeated_denials_cert"
UNWRAP_VOLUME = "unwrap_volume"
TAMPER_BURST_GLOBAL = "tamper_burst_global"
TAMPER_BURST_PRINCIPAL = "tamper_burst_principal"
SCHEDULED_KEY_USE = "scheduled_key_use"
FOREIGN_KEK_OBJECT = "foreign_kek_object"
#: The reason of the lifecycle event for an object under a KEK label that is never used.
REJECTED_OBJECT_REASON = "hsm_object_rejected"
#: The decision reason of a call refused because its key version is scheduled for destruction.
SCHEDULED_VERSION_REFUSED = "key_version_scheduled_for_destruction"

DETECTORS = (
    REPEATED_DENIALS_PRINCIPAL,
    REPEATED_DENIALS_CERT,
    UNWRAP_VOLUME,
    TAMPER_BURST_GLOBAL,
    TAMPER_BURST_PRINCIPAL,
    SCHEDULED_KEY_USE,
    FOREIGN_KEK_OBJECT,
)

#: ``(key_name, version) -> bool``: is this key version scheduled for destruction?
ScheduledForDestruction = Callable[[str, int], bool]
#: A monotonic clock in seconds (``time.monotonic`` unless a test pins it).
MonotonicClock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Alert:
    """One fired alert, as emitted (and returned by :meth:`AlertDetector.record` callers' hooks)."""

    detector: str
    subject: str
    count: int
    window_s: float
    extra: dict[str, str | int] = field(default_factory=dict)


class _Window:
    """Sliding-window counter: fires once the last ``n`` events fall within ``window_s``.

    Keeps only the last ``n`` timestamps (a bounded deque), so each event is O(1).
    """

    __slots__ = ("_times", "_window")

    def __init__(self, n: int, window_s: float) -> None:
        self._times: deque[float] = deque(maxlen=n)
        self._window = window_s

    def add(self, now: float) -> int:
        """Add an event; return how many events fall in the window if it reached ``n``, else 0."""
        times = self._times
        times.append(now)
        if len(times) == times.maxlen and now - times[0] < self._window:
            return len(times)
        return 0

    def last(self) -> float:
        return self._times[-1]


@dataclass(slots=True)
class _Volume:
    """Per-principal unwrap volume: the current bucket and the EWMA of the previous ones."""

    bucket: int
    count: int = 0
    baseline: float = 0.0
    history: int = 0
    last_seen: float = 0.0


class AlertDetector:
    """Watches decisions and raises alerts; thread-safe, O(1) amortised per :meth:`record`.

    ``thresholds`` defaults to :class:`AlertThresholds` ``()``. ``is_scheduled_for_destruction``
    defaults to "never". ``clock`` is a monotonic clock in seconds (default ``time.monotonic``).
    ``tracer_provider`` and ``meter_provider`` default to the global OTel providers.
    ``on_alert`` is an optional extra hook called with each :class:`Alert` (outside the lock).
    """

    def __init__(
        self,
        thresholds: AlertThresholds | None = None,
        *,
        is_scheduled_for_destruction: ScheduledForDestruction = never_scheduled,
        clock: MonotonicClock = time.monotonic,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        on_alert: Callable[[Alert], object] | None = None,
    ) -> None:
        self.thresholds = t = thresholds or AlertThresholds()
        self._scheduled = is_scheduled_for_destruction
        self._clock = clock
        self._on_alert = on_alert
        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
            INSTRUMENTATION_NAME, __version__
        )
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(
            INSTRUMENTATION_NAME, __version__
        )
        self._counter = meter.create_counter(
            "keybroker.alerts", unit="{alert}", description="Alerts fired, by detector"
        )
        self._lock = threading.Lock()
        self._denials_principal: dict[str, _Window] = {}
        self._denials_cert: dict[str, _Window] = {}
        self._tamper_principal: dict[str, _Window] = {}
        self._tamper_global = _Window(t.tamper_global_count, t.tamper_window_s)
        self._volume: dict[str, _Volume] = {}
        self._fired: dict[tuple[str, str], float] = {}
        self._next_sweep = clock() + t.sweep_interval_s
        self._decay = 1.0 - t.volume_alpha

    # -- the hot path -------------------------------------------------------------------------

    def record(self, decision: Decision) -> None:
        """Feed one final decision to every detector; emit any alert that fires."""
        outcome = decision.outcome
        if outcome is Outcome.ERROR:
            if decision.reason == REJECTED_OBJECT_REASON:
                self._on_foreign_object(decision)
            return
        subject = decision.subject
        scheduled = decision.key_name is not None and (
            decision.reason == SCHEDULED_VERSION_REFUSED
            or (
                outcome is Outcome.ALLOW
                and decision.key_version is not None
                and self._is_scheduled(decision.key_name, decision.key_version)
            )
        )
        t = self.thresholds
        fired: list[Alert] | None = None
        with self._lock:
            now = self._clock()
            if outcome is Outcome.DENY:
                fired = self._on_deny(decision, subject, now)
            elif subject is not None and decision.operation == UNWRAP_OPERATION:
                fired = self._on_unwrap(subject, now)
            if scheduled:
                key = f"{decision.key_name}/{decision.key_version}"
                who = subject or GLOBAL_SUBJECT
                if self._cooled(SCHEDULED_KEY_USE, f"{who}\x00{key}", now):
                    alert = Alert(
                        SCHEDULED_KEY_USE,
                        who,
                        1,
                        0.0,
                        {
                            "keybroker.key.name": str(decision.key_name),
                            "keybroker.key.version": int(decision.key_version or 0),
                        },
                    )
                    fired = [*(fired or ()), alert]
            if now >= self._next_sweep:
                self._sweep(now)
                self._next_sweep = now + t.sweep_interval_s
        if fired:
            for alert in fired:
                self._emit(alert)

    def _on_foreign_object(self, decision: Decision) -> None:
        """An object under a KEK label failed the adoption checks (e.g. a key planted with a
        known value): one alert per key version and cooldown."""
        key = f"{decision.key_name}/{decision.key_version}"
        with self._lock:
            fire = self._cooled(FOREIGN_KEK_OBJECT, key, self._clock())
        if fire:
            extra: dict[str, str | int] = {
                "keybroker.key.name": str(decision.key_name),
                "keybroker.key.version": int(decision.key_version or 0),
            }
            self._emit(Alert(FOREIGN_KEK_OBJECT, GLOBAL_SUBJECT, 1, 0.0, extra))

    def _is_scheduled(self, key_name: str, version: int) -> bool:
        try:
            return self._scheduled(key_name, version)
        except Exception:  # the lifecycle oracle must never fail a call
            log.exception("key lifecycle check failed for %s/%d", key_name, version)
            return False

    def _on_deny(self, decision: Decision, subject: str | None, now: float) -> list[Alert] | None:
        t = self.thresholds
        fired: list[Alert] | None = None
        if subject is not None:
            n = _bump(self._denials_principal, subject, t.denial_count, t.denial_window_s, now)
            if n and self._cooled(REPEATED_DENIALS_PRINCIPAL, subject, now):
                fired = [Alert(REPEATED_DENIALS_PRINCIPAL, subject, n, t.denial_window_s)]
        thumb = decision.cert_thumbprint
        if thumb is not None:
            n = _bump(self._denials_cert, thumb, t.denial_count, t.denial_window_s, now)
            if n and self._cooled(REPEATED_DENIALS_CERT, thumb, now):
                fired = [*(fired or ()), Alert(REPEATED_DENIALS_CERT, thumb, n, t.denial_window_s)]
        if decision.reason == TAMPER_REASON:
            n = self._tamper_global.add(now)
            if n and self._cooled(TAMPER_BURST_GLOBAL, GLOBAL_SUBJECT, now):
                alert = Alert(TAMPER_BURST_GLOBAL, GLOBAL_SUBJECT, n, t.tamper_window_s)
                fired = [*(fired or ()), alert]
            if subject is not None:
                n = _bump(self._tamper_principal, subject, t.tamper_count, t.tamper_window_s, now)
                if n and self._cooled(TAMPER_BURST_PRINCIPAL, subject, now):
                    alert = Alert(TAMPER_BURST_PRINCIPAL, subject, n, t.tamper_window_s)
                    fired = [*(fired or ()), alert]
        return fired

    def _on_unwrap(self, subject: str, now: float) -> list[Alert] | None:
        t = self.thresholds
        bucket = int(now // t.volume_bucket_s)
        state = self._volume.get(subject)
        if state is None:
            state = self._volume[subject] = _Volume(bucket)
        elif bucket != state.bucket:
            # Fold the finished bucket into the baseline, then any empty buckets since.
            if state.history == 0:
                state.baseline = float(state.count)
            else:
                state.baseline = state.baseline * self._decay + state.count * t.volume_alpha
            gap = bucket - state.bucket - 1
            if gap > 0:
                state.baseline *= self._decay ** min(gap, 10_000)
            state.history += 1 + max(gap, 0)
            state.bucket = bucket
            state.count = 0
        state.count += 1
        state.last_seen = now
        if state.history < t.volume_warmup:
            return None
        limit = max(float(t.volume_min), t.volume_factor * state.baseline)
        if state.count > limit and self._cooled(UNWRAP_VOLUME, subject, now):
            extra: dict[str, str | int] = {"keybroker.alert.baseline": math.ceil(state.baseline)}
            return [Alert(UNWRAP_VOLUME, subject, state.count, t.volume_bucket_s, extra)]
        return None

    def _cooled(self, detector: str, subject: str, now: float) -> bool:
        """True (and start a cool-down) if (detector, subject) may fire now."""
        key = (detector, subject)
        last = self._fired.get(key)
        if last is not None and now - last < self.thresholds.cooldown_s:
            return False
        self._fired[key] = now
        return True

    def _sweep(self, now: float) -> None:
        """Drop state that can no longer contribute to an alert (bounds memory)."""
        t = self.thresholds
        for table, window in (
            (self._denials_principal, t.denial_window_s),
            (self._denials_cert, t.denial_window_s),
            (self._tamper_principal, t.tamper_window_s),
        ):
            stale = [k for k, w in table.items() if now - w.last() >= window]
            for k in stale:
                del table[k]
        stale_volume = [k for k, v in self._volume.items() if now - v.last_seen >= t.idle_expiry_s]
        for k in stale_volume:
            del self._volume[k]
        stale_fired = [key for key, at in self._fired.items() if now - at >= t.cooldown_s]
        for key in stale_fired:
            del self._fired[key]

    # -- emission (only when an alert fires) ----------------------------------------------------

    def _emit(self, alert: Alert) -> None:
        log.warning(
            "alert %s subject=%s count=%d window_s=%g%s",
            alert.detector,
            _printable(alert.subject),
            alert.count,
            alert.window_s,
            "".join(f" {k}={_printable(str(v))}" for k, v in alert.extra.items()),
        )
        attributes: dict[str, str | int | float] = {
            "keybroker.alert.detector": alert.detector,
            "keybroker.alert.subject": alert.subject,
            "keybroker.alert.count": alert.count,
            "keybroker.alert.window_s": alert.window_s,
        }
        attributes.update(alert.extra)
        try:
            self._tracer.start_span(
                f"keybroker.alert/{alert.detector}", attributes=attributes
            ).end()
            self._counter.add(1, {"detector": alert.detector})
            if self._on_alert is not None:
                self._on_alert(alert)
        except Exception:  # alerting is best-effort and must never fail the call
            log.exception("emitting alert %s failed", alert.detector)


def _bump(table: dict[str, _Window], key: str, n: int, window_s: float, now: float) -> int:
    w = table.get(key)
    if w is None:
        w = table[key] = _Window(n, window_s)
    return w.add(now)


def _printable(text: str) -> str:
    """Neutralise control characters so a subject cannot forge log lines."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
