"""A minimal OTLP/gRPC trace receiver (opentelemetry-proto), for tests of the real exporter."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def rows(request: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, attributes) of every span in one ExportTraceServiceRequest."""
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attrs: dict[str, Any] = {}
                for kv in span.attributes:
                    value = kv.value
                    kind = value.WhichOneof("value")
                    if kind == "array_value":
                        attrs[kv.key] = [v.string_value for v in value.array_value.values]
                    else:
                        attrs[kv.key] = getattr(value, kind)
                yield span.name, attrs


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Stores every export request; listens on 127.0.0.1 (plaintext, as a local collector would)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> Iterator[tuple[str, dict[str, Any]]]:
        with self._lock:
            requests = list(self.requests)
        for request in requests:
            yield from rows(request)
