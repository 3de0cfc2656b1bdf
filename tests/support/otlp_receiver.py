"""An OTLP/gRPC trace receiver as its own process, so tests can kill and restart it.

``python -m tests.support.otlp_receiver PORT OUT`` appends one JSON line per received span
(name and attributes) to OUT. It exits on SIGTERM, and by itself after 300 s at most.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.support.otlp import rows


class FileReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out: Path) -> None:
        self._out = out.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        lines = [json.dumps({"name": n, "attributes": a}) + "\n" for n, a in rows(request)]
        with self._lock:
            self._out.writelines(lines)
            self._out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(FileReceiver(out), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("receiver ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait(300)
    server.stop(None)


if __name__ == "__main__":
    main()
