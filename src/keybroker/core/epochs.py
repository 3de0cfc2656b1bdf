"""Retention epochs: which epoch a retention date falls in, the names of epoch and hold keys,
and the budget for creating epoch keys. A leaf of the core: the data plane
(:mod:`keybroker.core.broker`), key administration and the shredder
(:mod:`keybroker.core.retention`) all build on it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from dataclasses import dataclass

from keybroker.core.ports import Clock
from keybroker.errors import ConfigurationError, UnavailableError

log = logging.getLogger("keybroker.core.retention")

MONTH = "month"
HOLD_SUFFIX = ".hold"
_EPOCH_RE = re.compile(r"(?P<base>.+)\.e(?P<label>\d{4}-\d{2}|\d{8})")


@dataclass(frozen=True, slots=True)
class Epoch:
    label: str
    start: float
    end: float
    """First instant after the epoch (Unix seconds)."""


@dataclass(frozen=True, slots=True)
class EpochScheme:
    """``period`` is ``"month"`` (calendar months, UTC) or a number of seconds (aligned to the
    Unix epoch, labelled by their first day)."""

    period: str | int = MONTH
    grace: int = 7 * 86400

    def __post_init__(self) -> None:
        if self.period != MONTH and not (isinstance(self.period, int) and self.period >= 86400):
            raise ConfigurationError(
                "[keys] retention_epoch must be 'month' or a duration of at least 1 day"
            )

    def epoch_of(self, when: float) -> Epoch:
        moment = dt.datetime.fromtimestamp(when, dt.UTC)
        if self.period == MONTH:
            start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
            return Epoch(f"{start:%Y-%m}", start.timestamp(), end.timestamp())
        assert isinstance(self.period, int)  # noqa: S101 - checked in __post_init__
        first = int(when) // self.period * self.period
        label = dt.datetime.fromtimestamp(first, dt.UTC).strftime("%Y%m%d")
        return Epoch(label, float(first), float(first + self.period))

    def key_for(self, base: str, retain_until: float) -> str:
        return f"{base}.e{self.epoch_of(retain_until).label}"

    def parse(self, name: str) -> tuple[str, Epoch] | None:
        """(base key, epoch) if ``name`` is an epoch key of this scheme."""
        m = _EPOCH_RE.fullmatch(name)
        if m is None:
            return None
        label = m["label"]
        try:
            if self.period == MONTH:
                if len(label) != 7:
                    return None
                start = dt.datetime.strptime(label, "%Y-%m").replace(tzinfo=dt.UTC)
            else:
                if len(label) != 8:
                    return None
                start = dt.datetime.strptime(label, "%Y%m%d").replace(tzinfo=dt.UTC)
        except ValueError:
            return None
        epoch = self.epoch_of(start.timestamp())
        return (m["base"], epoch) if epoch.label == label else None

    def shred_after(self, epoch: Epoch) -> float:
        return epoch.end + self.grace


def hold_key(epoch_key: str) -> str:
    """The key that keeps the held recordings of one retention epoch past its shredding."""
    return epoch_key + HOLD_SUFFIX


def is_retention_key(name: str) -> bool:
    """An epoch key (``<key>.e<label>``, either scheme) or an epoch's hold key."""
    return _EPOCH_RE.fullmatch(name.removesuffix(HOLD_SUFFIX)) is not None


#: Epoch keys one process may create on the data plane per minute (a burst of this many, then
#: one every 60 / EPOCH_KEYS_PER_MINUTE seconds).
EPOCH_KEYS_PER_MINUTE = 6


class EpochKeyBudget:
    """A token bucket bounding how often GenerateDataKey may create an epoch key on its own
    call (an HSM object and a store write on the data-plane loop). Past the bound the call is
    UNAVAILABLE (retryable: the SDK retries with backoff) and nothing is created."""

    def __init__(
        self, per_minute: int = EPOCH_KEYS_PER_MINUTE, *, clock: Clock = time.monotonic
    ) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(per_minute)
        self._tokens = float(per_minute)
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, epoch_key: str) -> None:
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._last)
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._last = now
            if self._tokens < 1.0:
                log.warning("retention: epoch key %s not created now (rate limit)", epoch_key)
                raise UnavailableError(
                    "too many new retention epoch keys in the last minute; retry shortly",
                    reason="epoch_key_rate_limited",
                )
            self._tokens -= 1.0
