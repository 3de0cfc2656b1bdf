"""Export the audit journal to OpenTelemetry (OTLP/gRPC) without losing a record.

A background thread reads durable records after a persisted position (``export.position`` in the
chain's directory), turns each into a span and exports them in batches. The position moves only
after the collector accepted a batch; failures are retried with capped exponential backoff. A slow
or absent collector therefore delays export but never a request, and after an outage or a crash
every record arrives. Delivery is at least once: a crash between an accepted export and the
position update re-sends at most one batch (``batch_size`` records). Span and trace ids derive from
the record's MAC, so a re-sent record is the identical span and a backend can de-duplicate it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from keybroker import __version__
from keybroker.adapters.journal import journal_files
from keybroker.adapters.telemetry import decision_attributes
from keybroker.core import journal as jf
from keybroker.core.decision import Outcome

log = logging.getLogger(__name__)

POSITION = "export.position"
_SCOPE = InstrumentationScope("keybroker.audit", __version__)


class Pseudonymizer:
    """Keyed HMAC of identifiers, so exported spans carry no recording or subject id in clear."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, kind: str, identifier: str) -> str:
        digest = hmac.new(self._key, f"{kind}:{identifier}".encode(), hashlib.sha256)
        return "p:" + digest.hexdigest()[:32]


def _parent(traceparent: str | None) -> SpanContext | None:
    parts = (traceparent or "").split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))


def record_to_span(
    record: jf.Record,
    chain: str,
    resource: Resource,
    pseudonymize: Callable[[str, str], str] | None = None,
) -> ReadableSpan:
    """One journal record as a finished SERVER span (decisions) or INTERNAL span (checkpoints)."""
    mac = bytes.fromhex(record.mac)
    span_id = int.from_bytes(mac[:8], "big") or 1
    common: dict[str, str | int] = {
        "keybroker.audit.chain": chain,
        "keybroker.audit.seq": record.seq,
    }
    decision = record.decision
    if decision is None:
        attributes = {
            **common,
            "keybroker.audit.head": record.prev,
            "keybroker.audit.signature": str(record.body.get("sig", "")),
        }
        return ReadableSpan(
            name="keybroker.audit/Checkpoint",
            context=SpanContext(int.from_bytes(mac[8:24], "big"), span_id, False, TraceFlags(1)),
            resource=resource,
            attributes=attributes,
            kind=SpanKind.INTERNAL,
            start_time=record.ts,
            end_time=record.ts,
            instrumentation_scope=_SCOPE,
        )
    if pseudonymize is not None:
        if decision.recording_id:
            decision.recording_id = pseudonymize("recording", decision.recording_id)
        decision.subject_ids = tuple(pseudonymize("subject", s) for s in decision.subject_ids)
        if decision.justification:  # free text ("art. 17 request from Jane Doe …")
            decision.justification = pseudonymize("justification", decision.justification)
    parent = _parent(decision.trace_context.get("traceparent"))
    trace_id = parent.trace_id if parent else int.from_bytes(mac[8:24], "big")
    status = (
        Status(StatusCode.ERROR, decision.reason) if decision.outcome is Outcome.ERROR else Status()
    )
    return ReadableSpan(
        name=f"{decision.service}/{decision.operation}",
        context=SpanContext(trace_id, span_id, False, TraceFlags(1)),
        parent=parent,
        resource=resource,
        attributes={**decision_attributes(decision), **common},
        kind=SpanKind.SERVER,
        start_time=decision.started_ns or record.ts,
        end_time=decision.ended_ns or record.ts,
        status=status,
        instrumentation_scope=_SCOPE,
    )


def read_position(directory: Path) -> int:
    try:
        return int((directory / POSITION).read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def write_position(directory: Path, seq: int) -> None:
    tmp = directory / f".{POSITION}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{seq}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(directory / POSITION)


def read_after(directory: Path, position: int, limit: int, upto: int | None) -> list[jf.Record]:
    """Up to ``limit`` complete records with ``position < seq <= upto`` (chain already verified
    when written; records are parsed, not re-verified)."""
    files = journal_files(directory)
    out: list[jf.Record] = []
    for i, path in enumerate(files):
        if i + 1 < len(files) and int(files[i + 1].stem.split("-")[1]) <= position + 1:
            continue  # every record of this file is at or before the position
        data = path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]
        for raw in data.splitlines():
            body = jf.parse_line(raw)
            seq = int(body["seq"])
            if seq <= position:
                continue
            if upto is not None and seq > upto:
                return out
            mac = str(body.pop("mac"))
            out.append(
                jf.Record(seq, int(body["ts"]), str(body["kind"]), body, str(body["prev"]), mac)
            )
            if len(out) >= limit:
                return out
    return out


class JournalExporter:
    """Background export of one chain; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        exporter: SpanExporter,
        resource: Resource,
        *,
        durable_seq: Callable[[], int] | None = None,
        pseudonymize: Callable[[str, str], str] | None = None,
        batch_size: int = 256,
        interval: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self._dir = directory
        self._exporter = exporter
        self._resource = resource
        self._durable_seq = durable_seq
        self._pseudonymize = pseudonymize
        self._batch = batch_size
        self._interval = interval
        self._max_backoff = max_backoff
        self._chain = directory.name
        self._position = read_position(directory)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="journal-export", daemon=True)

    @property
    def position(self) -> int:
        return self._position

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after one last attempt to export what is durable (bounded by ``timeout``)."""
        self._stop.set()
        self._thread.join(timeout)
        self._exporter.shutdown()

    def export_once(self) -> int:
        """Export one batch; return how many records were accepted (0: nothing or failure)."""
        upto = self._durable_seq() if self._durable_seq else None
        records = read_after(self._dir, self._position, self._batch, upto)
        if not records:
            return 0
        spans = [
            record_to_span(r, self._chain, self._resource, self._pseudonymize) for r in records
        ]
        if self._exporter.export(spans) is not SpanExportResult.SUCCESS:
            return 0
        self._position = records[-1].seq
        write_position(self._dir, self._position)
        return len(records)

    def _run(self) -> None:
        backoff = self._interval
        while True:
            try:
                sent = self.export_once()
            except Exception:  # never let the export thread die
                log.exception("audit export failed")
                sent = 0
            if self._stop.is_set() and not sent:
                return
            if sent == self._batch:
                backoff = self._interval
                continue  # more may be waiting
            if sent:
                backoff = self._interval
            elif read_after(self._dir, self._position, 1, None):
                backoff = min(self._max_backoff, backoff * 2)  # collector failing: back off
            self._stop.wait(backoff)
