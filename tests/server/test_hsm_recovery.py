"""HSM loss and recovery without restart: UNAVAILABLE and NOT_SERVING while the HSM is gone,
serving again by itself within 10 s once it is back, in the same process.

Every outage form of issue #18 is one case: the token directory removed, emptied (then refilled),
its files replaced (by another token with the same label and another PIN: the login fails), and
the module answering CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_REMOVED, CKR_SESSION_HANDLE_INVALID or
CKR_GENERAL_ERROR to every call, or refusing the login (the strict-HSM test module's control file,
tests/support/strict_pkcs11)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker.devenv import TOKEN_LABEL, DevEnv, mint_token, provision
from keybroker.v1 import keybroker_pb2 as pb
from tests.conftest import code_of
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess
from tests.support.strict_pkcs11 import StrictModule

RECOVERY_SECONDS = 10.0
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "key store temporarily unavailable")


@pytest.fixture
def strict(strict_module: StrictModule, tmp_path: Path) -> StrictModule:
    """The strict module with this test's own control file: an outage switched on here must not
    reach another user of the module in this test run (e.g. the session's in-process broker)."""
    return dataclasses.replace(
        strict_module, control=tmp_path / "strict-control", trace=tmp_path / "strict-trace"
    )


@pytest.fixture
def own_env(tmp_path: Path) -> DevEnv:
    return provision(tmp_path / "state", listen="127.0.0.1:0")


def _eventually(check: Callable[[], bool], timeout: float = RECOVERY_SECONDS) -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


@dataclass
class Outage:
    """How to take the HSM away and give it back."""

    start: Callable[[], None]
    end: Callable[[], None]
    between: Callable[[], None] = lambda: None
    """Runs while the HSM is away, after the calls were checked (e.g. a second phase)."""


def _round_trip(env: DevEnv, proc: BrokerProcess, port: int, outage: Outage) -> None:
    """The contract for every outage form."""
    token = mint_token(env, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    with channel(env, port) as ch:
        kb = stub(ch)
        health = health_pb2_grpc.HealthStub(ch)

        def status() -> int:
            resp = health.Check(
                health_pb2.HealthCheckRequest(service="keybroker.v1.KeyBroker"), timeout=5
            )
            return int(resp.status)

        request = generate_request()
        gen = kb.GenerateDataKey(request, metadata=auth(token))
        unwrap = pb.UnwrapDataKeyRequest(
            recording_id=request.recording_id, wrapped_key=gen.wrapped_key, purpose="support"
        )
        assert status() == health_pb2.HealthCheckResponse.SERVING

        outage.start()
        _eventually(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
        for call in (
            lambda: kb.GenerateDataKey(generate_request(), metadata=auth(token)),
            lambda: kb.UnwrapDataKey(unwrap, metadata=auth(token)),
        ):
            assert code_of(call) == UNAVAILABLE
        outage.between()
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert code_of(lambda: kb.UnwrapDataKey(unwrap, metadata=auth(token))) == UNAVAILABLE

        outage.end()

        def serving() -> bool:
            if status() != health_pb2.HealthCheckResponse.SERVING:
                return False
            try:
                return bool(kb.UnwrapDataKey(unwrap, metadata=auth(token)).data_key == gen.data_key)
            except grpc.RpcError:
                return False

        _eventually(serving)
        assert len(kb.GenerateDataKey(generate_request(), metadata=auth(token)).data_key) == 32
    assert proc.proc.poll() is None, "the broker must not restart or die"
    log = proc.output()
    assert "unexpected error" not in log, log  # guard.py's line for an error that became INTERNAL


@pytest.fixture
def softhsm_broker(own_env: DevEnv, tmp_path: Path) -> Iterator[tuple[BrokerProcess, int]]:
    proc = BrokerProcess(own_env, tmp_path / "broker.log", {"KEYBROKER_HSM_HEALTH_INTERVAL": "0.2"})
    port = proc.wait_listening()
    yield proc, port
    proc.stop()


def _other_token(tmp_path: Path) -> Path:
    """A second SoftHSM token directory: same label, other PINs, no keys."""
    root = tmp_path / "impostor"
    tokens = root / "tokens"
    tokens.mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
         "--pin", "other-user-pin", "--so-pin", "other-so-pin"],
        env={"SOFTHSM2_CONF": str(conf), "PATH": "/usr/bin:/bin"},
        check=True, capture_output=True,
    )  # fmt: skip
    return tokens


def _token_outage(form: str, env: DevEnv, tmp_path: Path) -> Outage:
    tokens = env.token_dir
    away = tmp_path / "tokens-away"
    if form == "removed":

        def remove() -> None:
            tokens.rename(away)

        def put_back() -> None:
            away.rename(tokens)

        return Outage(remove, put_back)

    def empty() -> None:
        away.mkdir()
        for entry in tokens.iterdir():
            entry.rename(away / entry.name)

    def refill() -> None:
        for entry in away.iterdir():
            entry.rename(tokens / entry.name)

    if form == "emptied":
        return Outage(empty, refill)
    assert form == "replaced"
    impostor = _other_token(tmp_path)

    def replace() -> None:
        empty()
        for entry in impostor.iterdir():
            shutil.copytree(entry, tokens / entry.name)

    def restore() -> None:
        for entry in list(tokens.iterdir()):
            shutil.rmtree(entry)
        refill()

    return Outage(replace, restore)


@pytest.mark.parametrize("form", ["removed", "emptied", "replaced"])
def test_token_files_outage_recovers_without_restart(
    own_env: DevEnv, softhsm_broker: tuple[BrokerProcess, int], tmp_path: Path, form: str
) -> None:
    """The token directory removed, emptied then refilled (once logged `hsm reconnect failed:
    ConfigurationError` every second forever), or its files replaced by another token whose PIN
    differs (the login fails): UNAVAILABLE and NOT_SERVING while it lasts, then serving again
    within 10 s with the same process, and old wrapped keys still unwrap."""
    proc, port = softhsm_broker
    _round_trip(own_env, proc, port, _token_outage(form, own_env, tmp_path))
    if form == "replaced":
        assert "hsm_login_failed" in proc.output()


@pytest.fixture
def strict_broker(
    own_env: DevEnv, tmp_path: Path, strict: StrictModule
) -> Iterator[tuple[BrokerProcess, int]]:
    """The broker on the strict-HSM test module, as strict as it gets (its own GCM IVs, no
    C_CopyObject)."""
    strict.clear()
    environ = {
        "KEYBROKER_HSM_HEALTH_INTERVAL": "0.2",
        "KEYBROKER_HSM_MODULE": str(strict.library),
        **strict.environ(),
    }
    proc = BrokerProcess(own_env, tmp_path / "broker.log", environ)
    port = proc.wait_listening()
    yield proc, port
    proc.stop()
    strict.clear()


@pytest.mark.parametrize(
    "code",
    [
        "CKR_TOKEN_NOT_PRESENT",
        "CKR_DEVICE_REMOVED",
        "CKR_SESSION_HANDLE_INVALID",
        "CKR_GENERAL_ERROR",
    ],
)
def test_module_error_outage_recovers_without_restart(
    own_env: DevEnv,
    strict_broker: tuple[BrokerProcess, int],
    strict: StrictModule,
    code: str,
) -> None:
    """The module answers ``code`` to every call for a while: UNAVAILABLE (never
    INVALID_ARGUMENT or INTERNAL) and NOT_SERVING, then serving again within 10 s."""
    proc, port = strict_broker
    _round_trip(own_env, proc, port, Outage(lambda: strict.fail(code), strict.clear))


def test_refused_login_outage_recovers_without_restart(
    own_env: DevEnv, strict_broker: tuple[BrokerProcess, int], strict: StrictModule
) -> None:
    """The device goes away, and when it answers again it refuses the login for a while
    (CKR_PIN_INCORRECT from C_Login only): still UNAVAILABLE, never a configuration error that
    stops the process; serving again within 10 s of the login working."""
    proc, port = strict_broker

    def refuse_login() -> None:
        strict.fail("0xA0", ["C_Login"])  # CKR_PIN_INCORRECT
        _eventually(lambda: "hsm_login_failed" in proc.output())

    _round_trip(
        own_env,
        proc,
        port,
        Outage(lambda: strict.fail("CKR_DEVICE_REMOVED"), strict.clear, refuse_login),
    )
