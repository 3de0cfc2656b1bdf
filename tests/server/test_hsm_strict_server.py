"""The broker as a user runs it (a `keybroker serve` process) on HSMs that behave unlike SoftHSM:
a KEK version that fails its wrap -> unwrap self-test is never used and health says NOT_SERVING;
a key object planted on the token with a known value is never used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker.devenv import TOKEN_LABEL, DevEnv, mint_token, provision, softhsm_module
from tests.conftest import code_of
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess
from tests.support.strict_pkcs11 import StrictModule

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def own_env(tmp_path: Path) -> DevEnv:
    return provision(tmp_path / "state", listen="127.0.0.1:0")


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


def _status(ch: grpc.Channel) -> int:
    health = health_pb2_grpc.HealthStub(ch)
    resp = health.Check(health_pb2.HealthCheckRequest(service="keybroker.v1.KeyBroker"), timeout=5)
    return int(resp.status)


def test_a_version_failing_its_self_test_is_never_used_and_health_says_so(
    own_env: DevEnv, strict_module: StrictModule, tmp_path: Path
) -> None:
    """On a module that uses its own GCM IV without reporting it, with the probe overridden
    (iv_source = caller), the start-up self-test of recordings/v1 fails: a log line names the
    version and the reason, health is NOT_SERVING, and GenerateDataKey is UNAVAILABLE."""
    overrides = {
        **strict_module.environ(iv="ignore"),
        "KEYBROKER_HSM_MODULE": str(strict_module.library),
        "KEYBROKER_HSM_IV_SOURCE": "caller",
        "KEYBROKER_KEYS_RETENTION_EPOCHS": "false",
        "KEYBROKER_HSM_HEALTH_INTERVAL": "0.2",
    }
    proc = BrokerProcess(own_env, tmp_path / "broker.log", overrides)
    try:
        port = proc.wait_listening()
        token = mint_token(own_env, scopes=["keys:generate"], purposes=["support"])
        with channel(own_env, port) as ch:
            _eventually(lambda: _status(ch) == NOT_SERVING)
            code, _ = code_of(
                lambda: stub(ch).GenerateDataKey(generate_request(), metadata=auth(token))
            )
            assert code is grpc.StatusCode.UNAVAILABLE
        assert "KEK recordings/v1 failed its self-test and is not used for new wraps" in (
            proc.output()
        )
    finally:
        proc.stop()


_PLANT = textwrap.dedent(
    """
    import sys
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass
    module, label, pin, value = sys.argv[1:5]
    token = pkcs11.lib(module).get_token(token_label=label)
    with token.open(rw=True, user_pin=pin) as session:
        for name in sys.argv[5:]:
            session.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: bytes.fromhex(value), Attribute.LABEL: name,
                Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
            })
    """
)


@pytest.mark.parametrize("module", ["softhsm", "strict"])
def test_a_planted_kek_is_never_used(
    own_env: DevEnv, strict_module: StrictModule, tmp_path: Path, module: str
) -> None:
    """Someone with the PIN creates kek:recordings:v99 and kek:planted:v1 with C_CreateObject
    from a known value before the broker starts. The broker reports both (error log, journaled
    Reconcile event, alert foreign_kek_object), never adopts them, and wraps under
    recordings/v1."""
    known = os.urandom(32)
    subprocess.run(
        [sys.executable, "-c", _PLANT, softhsm_module(), TOKEN_LABEL,
         own_env.pin_file.read_text().strip(), known.hex(),
         "kek:recordings:v99", "kek:planted:v1"],
        env={**os.environ, "SOFTHSM2_CONF": str(own_env.softhsm_conf.resolve())},
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    overrides = {"KEYBROKER_KEYS_RETENTION_EPOCHS": "false"}
    if module == "strict":
        overrides |= strict_module.environ()
        overrides["KEYBROKER_HSM_MODULE"] = str(strict_module.library)
    proc = BrokerProcess(own_env, tmp_path / "broker.log", overrides)
    try:
        port = proc.wait_listening()
        token = mint_token(own_env, scopes=["keys:generate"], purposes=["support"])
        with channel(own_env, port) as ch:
            kb = stub(ch)
            assert _status(ch) == SERVING
            gen = kb.GenerateDataKey(generate_request(), metadata=auth(token))
            assert (gen.key_ref.key_name, gen.key_ref.version) == ("recordings", 1)
            code, _ = code_of(
                lambda: kb.GenerateDataKey(
                    generate_request(key_name="planted"), metadata=auth(token)
                )
            )
            assert code is grpc.StatusCode.NOT_FOUND
        log = proc.output()
        for label in ("kek:recordings:v99", "kek:planted:v1"):
            assert f"object {label!r} on the token is not used" in log
        assert "alert foreign_kek_object" in log
        assert "keybroker.key.name=recordings keybroker.key.version=99" in log
    finally:
        proc.stop()
