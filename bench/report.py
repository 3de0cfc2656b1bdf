"""Results of one measurement and the markdown report of a benchmark run."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Measurement:
    """One load phase (or one raw HSM run)."""

    ok: int
    errors: int
    seconds: float
    rate: float
    """Successful operations per second."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cpu_us: float | None = None
    """Server CPU (user + system, all its processes) per successful operation."""
    server_cores: float | None = None
    """Server CPU seconds per wall second during the window."""
    client_cpu_us: float | None = None
    all_in_cpu_us: float | None = None
    """All CPU time of the machine in the window except the load generator's, per operation:
    the server plus the kernel work it causes outside its processes (e.g. journal write-back)."""
    machine_busy: float | None = None
    """Share of the machine's cores busy during the window (server + client + anything else)."""
    split: tuple[float, ...] = ()
    """Share of the server CPU per worker process (busiest first): did SO_REUSEPORT balance?"""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    what: str


ROWS: tuple[Row, ...] = (
    Row(
        "kb_unwrap",
        "keybroker UnwrapDataKey",
        "mTLS gRPC, JWT (cached) + policy + HSM GCM decrypt + decision span",
    ),
    Row(
        "kb_unwrap_nojournal",
        "keybroker UnwrapDataKey, audit journal off",
        "a second broker with `[audit] enabled = false`: no durable record (not for production)",
    ),
    Row(
        "kb_unwrap_nofsync",
        "keybroker UnwrapDataKey, journal without fsync",
        "a third broker with `[audit] fsync = false`: durable against a broker crash, not a "
        "power loss",
    ),
    Row(
        "kb_generate",
        "keybroker GenerateDataKey",
        "mTLS gRPC, JWT (cached) + policy + HSM random + HSM GCM encrypt + decision span",
    ),
    Row(
        "kb_health",
        "keybroker Health/Check (empty call)",
        "same server, same mTLS; no JWT, no HSM: the gRPC + TLS + Python floor",
    ),
    Row(
        "hsm_1",
        "HSM GCM decrypt, raw, 1 process",
        "python-pkcs11 + SoftHSM session-key copy, 32 B key + real header as AAD",
    ),
    Row(
        "hsm_2",
        "HSM GCM decrypt, raw, 2 processes",
        "same, one process per core (as the broker's 2 workers)",
    ),
    Row(
        "bao_decrypt_typical",
        "OpenBao transit decrypt, typical token",
        "HTTPS, policy-scoped token that also carries `default`",
    ),
    Row(
        "bao_decrypt_lean",
        "OpenBao transit decrypt, lean token",
        "HTTPS, policy-scoped token, `no_default_policy=true`",
    ),
    Row(
        "bao_datakey_typical",
        "OpenBao transit datakey/plaintext, typical token",
        "HTTPS, policy-scoped token that also carries `default`",
    ),
    Row(
        "bao_datakey_lean",
        "OpenBao transit datakey/plaintext, lean token",
        "HTTPS, policy-scoped token, `no_default_policy=true`",
    ),
    Row(
        "bao_decrypt_audit",
        "OpenBao transit decrypt, typical token + file audit",
        "as the typical row, on a second OpenBao with a file audit device (no fsync), the "
        "closest match to the broker's durable journal",
    ),
    Row(
        "bao_datakey_audit",
        "OpenBao transit datakey/plaintext, typical token + file audit",
        "likewise",
    ),
    Row(
        "bao_decrypt_audit_lean",
        "OpenBao transit decrypt, lean token + file audit",
        "the lean token on the OpenBao with the file audit device: the baseline of issue #16 "
        "(every comparison with OpenBao's file audit device on)",
    ),
    Row(
        "bao_datakey_audit_lean",
        "OpenBao transit datakey/plaintext, lean token + file audit",
        "likewise",
    ),
)

