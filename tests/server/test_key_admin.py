"""KeyAdmin and RewrapDataKeys over real mTLS, on SQLite and PostgreSQL, in one process and across
several broker processes sharing a store and the HSM token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from keybroker.adapters.hsm import Pkcs11Keks
from keybroker.adapters.journal import read_lines
from keybroker.core.broker import GenerateRequest, KeyBroker
from keybroker.core.decision import Decision
from keybroker.core.identity import Principal
from keybroker.core.wrapped_key import KeyRef, WrappedKey
from keybroker.devenv import DevEnv, mint_token
from keybroker.server.app import RunningBroker, connect_hsm, create_server
from keybroker.v1 import admin_pb2 as apb
from keybroker.v1 import admin_pb2_grpc as apb_grpc
from keybroker.v1 import keybroker_pb2 as pb
from tests.conftest import HSM_MODULES, Clock, load_settings
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, stop_all

ENABLED = apb.KEY_VERSION_STATE_ENABLED
DAY = 86400


def _overrides(store_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "state_url": store_url,
        "audit_dir": str(tmp_path / f"journal-{uuid.uuid4().hex[:6]}"),
        "state_usage_flush_interval": "0.2",
        "keys_retention_epochs": "false",  # these tests wrap under the keys they manage
        **extra,
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def admin_broker(
    devenv: DevEnv, store_url: str, tmp_path: Path, clock: Clock, hsm_settings: dict[str, str]
) -> Iterator[RunningBroker]:
    running = create_server(
        load_settings(devenv, **hsm_settings, **_overrides(store_url, tmp_path)), clock=clock
    )
    yield running
    running.stop(1)


@pytest.fixture(scope="module")
def keks(devenv: DevEnv) -> Pkcs11Keks:
    return connect_hsm(load_settings(devenv))


def admin_token(
    devenv: DevEnv, *, mfa: bool = True, scopes: tuple[str, ...] = ("keys:admin",)
) -> str:
    return mint_token(devenv, scopes=scopes, amr=["mfa", "pwd"] if mfa else ["pwd"])


def data_token(devenv: DevEnv) -> str:
    return mint_token(
        devenv, scopes=["keys:generate", "keys:unwrap", "keys:rewrap"], purposes=["support"]
    )


class Admin:
    """KeyAdmin stub with an MFA admin token; failures come back as (code, reason)."""

    def __init__(self, devenv: DevEnv, port: int, token: str | None = None) -> None:
        self._channel = channel(devenv, port, own_connection=True)
        self.stub = apb_grpc.KeyAdminStub(self._channel)  # type: ignore[no-untyped-call]
        self.token = token or admin_token(devenv)

    def __call__(self, method: str, **fields: Any) -> Any:
        request_type = {
            "CreateKey": apb.CreateKeyRequest,
            "GetKey": apb.GetKeyRequest,
            "ListKeys": apb.ListKeysRequest,
            "RotateKey": apb.RotateKeyRequest,
            "SetRotationPolicy": apb.SetRotationPolicyRequest,
            "DisableKeyVersion": apb.DisableKeyVersionRequest,
            "EnableKeyVersion": apb.KeyVersionRequest,
            "ScheduleKeyVersionDestruction": apb.ScheduleKeyVersionDestructionRequest,
            "CancelKeyVersionDestruction": apb.KeyVersionRequest,
        }[method]
        return getattr(self.stub, method)(request_type(**fields), metadata=auth(self.token))

    def refused(self, method: str, **fields: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            self(method, **fields)
        err: Any = info.value
        reason = dict(err.trailing_metadata() or ()).get("keybroker-reason", "")
        return err.code(), reason

    def close(self) -> None:
        self._channel.close()


def new_name() -> str:
    return f"k-{uuid.uuid4().hex[:10]}"


def journal_records(directory: Path) -> list[dict[str, Any]]:
    """The decisions in a journal directory, oldest first."""
    chains = sorted({path.parent for path in directory.rglob("journal-*.jsonl")})
    records = [json.loads(raw) for chain in chains for _where, raw in read_lines(chain)]
    return [r["d"] for r in records if r["kind"] == "decision"]


# -- authorization ---------------------------------------------------------------------------------


def test_admin_calls_need_the_admin_scope_and_mfa(
    devenv: DevEnv, admin_broker: RunningBroker, store_url: str, tmp_path: Path
) -> None:
    port = admin_broker.port
    no_scope = Admin(devenv, port, mint_token(devenv, scopes=["keys:unwrap"], amr=["mfa"]))
    assert no_scope.refused("ListKeys") == (grpc.StatusCode.PERMISSION_DENIED, "scope_missing")
    no_mfa = Admin(devenv, port, admin_token(devenv, mfa=False))
    assert no_mfa.refused("ListKeys") == (grpc.StatusCode.PERMISSION_DENIED, "mfa_required")
    assert no_mfa.refused("RotateKey", name="recordings")[1] == "mfa_required"
    admin = Admin(devenv, port)
    assert "recordings" in {k.name for k in admin("ListKeys").keys}
    for client in (no_scope, no_mfa, admin):
        client.close()
    relaxed = create_server(
        load_settings(devenv, **_overrides(store_url, tmp_path, auth_admin_require_mfa="false"))
    )
    try:
        client = Admin(devenv, relaxed.port, admin_token(devenv, mfa=False))
        assert client("GetKey", name="recordings").current_version >= 1
        client.close()
    finally:
        relaxed.stop(1)


# -- every RPC and refusal --------------------------------------------------------------------------


@pytest.mark.parametrize("hsm_settings", HSM_MODULES, indirect=True)
def test_key_admin_rpcs_and_their_refusals(
    devenv: DevEnv, admin_broker: RunningBroker, clock: Clock
) -> None:
    admin = Admin(devenv, admin_broker.port)
    name = new_name()
    key = admin("CreateKey", name=name, rotation_period_seconds=90 * DAY)
    assert (key.current_version, key.rotation_period_seconds) == (1, 90 * DAY)
    assert admin.refused("CreateKey", name=name) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "key_exists",
    )
    assert admin.refused("CreateKey", name="Bad Name")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert admin.refused("GetKey", name="missing-key")[0] == grpc.StatusCode.NOT_FOUND
    key = admin("RotateKey", name=name)
    assert key.current_version == 2
    assert [(v.version, v.state, v.current) for v in key.versions] == [
        (1, ENABLED, False),
        (2, ENABLED, True),
    ]
    assert admin.refused("DisableKeyVersion", name=name, version=2) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "key_version_current",
    )
    key = admin("DisableKeyVersion", name=name, version=1, decrypt_only=True)
    assert key.versions[0].state == apb.KEY_VERSION_STATE_DECRYPT_ONLY
    key = admin("DisableKeyVersion", name=name, version=1)
    assert key.versions[0].state == apb.KEY_VERSION_STATE_DISABLED
    key = admin("EnableKeyVersion", name=name, version=1)
    assert key.versions[0].state == ENABLED
    assert admin.refused(
        "ScheduleKeyVersionDestruction", name=name, version=1, window_seconds=60
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "destruction_window_too_short")
    key = admin("ScheduleKeyVersionDestruction", name=name, version=1)
    v1 = key.versions[0]
    assert v1.state == apb.KEY_VERSION_STATE_SCHEDULED_FOR_DESTRUCTION
    assert abs(v1.destroy_after.seconds - (clock() + 7 * DAY)) < 60
    key = admin("CancelKeyVersionDestruction", name=name, version=1)
    assert key.versions[0].state == apb.KEY_VERSION_STATE_DISABLED
    assert admin.refused("CancelKeyVersionDestruction", name=name, version=1)[0] == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    key = admin("SetRotationPolicy", name=name, min_decryption_version=2, rotate_after_wraps=1000)
    assert (key.min_decryption_version, key.rotate_after_wraps) == (2, 1000)
    assert key.rotation_period_seconds == 90 * DAY  # unset fields are kept
    key = admin("SetRotationPolicy", name=name, rotation_period_seconds=0)
    assert key.rotation_period_seconds == 0
    assert admin.refused("SetRotationPolicy", name=name, rotation_period_seconds=5)[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    admin.close()
    ops = [
        (r["operation"], r["outcome"])
        for r in journal_records(admin_broker.journal.directory)  # type: ignore[union-attr]
        if r.get("service") == "keybroker.v1.KeyAdmin" and r.get("key_name") == name
    ]
    assert ("RotateKey", "allow") in ops
    assert ("DisableKeyVersion", "deny") in ops
    assert ("CancelKeyVersionDestruction", "deny") in ops


@pytest.mark.parametrize("hsm_settings", HSM_MODULES, indirect=True)
def test_the_data_plane_follows_states_at_once(devenv: DevEnv, admin_broker: RunningBroker) -> None:
    admin = Admin(devenv, admin_broker.port)
    name = new_name()
    admin("CreateKey", name=name)
    token = data_token(devenv)
    with channel(devenv, admin_broker.port) as ch:
        kb = stub(ch)
        blob = kb.GenerateWrappedDataKey(
            generate_request(key_name=name), metadata=auth(token)
        ).wrapped_key
        admin("RotateKey", name=name)
        wait_until(lambda: admin_broker.catalog.snapshot().current(name).version == 2)  # type: ignore[union-attr]
        admin("DisableKeyVersion", name=name, version=1)
        wait_until(lambda: _unwrap_code(kb, token, blob) == grpc.StatusCode.FAILED_PRECONDITION)
        with pytest.raises(grpc.RpcError) as info:
            kb.UnwrapDataKey(_unwrap_request(blob), metadata=auth(token))
        err: Any = info.value
        assert "re-enable" in err.details()
    admin.close()


# -- bulk migration ---------------------------------------------------------------------------------


def test_rewrap_data_keys_migrates_ten_thousand_wrapped_keys(
    devenv: DevEnv, admin_broker: RunningBroker
) -> None:
    admin = Admin(devenv, admin_broker.port)
    name = new_name()
    admin("CreateKey", name=name)
    assert admin_broker.catalog is not None
    admin_broker.catalog.refresh()
    # Wrapping 10,000 keys through the broker's own use case is the fast way to make them.
    core = KeyBroker(
        admin_broker.keks,
        admin_broker.catalog,
        clock=time.time,
        default_key=name,
        default_retention_seconds=DAY,
    )
    who = Principal("s", "t", 2**40, frozenset({"keys:generate"}), frozenset({"support"}))
    blobs = [
        (
            f"rec-{i}",
            core.generate(
                who,
                GenerateRequest(f"rec-{i}", ["support"], [], None, name, {}),
                Decision(service="test", operation="seed"),
            ).wrapped_key,
        )
        for i in range(10_000)
    ]
    admin("RotateKey", name=name)
    wait_until(lambda: admin_broker.catalog.snapshot().current(name).version == 2)  # type: ignore[union-attr]
    token = data_token(devenv)
    migrated: list[pb.RewrapResult] = []
    with channel(devenv, admin_broker.port) as ch:
        kb = stub(ch)
        for start in range(0, len(blobs), 256):
            batch = [
                pb.RewrapDataKeyRequest(recording_id=r, wrapped_key=w)
                for r, w in blobs[start : start + 256]
            ]
            response = kb.RewrapDataKeys(
                pb.RewrapDataKeysRequest(items=batch), metadata=auth(token)
            )
            migrated.extend(response.results)
        assert len(migrated) == 10_000
        assert {(r.code, r.key_ref.version) for r in migrated} == {(0, 2)}
        for i in (0, 4_999, 9_999):
            request = _unwrap_request(migrated[i].wrapped_key, f"rec-{i}")
            assert kb.UnwrapDataKey(request, metadata=auth(token)).key_ref.version == 2
    admin_broker.catalog.flush_usage()
    v1, v2 = admin("GetKey", name=name).versions
    assert (v1.wraps, v1.unwraps) == (10_000, 10_000)  # nothing else uses v1 now
    assert v2.wraps == 10_000
    admin.close()


def test_rewrap_batch_has_a_result_per_item_and_limits(
    devenv: DevEnv, admin_broker: RunningBroker
) -> None:
    token = data_token(devenv)
    with channel(devenv, admin_broker.port) as ch:
        kb = stub(ch)
        good = kb.GenerateWrappedDataKey(generate_request("rec-a"), metadata=auth(token))
        tampered = bytearray(good.wrapped_key)
        tampered[-1] ^= 1
        items = [
            pb.RewrapDataKeyRequest(recording_id="rec-a", wrapped_key=good.wrapped_key),
            pb.RewrapDataKeyRequest(recording_id="rec-a", wrapped_key=bytes(tampered)),
            pb.RewrapDataKeyRequest(recording_id="rec-b", wrapped_key=good.wrapped_key),
        ]
        out = kb.RewrapDataKeys(pb.RewrapDataKeysRequest(items=items), metadata=auth(token))
        assert [(r.code, r.reason) for r in out.results] == [
            (0, ""),
            (grpc.StatusCode.INVALID_ARGUMENT.value[0], "wrapped_key_invalid"),
            (grpc.StatusCode.PERMISSION_DENIED.value[0], "recording_mismatch"),
        ]
        assert out.results[1].message == "wrapped key is invalid"
        assert not out.results[1].wrapped_key
        for size in (0, 257):
            with pytest.raises(grpc.RpcError) as info:
                kb.RewrapDataKeys(
                    pb.RewrapDataKeysRequest(items=[items[0]] * size), metadata=auth(token)
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        no_scope = mint_token(devenv, scopes=["keys:unwrap"], purposes=["support"])
        with pytest.raises(grpc.RpcError) as info:
            kb.RewrapDataKeys(pb.RewrapDataKeysRequest(items=items), metadata=auth(no_scope))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    records = journal_records(admin_broker.journal.directory)  # type: ignore[union-attr]
    batch = [r for r in records if r.get("operation") == "RewrapDataKeys"]
    assert [r["outcome"] for r in batch[:3]] == ["allow", "deny", "deny"]  # one per item


# -- replicas ---------------------------------------------------------------------------------------


def _replicas(
    devenv: DevEnv, tmp_path: Path, store_url: str, count: int = 2, **extra: str
) -> list[BrokerProcess]:
    procs = []
    for i in range(count):
        env = {
            "KEYBROKER_STATE_URL": store_url,
            "KEYBROKER_AUDIT_DIR": str(tmp_path / f"journal-{i}"),
            "KEYBROKER_SERVER_PROCESSES": "1",
            "KEYBROKER_KEYS_RETENTION_EPOCHS": "false",
            **{f"KEYBROKER_{k.upper()}": v for k, v in extra.items()},
        }
        procs.append(BrokerProcess(devenv, tmp_path / f"replica-{i}.log", env))
    return procs


def test_changes_through_one_replica_are_in_force_on_the_other_within_a_second(
    devenv: DevEnv, tmp_path: Path, store_url: str
) -> None:
    a, b = _replicas(devenv, tmp_path, store_url)
    try:
        port_a, port_b = a.wait_listening(), b.wait_listening()
        admin = Admin(devenv, port_a)
        name = new_name()
        token = data_token(devenv)
        with channel(devenv, port_b, own_connection=True) as ch:
            kb = stub(ch)
            admin("CreateKey", name=name)
            seen = time_until(lambda: _generate_version(kb, token, name) == 1)
            assert seen < 1.0
            blob = kb.GenerateWrappedDataKey(
                generate_request(key_name=name), metadata=auth(token)
            ).wrapped_key
            admin("RotateKey", name=name)
            assert time_until(lambda: _generate_version(kb, token, name) == 2) < 1.0
            admin("DisableKeyVersion", name=name, version=1)
            refused = time_until(
                lambda: _unwrap_code(kb, token, blob) == grpc.StatusCode.FAILED_PRECONDITION
            )
            assert refused < 1.0
            admin("EnableKeyVersion", name=name, version=1)
            assert time_until(lambda: _unwrap_code(kb, token, blob) is None) < 1.0
        admin.close()
    finally:
        assert stop_all([a, b]) == [0, 0]


def test_concurrent_rotations_from_two_processes_stay_consistent(
    devenv: DevEnv, tmp_path: Path, store_url: str, keks: Pkcs11Keks
) -> None:
    replicas = _replicas(devenv, tmp_path, store_url)
    try:
        ports = [r.wait_listening() for r in replicas]
        first = Admin(devenv, ports[0])
        name = new_name()
        first("CreateKey", name=name)
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def rotate(port: int) -> None:
            client = Admin(devenv, port)
            try:
                barrier.wait(10)
                for _ in range(5):
                    client("RotateKey", name=name)
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=rotate, args=(p,)) for p in ports * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [], "\n".join(r.output()[-6000:] for r in replicas)  # logs for CI
        key = first("GetKey", name=name)
        assert key.current_version == 21
        assert [v.version for v in key.versions] == list(range(1, 22))
        assert {v.state for v in key.versions} == {ENABLED}
        assert sum(v.current for v in key.versions) == 1
        on_token = {ref.version for ref in keks.versions_on_token() if ref.name == name}
        assert on_token == set(range(1, 22))  # every version has its HSM object, and no more
        first.close()
    finally:
        assert stop_all(replicas) == [0, 0]


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from keybroker import settings
    from keybroker.server.app import connect_hsm, open_store
    from keybroker.core.wrapped_key import KeyRef

    loaded = settings.load(Path(sys.argv[1]))
    store = open_store(loaded)
    keks = connect_hsm(loaded)
    name = sys.argv[2]
    version = store.claim_version(name, time.time(), None)  # store step 1: PENDING
    keks.create_version(KeyRef(name, version))  # HSM step
    os.kill(os.getpid(), signal.SIGKILL)  # killed before the store step that activates it
    """
)


