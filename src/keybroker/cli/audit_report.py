"""``keybroker audit report``: what the broker decided over a period, from the local journal.

Totals by outcome, usage per principal (the token ``sub``), per purpose and per key version, the
top denial reasons, and optionally an SVG chart (outcomes over time, decisions per key version).

Data minimisation: the report names principals, purposes and keys, never recording ids or
subject ids (nor tokens, certificates or peer addresses).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape, quoteattr

from keybroker.cli.common import load_settings
from keybroker.cli.journal_reading import (
    journal_root,
    parse_when,
    print_notes,
    reading_journal,
    records,
)
from keybroker.core.decision import Decision, Outcome

OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome if o is not Outcome.INTENT)
UNWRAP = "UnwrapDataKey"
NO_PRINCIPAL = "(none)"
NO_PURPOSE = "(none)"
HOUR_NS = 3600 * 10**9
DAY_NS = 24 * HOUR_NS
WEEK_NS = 7 * DAY_NS
HOURLY_UP_TO_NS = 2 * DAY_NS
DAILY_UP_TO_NS = 120 * DAY_NS
T = TypeVar("T")
COLOURS = {"allow": "#2e7d32", "deny": "#c62828", "error": "#9e9e9e"}


@dataclass(slots=True)
class Counts:
    """Decisions by outcome."""

    allow: int = 0
    deny: int = 0
    error: int = 0

    @property
    def total(self) -> int:
        return self.allow + self.deny + self.error

    def add(self, outcome: Outcome) -> None:
        setattr(self, outcome.value, getattr(self, outcome.value) + 1)


@dataclass(slots=True)
class PrincipalUsage:
    """One principal's decisions; ``unwraps`` counts allowed UnwrapDataKey calls."""

    counts: Counts = field(default_factory=Counts)
    unwraps: int = 0


@dataclass(slots=True)
class Bucket:
    """Decisions whose time falls in ``[start_ns, start_ns + width)``."""

    start_ns: int
    counts: Counts = field(default_factory=Counts)


@dataclass(slots=True)
class Summary:
    """The aggregated report; mappings are ordered busiest first."""

    since_ns: int | None
    until_ns: int | None
    first_ns: int | None = None
    last_ns: int | None = None
    totals: Counts = field(default_factory=Counts)
    principals: dict[str, PrincipalUsage] = field(default_factory=dict)
    purposes: dict[str, Counts] = field(default_factory=dict)
    key_versions: dict[str, Counts] = field(default_factory=dict)
    operations: dict[str, Counts] = field(default_factory=dict)
    denial_reasons: list[tuple[str, int]] = field(default_factory=list)
    error_reasons: list[tuple[str, int]] = field(default_factory=list)
    bucket: str = "hour"
    bucket_ns: int = HOUR_NS
    buckets: list[Bucket] = field(default_factory=list)


def key_label(d: Decision) -> str | None:
    if not d.key_name:
        return None
    return d.key_name if d.key_version is None else f"{d.key_name}/v{d.key_version}"


def _bucket_width(first: int, last: int) -> tuple[str, int]:
    span = last - first
    if span <= HOURLY_UP_TO_NS:
        return "hour", HOUR_NS
    if span <= DAILY_UP_TO_NS:
        return "day", DAY_NS
    return "week", WEEK_NS


def _floor(ts: int, width: int) -> int:
    if width == WEEK_NS:  # weeks start on Monday (1970-01-01 was a Thursday)
        return (ts + 3 * DAY_NS) // WEEK_NS * WEEK_NS - 3 * DAY_NS
    return ts // width * width


def _busiest(items: dict[str, T], total: Callable[[T], int]) -> dict[str, T]:
    return dict(sorted(items.items(), key=lambda kv: (-total(kv[1]), kv[0])))