#: (label, numerator row, denominator row, target or None)
RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    ("unwrap ÷ OpenBao decrypt (typical token)", "kb_unwrap", "bao_decrypt_typical", 1.5),
    ("unwrap ÷ OpenBao decrypt (lean token)", "kb_unwrap", "bao_decrypt_lean", 1.5),
    ("generate ÷ OpenBao datakey (typical token)", "kb_generate", "bao_datakey_typical", None),
    ("generate ÷ OpenBao datakey (lean token)", "kb_generate", "bao_datakey_lean", None),
    (
        "unwrap ÷ OpenBao decrypt (typical token + file audit)",
        "kb_unwrap",
        "bao_decrypt_audit",
        None,
    ),
    (
        "generate ÷ OpenBao datakey (typical token + file audit)",
        "kb_generate",
        "bao_datakey_audit",
        None,
    ),
    (
        "unwrap ÷ OpenBao decrypt (lean token + file audit)",
        "kb_unwrap",
        "bao_decrypt_audit_lean",
        None,
    ),
    (
        "generate ÷ OpenBao datakey (lean token + file audit)",
        "kb_generate",
        "bao_datakey_audit_lean",
        None,
    ),
    ("unwrap ÷ empty gRPC call", "kb_unwrap", "kb_health", None),
    ("unwrap, journal on (fsync) ÷ journal off", "kb_unwrap", "kb_unwrap_nojournal", 0.85),
    (
        "unwrap, journal without fsync ÷ journal off",
        "kb_unwrap_nofsync",
        "kb_unwrap_nojournal",
        0.85,
    ),
)
#: Server CPU per call, keybroker ÷ OpenBao (same round; lower is better): (label, numerator
#: row, denominator row, the most it may be or None).
CPU_RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    (
        "unwrap CPU ÷ OpenBao decrypt CPU (lean token + file audit)",
        "kb_unwrap",
        "bao_decrypt_audit_lean",
        0.8,
    ),
    (
        "unwrap CPU ÷ OpenBao decrypt CPU (typical token + file audit)",
        "kb_unwrap",
        "bao_decrypt_audit",
        None,
    ),
    (
        "generate CPU ÷ OpenBao datakey CPU (lean token + file audit)",
        "kb_generate",
        "bao_datakey_audit_lean",
        None,
    ),
    ("unwrap CPU ÷ OpenBao decrypt CPU (lean token)", "kb_unwrap", "bao_decrypt_lean", None),
)
ISSUE_TARGET = 1.5
X = "\u00d7"  # multiplication sign
DASH = "\u2013"  # en dash
PROJECT_GOAL = 2.5


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_of(runs: Sequence[Measurement]) -> Measurement:
    """Each figure's median over the rounds (figures are independent medians)."""

    def med(get: Callable[[Measurement], float | None]) -> float | None:
        return _median([get(m) for m in runs])

    rate = med(lambda m: m.rate) or 0.0
    ranks = min((len(m.split) for m in runs), default=0)
    split = tuple(_median([m.split[i] for m in runs]) or 0.0 for i in range(ranks))
    return Measurement(
        ok=sum(m.ok for m in runs),
        errors=sum(m.errors for m in runs),
        seconds=sum(m.seconds for m in runs),
        rate=rate,
        p50_ms=med(lambda m: m.p50_ms),
        p99_ms=med(lambda m: m.p99_ms),
        server_cpu_us=med(lambda m: m.server_cpu_us),
        server_cores=med(lambda m: m.server_cores),
        client_cpu_us=med(lambda m: m.client_cpu_us),
        all_in_cpu_us=med(lambda m: m.all_in_cpu_us),
        machine_busy=med(lambda m: m.machine_busy),
        split=split if ranks > 1 else (),
    )


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}"


def ratio_stats(
    results: Mapping[str, Sequence[Measurement]], num: str, den: str
) -> tuple[float, float, float] | None:
    """(median, min, max) of the per-round ratios of two rows' rates."""
    pairs = list(zip(results.get(num, ()), results.get(den, ()), strict=False))
    ratios = [a.rate / b.rate for a, b in pairs if b.rate > 0]
    if not ratios:
        return None
    return statistics.median(ratios), min(ratios), max(ratios)