def test_a_process_killed_between_the_hsm_and_store_steps_is_reconciled_at_start(
    devenv: DevEnv, tmp_path: Path, store_url: str, keks: Pkcs11Keks
) -> None:
    [replica] = _replicas(devenv, tmp_path, store_url, count=1)
    name = new_name()
    try:
        admin = Admin(devenv, replica.wait_listening())
        admin("CreateKey", name=name)
        admin.close()
    finally:
        assert stop_all([replica]) == [0]
    env = {**os.environ, "KEYBROKER_STATE_URL": store_url}
    crash = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(devenv.config), name],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert crash.returncode == -9, crash.stderr
    assert {r.version for r in keks.versions_on_token() if r.name == name} == {1, 2}
    [restarted] = _replicas(devenv, tmp_path, store_url, count=1, state_reconcile_after="0")
    try:
        admin = Admin(devenv, restarted.wait_listening())
        key = admin("GetKey", name=name)
        assert key.current_version == 2
        assert [(v.version, v.state) for v in key.versions] == [(1, ENABLED), (2, ENABLED)]
        admin.close()
    finally:
        assert stop_all([restarted]) == [0]
    records = journal_records(tmp_path / "journal-0")
    assert any(
        r.get("operation") == "Reconcile" and r.get("reason") == "rotation_completed"
        for r in records
        if r.get("key_name") == name
    )


