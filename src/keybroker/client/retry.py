"""Retry on UNAVAILABLE only (never on a denial), carried out by gRPC's own retry service config."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: gRPC treats a ``maxAttempts`` above 5 as 5 (gRFC A6); the policy says so rather than pretend.
GRPC_MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class RetryPolicy:
    """How a call rides out an unreachable or overloaded broker.

    ``max_attempts`` tries (gRPC caps it at 5) on status UNAVAILABLE only; the n-th wait is uniform
    in [0, min(max_backoff, initial_backoff * multiplier**n)] (exponential backoff, full jitter).
    With ``wait_for_ready`` a call made while no broker can be reached waits for one (gRPC's
    wait-for-ready) instead of failing at once; the client's per-operation deadline bounds both.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    wait_for_ready: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0.001 <= self.initial_backoff <= self.max_backoff or self.multiplier <= 0:
            raise ValueError("need 0.001 <= initial_backoff <= max_backoff and multiplier > 0")

    @property
    def attempts(self) -> int:
        """The attempts gRPC will really make."""
        return min(self.max_attempts, GRPC_MAX_ATTEMPTS)

    def backoffs(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits between attempts (``attempts - 1`` of them): the schedule gRPC follows."""
        rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        for n in range(self.attempts - 1):
            yield rng.uniform(0, min(self.max_backoff, self.initial_backoff * self.multiplier**n))

    def method_config(self, services: list[str]) -> dict[str, Any]:
        """The ``methodConfig`` entry of a gRPC service config for ``services``."""
        config: dict[str, Any] = {
            "name": [{"service": s} for s in services],
            "waitForReady": self.wait_for_ready,
        }
        if self.attempts > 1:
            config["retryPolicy"] = {
                "maxAttempts": self.attempts,
                "initialBackoff": f"{self.initial_backoff:.6f}s",
                "maxBackoff": f"{self.max_backoff:.6f}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return config


NO_RETRY = RetryPolicy(max_attempts=1, wait_for_ready=False)