def cpu_ratio_stats(
    results: Mapping[str, Sequence[Measurement]], num: str, den: str
) -> tuple[float, float, float] | None:
    """(median, min, max) of the per-round ratios of two rows' server CPU per call."""
    pairs = list(zip(results.get(num, ()), results.get(den, ()), strict=False))
    ratios = [
        a.server_cpu_us / b.server_cpu_us
        for a, b in pairs
        if a.server_cpu_us is not None and b.server_cpu_us
    ]
    if not ratios:
        return None
    return statistics.median(ratios), min(ratios), max(ratios)


def _cpu_ratio_lines(results: Mapping[str, Sequence[Measurement]]) -> list[str]:
    lines = []
    for label, num, den, most in CPU_RATIOS:
        stats = cpu_ratio_stats(results, num, den)
        if stats is None:
            continue
        med, lo, hi = stats
        limit = DASH if most is None else f"≤ {most}{X}"
        verdict = "" if most is None else ("yes" if med <= most else "no")
        lines.append(
            f"| {label} | {med:.2f}{X} | {lo:.2f}{DASH}{hi:.2f}{X} | {limit} | {verdict} |"
        )
    return lines


def render(
    results: Mapping[str, Sequence[Measurement]],
    *,
    header: Sequence[str],
    settings: Mapping[str, object],
) -> str:
    lines = list(header)
    lines.append("")
    lines.append(
        "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items() if v is not None) + "."
    )
    lines += [
        "",
        "| # | measurement | ops/s | p50 ms | p99 ms | server CPU µs/op | server cores "
        "| client CPU µs/op | all-in CPU µs/op | machine busy | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for n, row in enumerate(ROWS, 1):
        runs = results.get(row.key)
        if not runs:
            continue
        m = median_of(runs)
        busy = f"{m.machine_busy * 100:.0f} %" if m.machine_busy is not None else DASH
        lines.append(
            f"| {n} | {row.label} | {_num(m.rate)} | {_num(m.p50_ms, 2)} | {_num(m.p99_ms, 2)} "
            f"| {_num(m.server_cpu_us)} | {_num(m.server_cores, 2)} | {_num(m.client_cpu_us)} "
            f"| {_num(m.all_in_cpu_us)} | {busy} | {m.errors} |"
        )
    lines += [
        "",
        "| ratio (ops/s, same round) | median | range | target | met? |",
        "|---|--:|--:|--:|---|",
    ]
    for label, num, den, target in RATIOS:
        stats = ratio_stats(results, num, den)
        if stats is None:
            continue
        med, lo, hi = stats
        if target is None:
            verdict, target_text = "", DASH
        else:
            verdict = "yes" if med >= target else "no"
            if target == ISSUE_TARGET:
                goal = "yes" if med >= PROJECT_GOAL else "no"
                verdict += f" (goal {PROJECT_GOAL}{X}: {goal})"
            target_text = f"{target}{X}"
        lines.append(
            f"| {label} | {med:.2f}{X} | {lo:.2f}{DASH}{hi:.2f}{X} | {target_text} | {verdict} |"
        )
    cpu_lines = _cpu_ratio_lines(results)
    if cpu_lines:
        lines += [
            "",
            "| ratio (server CPU per call, same round; lower is better) | median | range "
            "| target | met? |",
            "|---|--:|--:|--:|---|",
            *cpu_lines,
        ]
    lines += [
        "",
        "These ratios are at one level of load (the settings' concurrency); the targets are read "
        "at capacity, each server at its best level: `bench/capacity.py` (docs/PERFORMANCE.md).",
    ]
    lines += ["", "What each row measures:", ""]
    for n, row in enumerate(ROWS, 1):
        if results.get(row.key):
            lines.append(f"{n}. {row.label}: {row.what}.")
    splits = [
        f"{row.label}: {' / '.join(f'{share * 100:.0f}' for share in m.split)} %"
        for row in ROWS
        if row.key.startswith("kb_") and results.get(row.key)
        for m in [median_of(results[row.key])]
        if len(m.split) > 1
    ]
    if splits:
        lines += [
            "",
            "Server CPU per broker worker process, busiest first (median per rank): "
            + "; ".join(splits)
            + ".",
        ]
    return "\n".join(lines) + "\n"