# -- helpers ----------------------------------------------------------------------------------------


def _unwrap_request(blob: bytes, recording_id: str | None = None) -> pb.UnwrapDataKeyRequest:
    """An unwrap of ``blob`` (by default for the recording it was generated for)."""
    if recording_id is None:
        recording_id = WrappedKey.parse(blob).bindings.recording_id
    return pb.UnwrapDataKeyRequest(recording_id=recording_id, wrapped_key=blob, purpose="support")


def _unwrap_code(kb: Any, token: str, blob: bytes) -> grpc.StatusCode | None:
    try:
        kb.UnwrapDataKey(_unwrap_request(blob), metadata=auth(token))
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return None


def _generate_version(kb: Any, token: str, name: str) -> int:
    try:
        out = kb.GenerateWrappedDataKey(generate_request(key_name=name), metadata=auth(token))
    except grpc.RpcError:
        return 0
    version: int = out.key_ref.version
    return version


def time_until(condition: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until ``condition`` holds (polled every 10 ms); fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    time_until(condition, timeout)


def test_a_version_found_on_the_token_becomes_current_only_by_an_admin_call(
    devenv: DevEnv, admin_broker: RunningBroker, keks: Pkcs11Keks
) -> None:
    """A version that appears on the token without the broker (here v2 generated in the HSM,
    as `pkcs11-tool --keygen` by someone with the PIN would) is adopted at the next full
    reconcile as enabled but not current; only EnableKeyVersion with make_current (an MFA admin
    call, journaled) makes it current, and only for a version newer than the current one."""
    admin = Admin(devenv, admin_broker.port)
    name = new_name()
    admin("CreateKey", name=name)
    keks.create_version(KeyRef(name, 2))
    assert admin_broker.lifecycle is not None
    assert admin_broker.lifecycle.reconcile(full=True) >= 1
    key = admin("GetKey", name=name)
    assert key.current_version == 1
    assert [(v.version, v.state) for v in key.versions] == [(1, ENABLED), (2, ENABLED)]
    no_mfa = Admin(devenv, admin_broker.port, admin_token(devenv, mfa=False))
    assert no_mfa.refused("EnableKeyVersion", name=name, version=2, make_current=True) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "mfa_required",
    )
    no_mfa.close()
    key = admin("EnableKeyVersion", name=name, version=2, make_current=True)
    assert key.current_version == 2
    assert admin.refused("EnableKeyVersion", name=name, version=1, make_current=True) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "key_version_not_newer",
    )
    admin.close()
    records = journal_records(admin_broker.journal.directory)  # type: ignore[union-attr]
    ops = [
        (r["operation"], r["outcome"], r.get("reason"))
        for r in records
        if r.get("key_name") == name and r.get("key_version") == 2
    ]
    assert ("Reconcile", "allow", "adopted_from_hsm_not_current") in ops
    assert ("EnableKeyVersion", "allow") in {(op, outcome) for op, outcome, _ in ops}
