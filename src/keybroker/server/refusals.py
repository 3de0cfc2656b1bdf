"""Calls refused before any handler ran, counted per peer IP and logged once a minute.

A call to an unknown method, a streaming call beyond the stream limits, a request message that
does not parse, or a call that never delivers its request message (over ``[server]
max_message_bytes``: gRPC core refuses it with RESOURCE_EXHAUSTED before the server sees a
message; or a client that went away) is no decision about a key, so it makes no journal record.
It is still an access attempt: the server loop counts it here, per peer IP and kind, and every
``interval`` seconds one log line per IP says how many such calls came from it, of which kinds,
and in which interval (the access log with IP and time the requirements ask for, aggregated so
a flood cannot flood the log).

TLS handshake failures never reach Python (see docs/AUDIT.md, "What spans cannot record").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from keybroker.server.peer import peer_ip

log = logging.getLogger(__name__)

UNKNOWN_METHOD = "unknown_method"
MALFORMED_MESSAGE = "malformed_message"
NO_MESSAGE = "no_request_message"
"""The request message never arrived: larger than the limit (gRPC core refused it), or the
client cancelled or went away first. gRPC core does not tell the server which."""

TOO_MANY_STREAMS = "too_many_streams"
"""A streaming call over ``[limits] streams_per_connection`` or ``stream_queue``."""

#: IPs tracked per interval; beyond this, further IPs are counted under "other".
MAX_PEERS = 10_000


@dataclass(frozen=True, slots=True)
class RefusalSummary:
    """What one IP did in one interval."""

    ip: str
    kinds: dict[str, int]
    since: float
    until: float

    @property
    def total(self) -> int:
        return sum(self.kinds.values())


class RefusalLog:
    """Thread-safe counters, flushed to the log every ``interval`` seconds by a daemon thread."""

    def __init__(self, interval: float = 60.0, *, clock: Callable[[], float] = time.time) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}
        self._since = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.totals: Counter[tuple[str, str]] = Counter()
        """Everything counted since start, by (ip, kind): for tests and metrics."""

    def note(self, peer: str, kind: str) -> None:
        ip = peer_ip(peer)
        with self._lock:
            counts = self._counts.get(ip)
            if counts is None:
                if len(self._counts) >= MAX_PEERS:
                    ip = "other"
                counts = self._counts.setdefault(ip, Counter())
            counts[kind] += 1
            self.totals[ip, kind] += 1

    def flush(self) -> list[RefusalSummary]:
        """Log and reset the current interval's counts; returns what was logged."""
        now = self._clock()
        with self._lock:
            counts, self._counts = self._counts, {}
            since, self._since = self._since, now
        summaries = [RefusalSummary(ip, dict(c), since, now) for ip, c in sorted(counts.items())]
        for s in summaries:
            log.warning(
                "refused before any handler: %d calls from %s between %s and %s (%s)",
                s.total,
                s.ip,
                _iso(s.since),
                _iso(s.until),
                ", ".join(f"{kind} {n}" for kind, n in sorted(s.kinds.items())),
            )
        return summaries

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kb-refusals", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.flush()
            except Exception:  # a logger must never die silently
                log.exception("logging refused calls failed")


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
