"""``keybroker audit report``: aggregation, the SVG chart, and the command over a real journal."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from keybroker import settings as settings_mod
from keybroker.adapters.journal import Journal, JournalConfig
from keybroker.cli.audit_report import (
    DAY_NS,
    HOUR_NS,
    main_report,
    render_svg,
    render_text,
    summarize,
    to_json,
)
from keybroker.core.decision import Decision, Outcome
from keybroker.devenv import DevEnv

SVG = "{http://www.w3.org/2000/svg}"
T0 = 1_732_250_000 * 10**9 // HOUR_NS * HOUR_NS  # an hour boundary, 2024-11-22
SECRETS = ("rec-SECRET-1", "rec-SECRET-2", "subj-SECRET-a", "subj-SECRET-b")


def parse_svg(text: str) -> ET.Element:
    """Parse SVG this test suite generated itself (trusted input)."""
    return ET.fromstring(text)  # noqa: S314 - our own output, not untrusted data


def decision(
    outcome: Outcome,
    *,
    principal: str | None = "storage",
    operation: str = "UnwrapDataKey",
    reason: str = "ok",
    purposes: tuple[str, ...] = ("playback",),
    key: tuple[str, int] | None = ("recordings", 1),
) -> Decision:
    """A decision carrying recording and subject ids the report must never show."""
    return Decision(
        service="keybroker.v1.KeyBroker",
        operation=operation,
        outcome=outcome,
        reason=reason,
        subject=principal,
        recording_id="rec-SECRET-1",
        subject_ids=("subj-SECRET-a", "subj-SECRET-b"),
        purposes=purposes,
        key_name=key[0] if key else None,
        key_version=key[1] if key else None,
    )


def sample() -> list[tuple[int, Decision]]:
    """Seven decisions over three hours (the middle hour empty)."""
    return [
        (T0 + 1, decision(Outcome.ALLOW)),
        (T0 + 2, decision(Outcome.ALLOW, operation="GenerateDataKey", key=("recordings", 2))),
        (T0 + 3, decision(Outcome.DENY, reason="purpose_not_allowed", purposes=("training",))),
        (T0 + 4, decision(Outcome.DENY, principal=None, reason="no_token", purposes=(), key=None)),
        (T0 + 2 * HOUR_NS, decision(Outcome.ALLOW, principal="analytics")),
        (T0 + 2 * HOUR_NS + 5, decision(Outcome.DENY, reason="purpose_not_allowed")),
        (T0 + 2 * HOUR_NS + 6, decision(Outcome.ERROR, reason="hsm_unavailable")),
    ]


def test_summary_counts_outcomes_principals_purposes_keys_and_reasons() -> None:
    """Totals, per-principal counts with allowed unwraps, purposes, key versions and the
    denial reasons ranked by frequency come out of a handful of decisions."""
    s = summarize(sample())
    assert (s.totals.allow, s.totals.deny, s.totals.error, s.totals.total) == (3, 3, 1, 7)
    storage = s.principals["storage"]
    assert (storage.counts.allow, storage.counts.deny, storage.counts.error) == (2, 2, 1)
    assert storage.unwraps == 1  # the GenerateDataKey allow is not an unwrap; denials are not
    assert s.principals["analytics"].unwraps == 1
    assert s.principals["(none)"].counts.deny == 1
    assert list(s.principals) == ["storage", "(none)", "analytics"]  # busiest, then by name
    assert s.purposes["playback"].total == 5
    assert s.purposes["training"].deny == 1
    assert s.purposes["(none)"].total == 1
    assert {k: c.total for k, c in s.key_versions.items()} == {
        "recordings/v1": 5,
        "recordings/v2": 1,
    }
    assert s.denial_reasons == [("purpose_not_allowed", 2), ("no_token", 1)]
    assert s.error_reasons == [("hsm_unavailable", 1)]
    assert s.operations["UnwrapDataKey"].total == 6


def test_summary_timeline_is_hourly_and_contiguous() -> None:
    """A short period is bucketed per hour, with empty hours kept so the chart shows gaps."""
    s = summarize(sample())
    assert s.bucket == "hour"
    assert [b.start_ns for b in s.buckets] == [T0, T0 + HOUR_NS, T0 + 2 * HOUR_NS]
    assert [(b.counts.allow, b.counts.deny, b.counts.error) for b in s.buckets] == [
        (2, 2, 0),
        (0, 0, 0),
        (1, 1, 1),
    ]


def test_long_period_is_bucketed_per_day() -> None:
    """Over more than two days the timeline switches to one bucket per day."""
    s = summarize([(T0, decision(Outcome.ALLOW)), (T0 + 5 * DAY_NS, decision(Outcome.DENY))])
    assert s.bucket == "day"
    assert len(s.buckets) in (6, 7)
    assert sum(b.counts.total for b in s.buckets) == 2


def test_period_bounds_are_inclusive_and_filter() -> None:
    """--since/--until keep only decisions inside the period, both ends included."""
    s = summarize(sample(), since_ns=T0 + 2, until_ns=T0 + 2 * HOUR_NS)
    assert s.totals.total == 4
    assert (s.first_ns, s.last_ns) == (T0 + 2, T0 + 2 * HOUR_NS)


def test_empty_journal_summarises_to_nothing() -> None:
    """No decisions: zero totals, no buckets, and text and SVG still render."""
    s = summarize([])
    assert s.totals.total == 0
    assert s.buckets == []
    assert "(none)" in render_text(s)
    parse_svg(render_svg(s))


def test_svg_is_well_formed_with_expected_bars_and_labels() -> None:
    """The chart parses as XML, has one stacked segment per non-zero outcome per hour whose
    counts add up, and one bar segment per outcome per key version, with labels."""
    s = summarize(sample())
    root = parse_svg(render_svg(s))
    assert root.tag == f"{SVG}svg"
    rects = root.iter(f"{SVG}rect")
    bars = [r for r in rects if "bar" in (r.get("class") or "").split()]
    by_outcome: dict[str, int] = {}
    for bar in bars:
        outcome = (bar.get("class") or "").split()[1]
        by_outcome[outcome] = by_outcome.get(outcome, 0) + int(bar.get("data-count") or 0)
        assert float(bar.get("height") or 0) > 0
    assert len(bars) == 5  # hour 1: allow, deny; hour 2: empty; hour 3: allow, deny, error
    assert by_outcome == {"allow": 3, "deny": 3, "error": 1}
    keys = [r for r in root.iter(f"{SVG}rect") if (r.get("class") or "").startswith("key ")]
    assert {(r.get("data-key"), r.get("class")) for r in keys} == {
        ("recordings/v1", "key allow"),
        ("recordings/v1", "key deny"),
        ("recordings/v1", "key error"),
        ("recordings/v2", "key allow"),
    }
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert "recordings/v1" in texts
    assert "recordings/v2" in texts
    assert "2024-11-22 04:00" in texts
    assert {"allow", "deny", "error"} <= set(texts)
    assert any("Decisions per hour" in t for t in texts)


def test_svg_escapes_names() -> None:
    """Key names with XML metacharacters are escaped, so the SVG stays well formed."""
    s = summarize([(T0, decision(Outcome.ALLOW, key=('a<b>&"c', 3)))])
    root = parse_svg(render_svg(s))
    assert 'a<b>&"c/v3' in ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_no_output_names_recording_or_subject_ids() -> None:
    """Data minimisation: text, JSON and SVG never carry recording ids or subject ids."""
    s = summarize(sample())
    for rendered in (render_text(s), json.dumps(to_json(s)), render_svg(s)):
        for secret in SECRETS:
            assert secret not in rendered
        assert "SECRET" not in rendered


def test_text_tables_are_aligned() -> None:
    """Every row of a table has its columns at the same offsets as the header."""
    text = render_text(summarize(sample()))
    block = text.split("Per principal\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header, rule, *rows = block
    assert header.split() == ["principal", "allow", "deny", "error", "total", "unwraps"]
    assert set(rule.strip()) <= {"-", " "}
    assert len({len(line) for line in [header, rule, *rows]}) == 1
    assert rows[0].split() == ["storage", "2", "2", "1", "5", "1"]
    assert "purpose_not_allowed" in text
    assert "recordings/v1" in text


@pytest.fixture
def journal_dir(devenv: DevEnv, tmp_path: Path) -> Path:
    """A real, signed journal written by the Journal class with a controlled clock."""
    key, signing = settings_mod.load(devenv.config, environ={}).audit.load_keys()
    now = [T0]
    root = tmp_path / "journal"
    journal = Journal(JournalConfig(root / "w0", key, signing), clock=lambda: now[0])
    for ts, d in sample():
        now[0] = ts
        journal.record(d)
    journal.checkpoint()
    journal.close()
    return root


def test_command_writes_json_and_chart_from_a_real_journal(
    devenv: DevEnv, journal_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end: the command reads the journal, skips checkpoints, prints one JSON object
    with the aggregates and writes a well-formed SVG, neither naming recordings or subjects."""
    chart = tmp_path / "report.svg"
    code = main_report(
        ["--config", str(devenv.config), "--dir", str(journal_dir), "--json", "--chart", str(chart)]
    )
    assert code == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["totals"] == {"allow": 3, "deny": 3, "error": 1, "total": 7}
    assert data["principals"]["storage"] == {
        "allow": 2,
        "deny": 2,
        "error": 1,
        "total": 5,
        "unwraps": 1,
    }
    assert data["key_versions"]["recordings/v2"]["allow"] == 1
    assert data["denial_reasons"][0] == {"reason": "purpose_not_allowed", "count": 2}
    assert data["timeline"]["bucket"] == "hour"
    assert [b["total"] for b in data["timeline"]["buckets"]] == [4, 0, 3]
    svg = chart.read_text(encoding="utf-8")
    root = parse_svg(svg)
    assert root.tag == f"{SVG}svg"
    for secret in SECRETS:
        assert secret not in out
        assert secret not in svg


def test_command_text_output_and_period(
    devenv: DevEnv, journal_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --json the command prints tables; --since narrows the period to the last hour."""
    code = main_report(
        ["--config", str(devenv.config), "--dir", str(journal_dir), "--since", "2024-11-22T06:00"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("Audit report: 2024-11-22T06:00:00+00:00 .. end")
    totals = out.split("Totals\n", 1)[1].split("\n\n", 1)[0]
    assert totals.splitlines()[-1].split() == ["total", "3"]
    assert "hsm_unavailable" in out
    assert "SECRET" not in out
