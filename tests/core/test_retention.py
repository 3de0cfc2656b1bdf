"""Retention epochs: naming, boundaries, parsing (pure)."""

from __future__ import annotations

import datetime as dt

import pytest

from keybroker.core.retention import EpochScheme, hold_key
from keybroker.errors import ConfigurationError


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()


def test_monthly_epochs_follow_the_calendar_including_december() -> None:
    scheme = EpochScheme()
    epoch = scheme.epoch_of(ts(2026, 12, 31, 23, 59, 59))
    assert (epoch.label, epoch.start, epoch.end) == ("2026-12", ts(2026, 12, 1), ts(2027, 1, 1))
    assert scheme.epoch_of(ts(2027, 1, 1)).label == "2027-01"
    assert scheme.key_for("recordings", ts(2027, 2, 14)) == "recordings.e2027-02"
    assert scheme.shred_after(epoch) == ts(2027, 1, 1) + 7 * 86400


def test_parse_round_trips_and_rejects_other_names() -> None:
    scheme = EpochScheme()
    parsed = scheme.parse("calls.eu.e2027-02")
    assert parsed is not None
    assert (parsed[0], parsed[1].label) == ("calls.eu", "2027-02")
    for name in ("recordings", "recordings.e2027-13", "recordings.e20270214", "x.e2027-2"):
        assert scheme.parse(name) is None
    daily = EpochScheme(86400, 3600)
    assert daily.key_for("r", ts(2027, 2, 14, 13)) == "r.e20270214"
    assert daily.parse("r.e20270214") is not None
    assert daily.parse("r.e2027-02") is None  # another scheme's key is never touched
    assert hold_key("recordings.e2027-02") == "recordings.e2027-02.hold"
    assert scheme.parse(hold_key("recordings.e2027-02")) is None  # a hold key is no epoch key


def test_periods_shorter_than_a_day_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        EpochScheme(3600)