def summarize(
    decisions: Iterable[tuple[int, Decision]],
    *,
    since_ns: int | None = None,
    until_ns: int | None = None,
    top: int = 10,
) -> Summary:
    """Aggregate ``(timestamp_ns, decision)`` pairs within ``[since_ns, until_ns]`` (inclusive)."""
    out = Summary(since_ns, until_ns)
    kept: list[tuple[int, Outcome]] = []
    principals: dict[str, PrincipalUsage] = {}
    purposes: dict[str, Counts] = {}
    keys: dict[str, Counts] = {}
    operations: dict[str, Counts] = {}
    denials: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for ts, d in decisions:
        if (since_ns is not None and ts < since_ns) or (until_ns is not None and ts > until_ns):
            continue
        if d.outcome is Outcome.INTENT:  # announces a change; its decision is counted
            continue
        kept.append((ts, d.outcome))
        out.totals.add(d.outcome)
        usage = principals.setdefault(d.subject or NO_PRINCIPAL, PrincipalUsage())
        usage.counts.add(d.outcome)
        usage.unwraps += d.operation == UNWRAP and d.outcome is Outcome.ALLOW
        for purpose in d.purposes or (NO_PURPOSE,):
            purposes.setdefault(purpose, Counts()).add(d.outcome)
        key = key_label(d)
        if key is not None:
            keys.setdefault(key, Counts()).add(d.outcome)
        operations.setdefault(d.operation, Counts()).add(d.outcome)
        if d.outcome is Outcome.DENY:
            denials[d.reason or "(no reason)"] += 1
        elif d.outcome is Outcome.ERROR:
            errors[d.reason or "(no reason)"] += 1
    out.principals = _busiest(principals, lambda u: u.counts.total)
    out.purposes = _busiest(purposes, lambda c: c.total)
    out.key_versions = _busiest(keys, lambda c: c.total)
    out.operations = _busiest(operations, lambda c: c.total)
    out.denial_reasons = sorted(denials.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    out.error_reasons = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    if kept:
        out.first_ns = min(ts for ts, _ in kept)
        out.last_ns = max(ts for ts, _ in kept)
        out.bucket, out.bucket_ns = _bucket_width(out.first_ns, out.last_ns)
        start = _floor(out.first_ns, out.bucket_ns)
        count = (_floor(out.last_ns, out.bucket_ns) - start) // out.bucket_ns + 1
        out.buckets = [Bucket(start + i * out.bucket_ns) for i in range(count)]
        for ts, outcome in kept:
            out.buckets[(ts - start) // out.bucket_ns].counts.add(outcome)
    return out


# -- rendering ---------------------------------------------------------------------------------


def iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts / 1e9, dt.UTC).isoformat(timespec="seconds")


def _bucket_label(ts: int, bucket: str) -> str:
    moment = dt.datetime.fromtimestamp(ts / 1e9, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d")


def _counts_json(c: Counts) -> dict[str, int]:
    return {**dataclasses.asdict(c), "total": c.total}


def to_json(s: Summary) -> dict[str, Any]:
    """The summary as plain JSON data (times in ISO 8601 UTC)."""
    return {
        "period": {
            "since": iso(s.since_ns),
            "until": iso(s.until_ns),
            "first": iso(s.first_ns),
            "last": iso(s.last_ns),
        },
        "totals": _counts_json(s.totals),
        "principals": {
            name: {**_counts_json(u.counts), "unwraps": u.unwraps}
            for name, u in s.principals.items()
        },
        "purposes": {name: _counts_json(c) for name, c in s.purposes.items()},
        "key_versions": {name: _counts_json(c) for name, c in s.key_versions.items()},
        "operations": {name: _counts_json(c) for name, c in s.operations.items()},
        "denial_reasons": [{"reason": r, "count": n} for r, n in s.denial_reasons],
        "error_reasons": [{"reason": r, "count": n} for r, n in s.error_reasons],
        "timeline": {
            "bucket": s.bucket,
            "buckets": [{"start": iso(b.start_ns), **_counts_json(b.counts)} for b in s.buckets],
        },
    }


def _table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned first column, right-aligned numbers."""
    if not rows:
        return [title, "  (none)", ""]
    cells = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        return "  " + "  ".join([first, *rest]).rstrip()

    rule = "  " + "  ".join("-" * w for w in widths)
    return [title, line(cells[0]), rule, *(line(r) for r in cells[1:]), ""]


def _count_row(name: str, c: Counts) -> list[object]:
    return [name, c.allow, c.deny, c.error, c.total]


def render_text(s: Summary) -> str:
    """Readable aligned tables."""
    period = f"{iso(s.since_ns) or 'start'} .. {iso(s.until_ns) or 'end'}"
    seen = f"{iso(s.first_ns)} .. {iso(s.last_ns)}" if s.first_ns is not None else "none"
    heads = ["allow", "deny", "error", "total"]
    lines = [f"Audit report: {period} (decisions {seen})", ""]
    totals: list[list[object]] = [[o, getattr(s.totals, o)] for o in OUTCOMES]
    lines += _table("Totals", ["outcome", "count"], [*totals, ["total", s.totals.total]])
    lines += _table(
        "Per principal",
        ["principal", *heads, "unwraps"],
        [[*_count_row(n, u.counts), u.unwraps] for n, u in s.principals.items()],
    )
    lines += _table(
        "Per purpose", ["purpose", *heads], [_count_row(n, c) for n, c in s.purposes.items()]
    )
    lines += _table(
        "Per key version",
        ["key", *heads],
        [_count_row(n, c) for n, c in s.key_versions.items()],
    )
    lines += _table(
        "Per operation",
        ["operation", *heads],
        [_count_row(n, c) for n, c in s.operations.items()],
    )
    lines += _table("Top denial reasons", ["reason", "count"], s.denial_reasons)
    if s.error_reasons:
        lines += _table("Top error reasons", ["reason", "count"], s.error_reasons)
    return "\n".join(lines).rstrip() + "\n"


def _nice_max(value: int) -> int:
    """A round axis maximum >= value (1, 2, 5 x 10^n)."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= value:
                return m * step
        step *= 10


def render_svg(s: Summary, *, width: int = 860) -> str:
    """A self-contained SVG: outcomes per time bucket (stacked) and decisions per key version."""
    left, right, top = 56, 20, 56
    plot_w, plot_h = width - left - right, 220
    key_rows = list(s.key_versions.items())
    bar_h, key_gap = 18, 6
    keys_top = top + plot_h + 90
    height = keys_top + 24 + max(1, len(key_rows)) * (bar_h + key_gap) + 20
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    title = (
        f"Decisions per {s.bucket}, {iso(s.first_ns) or '-'} .. {iso(s.last_ns) or '-'} "
        f"({s.totals.allow} allow, {s.totals.deny} deny, {s.totals.error} error)"
    )
    out.append(f'<text x="{left}" y="22" font-size="14" font-weight="bold">{escape(title)}</text>')
    for i, outcome in enumerate(OUTCOMES):  # legend
        lx = left + i * 80
        out.append(
            f'<rect x="{lx}" y="32" width="10" height="10" fill="{COLOURS[outcome]}" '
            f'class="legend"/><text x="{lx + 14}" y="41">{outcome}</text>'
        )
    peak = _nice_max(max((b.counts.total for b in s.buckets), default=0) or 1)
    base = top + plot_h
    for tick in (0, peak // 2, peak) if peak > 1 else (0, peak):
        y = base - tick * plot_h / peak
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e0e0e0"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>'
        )
    n = max(1, len(s.buckets))
    slot = plot_w / n
    bar_w = max(1.0, slot * 0.8)
    label_every = max(1, -(-n // 12))
    for i, b in enumerate(s.buckets):
        x = left + i * slot + (slot - bar_w) / 2
        y = float(base)
        label = _bucket_label(b.start_ns, s.bucket)
        for outcome in OUTCOMES:
            value = getattr(b.counts, outcome)
            if not value:
                continue
            h = value * plot_h / peak
            y -= h
            out.append(
                f'<rect class="bar {outcome}" data-count="{value}" x="{x:.1f}" y="{y:.1f}" '
                f'width="{bar_w:.1f}" height="{h:.1f}" fill="{COLOURS[outcome]}">'
                f"<title>{escape(label)}: {value} {outcome}</title></rect>"
            )
        if i % label_every == 0:
            cx = x + bar_w / 2
            out.append(
                f'<text x="{cx:.1f}" y="{base + 14}" text-anchor="end" '
                f'transform="rotate(-35 {cx:.1f} {base + 14})">{escape(label)}</text>'
            )
    out.append(f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#424242"/>')
    out.append(
        f'<text x="{left}" y="{keys_top}" font-size="13" font-weight="bold">'
        "Decisions per key version</text>"
    )
    label_w = 150
    key_max = max((c.total for _, c in key_rows), default=0) or 1
    key_plot = plot_w - label_w - 60
    if not key_rows:
        out.append(f'<text x="{left}" y="{keys_top + 24}">(no key was used)</text>')
    for i, (name, c) in enumerate(key_rows):
        row_y = keys_top + 12 + i * (bar_h + key_gap)
        out.append(
            f'<text x="{left + label_w - 6}" y="{row_y + bar_h - 5}" text-anchor="end" '
            f'class="key-label">{escape(name)}</text>'
        )
        bx = float(left + label_w)
        for outcome in OUTCOMES:
            value = getattr(c, outcome)
            if not value:
                continue
            w = value * key_plot / key_max
            out.append(
                f'<rect class="key {outcome}" data-key={quoteattr(name)} data-count="{value}" '
                f'x="{bx:.1f}" y="{row_y}" width="{w:.1f}" height="{bar_h}" '
                f'fill="{COLOURS[outcome]}"><title>{escape(name)}: {value} {outcome}</title></rect>'
            )
            bx += w
        out.append(f'<text x="{bx + 6:.1f}" y="{row_y + bar_h - 5}">{c.total}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- command -----------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    root = journal_root(args, load_settings(args))
    since = parse_when(args.since) if args.since else None
    until = parse_when(args.until) if args.until else None
    notes: list[str] = []
    decisions = (
        (record.ts, d)
        for _chain, record in records(root, notes)
        if (d := record.decision) is not None
    )
    summary = summarize(decisions, since_ns=since, until_ns=until, top=args.top)
    print_notes(notes)
    if args.chart:
        Path(args.chart).write_text(render_svg(summary), encoding="utf-8")
    if args.json:
        print(json.dumps(to_json(summary), indent=2))
    else:
        sys.stdout.write(render_text(summary))
        if args.chart:
            print(f"chart written to {args.chart}", file=sys.stderr)
    return 0


def register(audit: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = audit.add_parser("report", help="summarise decisions over a period (tables, JSON, SVG)")
    p.add_argument(
        "--config", help="settings file with an [audit] section (default: $KEYBROKER_CONFIG)"
    )
    p.add_argument("--dir", type=Path, help="journal directory (default [audit] dir)")
    p.add_argument("--since", help="ISO 8601 time (UTC if no zone)")
    p.add_argument("--until", help="ISO 8601 time (UTC if no zone)")
    p.add_argument("--top", type=int, default=10, help="denial reasons listed (default 10)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--chart", type=Path, metavar="FILE.svg", help="also write an SVG chart")
    p.set_defaults(func=reading_journal(cmd_report))


def main_report(argv: Sequence[str]) -> int:
    """Run ``audit report`` with ``argv`` (for tests and scripting without the full CLI)."""
    parser = argparse.ArgumentParser(prog="keybroker audit")
    register(parser.add_subparsers(dest="audit_command", required=True))
    args = parser.parse_args(["report", *argv])
    result: int = args.func(args)
    return result
