"""Alert thresholds (the ``[alerts]`` settings section) and the lifecycle oracle's default.

The detectors themselves live in :mod:`keybroker.adapters.alerts`.
"""

from __future__ import annotations

from dataclasses import dataclass


def never_scheduled(key_name: str, version: int) -> bool:
    """The default lifecycle oracle: no key version is ever scheduled for destruction."""
    return False


@dataclass(frozen=True, slots=True)
class AlertThresholds:
    """Thresholds of the built-in detectors. All durations are in seconds."""

    denial_count: int = 10
    """Denials (outcome ``deny``) of one principal or one certificate that fire. Default 10."""
    denial_window_s: float = 60.0
    """Sliding window for ``denial_count``. Default 60 s."""
    volume_bucket_s: float = 60.0
    """Length of one volume "minute" bucket. Default 60 s."""
    volume_factor: float = 10.0
    """Fire when the current bucket exceeds this many times the principal's baseline. Default 10."""
    volume_min: int = 100
    """…and exceeds this absolute count, so quiet principals do not alert on noise. Default 100."""
    volume_warmup: int = 10
    """Buckets of history a principal needs before its volume is judged. Default 10."""
    volume_alpha: float = 0.2
    """EWMA weight of the newest bucket in the baseline, in (0, 1]. Default 0.2."""
    tamper_count: int = 5
    """``wrapped_key_invalid`` decisions of one principal that fire. Default 5."""
    tamper_global_count: int = 20
    """``wrapped_key_invalid`` decisions of all callers together that fire. Default 20."""
    tamper_window_s: float = 60.0
    """Sliding window for both tamper counts. Default 60 s."""
    cooldown_s: float = 300.0
    """An alert fires at most once per (detector, subject) per this period. Default 300 s."""
    idle_expiry_s: float = 86_400.0
    """A principal's volume baseline is forgotten after this long without unwraps. Default 1 day."""
    sweep_interval_s: float = 60.0
    """How often stale per-subject state is dropped (bounds memory). Default 60 s."""

    def __post_init__(self) -> None:
        for name in ("denial_count", "tamper_count", "tamper_global_count", "volume_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.volume_warmup < 0:
            raise ValueError("volume_warmup must not be negative")
        for name in (
            "denial_window_s",
            "volume_bucket_s",
            "tamper_window_s",
            "idle_expiry_s",
            "sweep_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.cooldown_s < 0:
            raise ValueError("cooldown_s must not be negative")
        if not 0 < self.volume_alpha <= 1:
            raise ValueError("volume_alpha must be in (0, 1]")
        if self.volume_factor <= 0:
            raise ValueError("volume_factor must be positive")
