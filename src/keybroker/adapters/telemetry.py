"""OpenTelemetry: SDK set-up at start-up and decision records as spans.

Code elsewhere uses only the OTel API. Attribute names are stable and documented in docs/AUDIT.md;
they never carry key material, wrapped blobs or tokens.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

from keybroker import __version__
from keybroker.adapters.files import create_private
from keybroker.core.decision import Decision, Outcome
from keybroker.errors import ConfigurationError
from keybroker.settings import TelemetrySettings

log = logging.getLogger(__name__)

TRACER_NAME = "keybroker"


#: Namespace of the name-based (v5) UUIDs this broker gives its worker processes.
INSTANCE_NAMESPACE = uuid.UUID("8f0c7a52-4d0e-5b8e-9d5c-6b1f3e2a7c10")


def instance_id(host: str, place: Path, worker: int) -> str:
    """``service.instance.id`` of worker ``worker``: a UUID v5 of the host name, the broker's
    journal (or state) directory and the worker index, as OpenTelemetry's semantic conventions
    suggest. Unique among running brokers (no two brokers share a journal directory: the lock
    refuses it) and stable across restarts, so a restart continues its series."""
    return str(uuid.uuid5(INSTANCE_NAMESPACE, f"{host}\0{place}\0{worker}"))


def resource(
    settings: TelemetrySettings, *, instance: str = "", worker: int | None = None
) -> Resource:
    """The OpenTelemetry resource: ``service.name``, ``service.version`` and, for a worker
    process, ``service.instance.id`` (:func:`instance_id`) and ``keybroker.worker`` (its index),
    so that series and spans of several workers never merge."""
    attributes: dict[str, str | int] = {
        "service.name": settings.service_name,
        "service.version": __version__,
    }
    if instance:
        attributes["service.instance.id"] = instance
    if worker is not None:
        attributes["keybroker.worker"] = worker
    return Resource.create(attributes)


def otlp_insecure(settings: TelemetrySettings) -> bool:
    """Whether ``otlp_endpoint`` is plaintext, by OpenTelemetry's convention: ``http://`` is
    plaintext, ``https://`` is TLS, and only an endpoint without a scheme (``host:port``) follows
    ``otlp_insecure``. Any other scheme is a configuration error (never a silent guess).

    The SDK exporters take an explicit ``insecure=False`` over an ``http://`` scheme and then
    speak TLS to a plaintext collector, losing every span; so the scheme is decided here."""
    endpoint = settings.otlp_endpoint.strip()
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return settings.otlp_insecure
    scheme = scheme.lower()
    if scheme not in ("http", "https") or not rest.strip("/"):
        raise ConfigurationError(
            f"[telemetry] otlp_endpoint {endpoint!r}: use http://host:port (plaintext), "
            "https://host:port (TLS) or host:port (TLS unless otlp_insecure = true)"
        )
    return scheme == "http"


def otlp_exporter(settings: TelemetrySettings) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=settings.otlp_endpoint,
        insecure=otlp_insecure(settings),
        timeout=settings.otlp_timeout,
    )


def configure_tracing(
    settings: TelemetrySettings,
    *,
    extra_processor: SpanProcessor | None = None,
    otlp: bool = True,
    service: Resource | None = None,
) -> tuple[TracerProvider, bool]:
    """Build the tracer provider for live spans.

    With ``otlp`` (no audit journal), spans go to ``otlp_endpoint`` directly, best-effort. With a
    journal, OTLP export runs from the journal instead (no loss), so live spans skip it. Returns
    the provider and whether anything consumes live spans (if not, the broker makes none).
    ``service``: the resource (default: :func:`resource` without instance attributes).
    """
    consumers = 0
    provider = TracerProvider(resource=service or resource(settings))
    if settings.otlp_endpoint and otlp:
        provider.add_span_processor(BatchSpanProcessor(otlp_exporter(settings)))
        consumers += 1
    if settings.span_file is not None:
        lines = JsonLinesSpanExporter(settings.span_file)
        provider.add_span_processor(BatchSpanProcessor(lines, schedule_delay_millis=500))
        consumers += 1
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
        consumers += 1
    return provider, consumers > 0


class JsonLinesSpanExporter(SpanExporter):
    """Appends each span as one JSON line to a file (development and demos)."""

    def __init__(self, path: Path) -> None:
        create_private(path)  # 0600 whatever the umask (spans name principals and peers)
        self._out = path.open("a", encoding="utf-8")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self._out.write(span.to_json(indent=None) + "\n")
        self._out.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._out.close()


def decision_attributes(d: Decision) -> dict[str, str | int | list[str]]:
    """The span attributes of a decision (see docs/AUDIT.md)."""
    attrs: dict[str, str | int | list[str]] = {
        "rpc.system": "grpc",
        "rpc.service": d.service,
        "rpc.method": d.operation,
        "rpc.grpc.status_code_name": d.status_code,
        "keybroker.decision": d.outcome.value,
        "keybroker.reason": d.reason,
    }
    optional: dict[str, str | int | None] = {
        "keybroker.principal.sub": d.subject,
        "keybroker.token.jti": d.token_id,
        "keybroker.token.client_id": d.client_id,
        "keybroker.client_cert.identity": d.cert_identity,
        "keybroker.client_cert.sha256": d.cert_thumbprint,
        "client.address": d.peer_address,
        "keybroker.recording.id": d.recording_id,
        "keybroker.key.name": d.key_name,
        "keybroker.key.version": d.key_version,
        "keybroker.reference": d.reference,
        "keybroker.justification": d.justification,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    if d.purposes:
        attrs["keybroker.purposes"] = list(d.purposes)
    if d.subject_ids:
        attrs["keybroker.subject.ids"] = list(d.subject_ids)
    if d.purposes_added:
        attrs["keybroker.purposes.added"] = list(d.purposes_added)
    if d.purposes_removed:
        attrs["keybroker.purposes.removed"] = list(d.purposes_removed)
    return attrs


class NoRecorder:
    """Nothing consumes live spans: make none (the journal is the record)."""

    def record(self, decision: Decision) -> None:
        return None


class SpanRecorder:
    """Records each decision as one SERVER span, joined to the caller's trace."""

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self._tracer = (provider or trace.get_tracer_provider()).get_tracer(
            TRACER_NAME, __version__
        )

    def record(self, decision: Decision) -> None:
        parent = propagate.extract(decision.trace_context) if decision.trace_context else None
        span = self._tracer.start_span(
            f"{decision.service}/{decision.operation}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=decision.started_ns or None,
            attributes=decision_attributes(decision),
        )
        if decision.outcome is Outcome.ERROR:
            span.set_status(Status(StatusCode.ERROR, decision.reason))
        span.end(end_time=decision.ended_ns or None)
