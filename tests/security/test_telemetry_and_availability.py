"""Regression tests for the fixes that keep telemetry flowing, the control planes reachable and
the fuzzing findings fixed (see tests/security/README.md for how each test names the CHANGELOG
entry it guards)."""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from keybroker.adapters.telemetry import otlp_exporter, otlp_insecure
from keybroker.devenv import DevEnv
from keybroker.errors import ConfigurationError
from keybroker.settings import TelemetrySettings
from keybroker.v1 import privacy_pb2 as ppb
from tests.fuzz._common import CORPUS, HARNESSES
from tests.security.conftest import Start
from tests.security.support import Caller, new_id
from tests.support.clients import channel
from tests.support.otlp import Receiver

ROOT = Path(__file__).resolve().parents[2]


def test_an_http_otlp_endpoint_is_plaintext_whatever_otlp_insecure_says() -> None:
    """Unreleased, Security: "OTLP endpoints follow OpenTelemetry's convention: `http://host:port`
    is plaintext, `https://host:port` is TLS, and only `host:port` follows `[telemetry]
    otlp_insecure`".

    ``http://127.0.0.1:PORT`` with ``otlp_insecure`` left false delivers spans to a plaintext
    collector (before, it spoke TLS to it and every span was lost); an unknown scheme is refused
    at start."""
    receiver = Receiver()
    receiver.server.start()
    try:
        telemetry = TelemetrySettings(
            otlp_endpoint=f"http://127.0.0.1:{receiver.port}", otlp_insecure=False, otlp_timeout=2
        )
        assert otlp_insecure(telemetry)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(otlp_exporter(telemetry)))
        provider.get_tracer("regress").start_span("delivered").end()
        provider.shutdown()
        assert [name for name, _ in receiver.spans()] == ["delivered"]
    finally:
        receiver.server.stop(None)
    assert not otlp_insecure(TelemetrySettings(otlp_endpoint="https://collector:4317"))
    with pytest.raises(ConfigurationError, match="otlp_endpoint"):
        otlp_insecure(TelemetrySettings(otlp_endpoint="grpc://collector:4317"))


def test_idle_streams_cannot_starve_an_erasure(devenv: DevEnv, start: Start) -> None:
    """Unreleased, Fixed: "Streams can no longer starve the control planes (issue 14, item 10)".

    Eight health ``Watch`` streams left open and idle on two connections (twice the stream
    threads): an erasure still answers within seconds. Before, the watchers held every thread
    the privacy plane runs on and the erasure waited for ever."""
    broker = start()
    channels = [channel(devenv, broker.port, own_connection=True) for _ in range(2)]
    watches: list[Any] = [
        health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        for ch in channels
        for _ in range(4)
    ]
    caller = Caller(devenv, broker.port)
    try:
        time.sleep(0.5)  # the streams have reached the broker
        rec = new_id()
        caller.generate(rec)
        started = time.monotonic()
        caller.privacy.EraseRecording(
            ppb.EraseRecordingRequest(recording_id=rec, reason="art. 17"),
            metadata=[("authorization", f"Bearer {caller.dpo()}")],
            timeout=10,
        )
        assert time.monotonic() - started < 5
    finally:
        caller.close()
        for w in watches:
            w.cancel()
        for ch in channels:
            ch.close()


def _findings_per_harness() -> dict[str, int]:
    """Rows of docs/SECURITY.md's "What fuzzing found" table, per harness."""
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    table = text.split("### What fuzzing found", 1)[1].split("\n### ", 1)[0]
    counts: dict[str, int] = {}
    for harness in re.findall(r"^\| (\w+) \|", table, flags=re.MULTILINE):
        if harness != "harness":
            counts[harness] = counts.get(harness, 0) + 1
    return counts


def test_every_harness_and_every_past_finding_runs_in_make_test() -> None:
    """Unreleased, Security: "Fuzzing campaign with atheris over the wrapped-key parser (v1 and
    v2), the recording reader, JWT verification, the settings loader and every RPC".

    Each of the five targets has its harness and seed corpus and a seeded run in the suite;
    every finding listed in docs/SECURITY.md has its input under tests/fuzz/regressions/, which
    the suite replays."""
    assert set(HARNESSES) == {"wrapped_key", "recording", "tokens", "settings", "rpc"}
    fuzz = ROOT / "tests" / "fuzz"
    for harness in HARNESSES:
        assert (fuzz / f"fuzz_{harness}.py").is_file(), harness
        assert any((CORPUS / harness).iterdir()), harness
    suite = ast.parse((fuzz / "test_fuzz.py").read_text())
    tests = {n.name for n in ast.walk(suite) if isinstance(n, ast.FunctionDef)}
    assert {"test_seeded_run", "test_past_findings_stay_fixed"} <= tests
    findings = _findings_per_harness()
    assert findings, "the findings table is gone from docs/SECURITY.md"
    for harness, rows in findings.items():
        inputs = list((fuzz / "regressions" / harness).iterdir())
        assert len(inputs) >= rows, (harness, rows, inputs)
