"""OTLP endpoints follow OpenTelemetry's convention (issue #14, item 14): ``http://`` is plaintext,
``https://`` is TLS, and only ``host:port`` follows ``[telemetry] otlp_insecure``. Before, an
``http://collector:4317`` endpoint with ``otlp_insecure`` left at false silently spoke TLS to a
plaintext collector and every span was lost."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from keybroker.adapters.telemetry import otlp_exporter, otlp_insecure
from keybroker.devenv import DevEnv, mint_token
from keybroker.errors import ConfigurationError
from keybroker.settings import TelemetrySettings
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.otlp import Receiver
from tests.support.process import BrokerProcess


@pytest.mark.parametrize(
    ("endpoint", "setting", "plaintext"),
    [
        ("http://collector:4317", False, True),
        ("HTTP://collector:4317", False, True),
        ("https://collector:4317", True, False),
        ("collector:4317", False, False),
        ("collector:4317", True, True),
    ],
)
def test_the_scheme_decides_and_otlp_insecure_only_without_one(
    endpoint: str, setting: bool, plaintext: bool
) -> None:
    """The scheme wins over ``otlp_insecure``; without a scheme the setting decides."""
    telemetry = TelemetrySettings(otlp_endpoint=endpoint, otlp_insecure=setting)
    assert otlp_insecure(telemetry) is plaintext


@pytest.mark.parametrize("endpoint", ["grpc://collector:4317", "unix:///tmp/otel", "http://"])
def test_an_unknown_scheme_is_a_configuration_error(endpoint: str) -> None:
    """Anything but http, https or host:port is refused at start-up, never guessed."""
    with pytest.raises(ConfigurationError, match="otlp_endpoint"):
        otlp_insecure(TelemetrySettings(otlp_endpoint=endpoint))


def test_a_broker_with_an_http_endpoint_delivers_spans(devenv: DevEnv, tmp_path: Path) -> None:
    """A broker given ``http://127.0.0.1:PORT`` (``otlp_insecure`` left false) delivers its
    journal's spans to a plaintext OTLP receiver while it runs."""
    receiver = Receiver()
    receiver.server.start()
    try:
        proc = BrokerProcess(
            devenv,
            tmp_path / "b.log",
            {
                "KEYBROKER_TELEMETRY_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                "KEYBROKER_TELEMETRY_OTLP_INSECURE": "false",
                "KEYBROKER_TELEMETRY_OTLP_TIMEOUT": "2",
                "KEYBROKER_AUDIT_DIR": str(tmp_path / "journal"),
            },
        )
        try:
            port = proc.wait_listening()
            token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
            with channel(devenv, port) as ch:
                stub(ch).GenerateDataKey(
                    generate_request(recording_id="rec-http-otlp"), metadata=auth(token)
                )
            deadline = time.monotonic() + 20
            names: set[str] = set()
            while time.monotonic() < deadline and (
                "keybroker.v1.KeyBroker/GenerateDataKey" not in names
            ):
                time.sleep(0.2)
                names = {name for name, _ in receiver.spans()}
            assert "keybroker.v1.KeyBroker/GenerateDataKey" in names, proc.output()[-2000:]
        finally:
            assert proc.stop(signal.SIGTERM) == 0
    finally:
        receiver.server.stop(None)


def test_the_exporter_speaks_plaintext_to_an_http_endpoint() -> None:
    """The span exporter built from settings reaches a plaintext receiver over ``http://``."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    receiver = Receiver()
    receiver.server.start()
    try:
        telemetry = TelemetrySettings(
            otlp_endpoint=f"http://127.0.0.1:{receiver.port}", otlp_timeout=2
        )
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(otlp_exporter(telemetry)))
        provider.get_tracer("t").start_span("probe").end()
        provider.shutdown()
        assert [name for name, _ in receiver.spans()] == ["probe"]
    finally:
        receiver.server.stop(None)
