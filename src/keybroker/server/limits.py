"""Per-caller limits: call rates on the data plane, and how many denials are journaled one by one.

**Call rates** (``[limits] certificate_rate`` / ``subject_rate``): a token bucket per client
certificate identity (checked before the token is verified, so a flood costs no signature checks)
and one per token ``sub`` (checked once the token verified). A call over either is refused with
RESOURCE_EXHAUSTED (reason ``rate_limited``) and recorded like any denial. Off by default.

**Denials** (``[limits] denials_per_minute``): the first ``denials_per_minute`` denials of each
client certificate and of each peer IP in a minute are journaled one by one. Beyond that, a denial
is counted into one aggregate record per certificate (or, without one, per IP) and minute —
"412 denials from X in the last minute, reasons …" — which a background thread journals when the
minute is over (and at shutdown). Every denial is thus in the journal exactly once: on its own
line, or counted in one aggregate (docs/AUDIT.md). The live counters (alerts, metrics) still see
every denial; spans follow the journal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from keybroker.core.decision import Decision, Outcome
from keybroker.errors import RateLimitedError
from keybroker.server.peer import peer_ip

log = logging.getLogger(__name__)

#: Callers tracked at once per limiter; beyond, the fullest buckets are forgotten first.
MAX_CALLERS = 100_000
AGGREGATE_SERVICE = "keybroker"
AGGREGATE_OPERATION = "DeniedCalls"
AGGREGATE_REASON = "denials_aggregated"


class TokenBuckets:
    """One token bucket per caller key: ``rate`` calls a second, bursts of ``burst``."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = max(burst, 1.0)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        """One call for ``key``: True if allowed."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            if len(self._buckets) >= MAX_CALLERS and key not in self._buckets:
                self._prune(now)
            self._buckets[key] = (tokens, now)
            return allowed

    def _prune(self, now: float) -> None:
        """Forget callers whose bucket is full again (indistinguishable from new ones)."""
        full = [
            k
            for k, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self._rate >= self._burst
        ]
        for k in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[k]


@dataclass(frozen=True)
class RateLimits:
    """The data plane's per-caller rates (None: that limit is off)."""

    per_certificate: TokenBuckets | None = None
    per_subject: TokenBuckets | None = None

    @classmethod
    def of(cls, certificate_rate: float, subject_rate: float, burst: float) -> RateLimits | None:
        """``burst`` is in seconds' worth of calls at each rate."""
        if certificate_rate <= 0 and subject_rate <= 0:
            return None
        return cls(
            TokenBuckets(certificate_rate, certificate_rate * burst)
            if certificate_rate > 0
            else None,
            TokenBuckets(subject_rate, subject_rate * burst) if subject_rate > 0 else None,
        )

    def check_certificate(self, identity: str) -> None:
        if self.per_certificate is not None and not self.per_certificate.take(identity):
            raise RateLimitedError("too many calls from this client certificate; slow down")

    def check_subject(self, subject: str) -> None:
        if self.per_subject is not None and not self.per_subject.take(subject):
            raise RateLimitedError("too many calls for this token subject; slow down")


@dataclass
class _Window:
    started: float
    certificate: str | None
    ip: str | None
    count: int = 0
    aggregated: Counter[str] = field(default_factory=Counter)
    first_ns: int = 0
    last_ns: int = 0


class DenialLimiter:
    """Decides which denials are journaled one by one; aggregates the rest (module docstring).

    ``emit(decision)`` writes an aggregate record durably (the journal, then live recorders); it
    is called from the limiter's own thread, never from a call."""

    def __init__(
        self,
        per_minute: int,
        emit: Callable[[Decision], None],
        *,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = per_minute
        self._emit = emit
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._ready: list[_Window] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def admit(self, decision: Decision) -> bool:
        """True: journal this denial on its own. False: it has been counted into an aggregate."""
        if decision.outcome is not Outcome.DENY:
            return True
        cert = decision.cert_thumbprint or decision.cert_identity
        ip = peer_ip(decision.peer_address) if decision.peer_address else None
        keys = [k for k in (f"cert:{cert}" if cert else None, f"ip:{ip}" if ip else None) if k]
        now = self._clock()
        with self._lock:
            windows = [self._current(key, now, decision, cert, ip) for key in keys]
            for w in windows:
                w.count += 1
            over = [w for w in windows if w.count > self._limit]
            if not over:
                return True
            target = over[0]  # the certificate's aggregate when both are over: one record only
            target.aggregated[f"{decision.operation}/{decision.reason}"] += 1
            ns = decision.ended_ns or time.time_ns()
            target.first_ns = target.first_ns or ns
            target.last_ns = ns
            return False

    def _current(
        self, key: str, now: float, decision: Decision, cert: str | None, ip: str | None
    ) -> _Window:
        w = self._windows.get(key)
        if w is not None and now - w.started < self._window:
            return w
        if w is not None and w.aggregated:
            self._ready.append(w)
        if w is None and len(self._windows) >= MAX_CALLERS:
            self._expire(now)
        is_cert = key.startswith("cert:")
        w = _Window(
            now,
            (decision.cert_identity or cert) if is_cert else None,
            None if is_cert else ip,
        )
        self._windows[key] = w
        return w

    def _expire(self, now: float) -> None:
        for key, w in list(self._windows.items()):
            if now - w.started >= self._window:
                del self._windows[key]
                if w.aggregated:
                    self._ready.append(w)

    def flush(self, *, everything: bool = False) -> list[Decision]:
        """Journal the aggregates whose minute is over (all of them with ``everything``)."""
        with self._lock:
            self._expire(float("inf") if everything else self._clock())
            ready, self._ready = self._ready, []
        records = [self._record(w) for w in ready]
        for record in records:
            try:
                self._emit(record)
            except Exception:  # the journal says why; the counts must not be dropped silently
                log.exception(
                    "an aggregate denial record could not be journaled: %s", record.reference
                )
        return records

    @staticmethod
    def _record(w: _Window) -> Decision:
        total = sum(w.aggregated.values())
        reasons: Counter[str] = Counter()
        for op_reason, n in w.aggregated.items():
            reasons[op_reason.partition("/")[2]] += n
        who = w.certificate or w.ip or "unknown"
        seconds = max(1, round((w.last_ns - w.first_ns) / 1e9))
        return Decision(
            service=AGGREGATE_SERVICE,
            operation=AGGREGATE_OPERATION,
            outcome=Outcome.DENY,
            reason=AGGREGATE_REASON,
            cert_identity=w.certificate,
            peer_address=w.ip,
            started_ns=w.first_ns,
            ended_ns=w.last_ns,
            reference=(
                f"{total} denials from {who} in {seconds} s beyond the per-minute threshold, "
                "reasons " + ", ".join(f"{r} {n}" for r, n in reasons.most_common())
            ),
            aggregated=dict(w.aggregated),
        )

    def start(self, interval: float = 1.0) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="kb-denials", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush(everything=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()
