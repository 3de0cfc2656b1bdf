"""Retry with exponential backoff and full jitter, on UNAVAILABLE only (never on a denial)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_attempts`` tries; the n-th wait is uniform in [0, min(max, initial*m^n)]."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def backoffs(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits between attempts (``max_attempts - 1`` of them)."""
        rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        for n in range(self.max_attempts - 1):
            yield rng.uniform(0, min(self.max_backoff, self.initial_backoff * self.multiplier**n))


NO_RETRY = RetryPolicy(max_attempts=1)
