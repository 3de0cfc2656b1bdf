"""A PKCS#11 error on a healthy token during unwrap is the HSM's fault, not the blob's (#14.12).

The strict-HSM test module (tests/support/strict_pkcs11) answers an error code to C_Decrypt only;
the token stays healthy. The caller gets UNAVAILABLE (which the SDK retries), never "wrapped key is
invalid", health stays SERVING, and the tamper-burst alert does not fire. A really tampered blob
on the same broker still reads INVALID_ARGUMENT and does fire it (so the alert is live)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker.devenv import DevEnv, mint_token, provision
from keybroker.v1 import keybroker_pb2 as pb
from tests.conftest import code_of
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess
from tests.support.strict_pkcs11 import StrictModule

TAMPER_ALERT = "alert tamper_burst"


@pytest.fixture
def strict(strict_module: StrictModule, tmp_path: Path) -> StrictModule:
    """The strict module with this test's own control file: an outage switched on here must not
    reach another user of the module in this test run (e.g. the session's in-process broker)."""
    return dataclasses.replace(
        strict_module, control=tmp_path / "strict-control", trace=tmp_path / "strict-trace"
    )


@pytest.fixture
def broker(tmp_path: Path, strict: StrictModule) -> Iterator[tuple[DevEnv, BrokerProcess, int]]:
    env = provision(tmp_path / "state", listen="127.0.0.1:0")
    strict.clear()
    proc = BrokerProcess(
        env,
        tmp_path / "broker.log",
        {
            "KEYBROKER_HSM_MODULE": str(strict.library),
            "KEYBROKER_ALERTS_TAMPER_COUNT": "2",
            "KEYBROKER_ALERTS_TAMPER_GLOBAL_COUNT": "2",
            **strict.environ(),
        },
    )
    port = proc.wait_listening()
    yield env, proc, port
    proc.stop()
    strict.clear()


@pytest.mark.parametrize(
    "code",
    [
        "CKR_DEVICE_MEMORY",
        "CKR_HOST_MEMORY",
        "CKR_FUNCTION_FAILED",
        "CKR_FUNCTION_NOT_SUPPORTED",
    ],
)
def test_a_module_error_during_unwrap_is_unavailable_and_no_tampering(
    broker: tuple[DevEnv, BrokerProcess, int], strict: StrictModule, code: str
) -> None:
    env, proc, port = broker
    token = mint_token(env, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    with channel(env, port) as ch:
        kb = stub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        request = generate_request()
        gen = kb.GenerateDataKey(request, metadata=auth(token))
        unwrap = pb.UnwrapDataKeyRequest(
            recording_id=request.recording_id, wrapped_key=gen.wrapped_key, purpose="support"
        )

        strict.fail(code, ["C_Decrypt"])
        for _ in range(4):
            assert code_of(lambda: kb.UnwrapDataKey(unwrap, metadata=auth(token))) == (
                grpc.StatusCode.UNAVAILABLE,
                "key store temporarily unavailable",
            )
        serving = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert serving.status == health_pb2.HealthCheckResponse.SERVING
        assert TAMPER_ALERT not in proc.output()

        strict.clear()
        assert kb.UnwrapDataKey(unwrap, metadata=auth(token)).data_key == gen.data_key
        tampered = bytearray(gen.wrapped_key)
        tampered[-1] ^= 1
        bad = pb.UnwrapDataKeyRequest(
            recording_id=request.recording_id, wrapped_key=bytes(tampered), purpose="support"
        )
        for _ in range(2):
            assert code_of(lambda: kb.UnwrapDataKey(bad, metadata=auth(token))) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "wrapped key is invalid",
            )
    proc_log = proc.output()
    assert TAMPER_ALERT in proc_log, proc_log
    assert proc.proc.poll() is None
