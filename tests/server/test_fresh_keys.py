"""A key made a moment ago is never "invalid" elsewhere (issue 14, item 11).

Two brokers share one metadata store (SQLite file or PostgreSQL) and one SoftHSM token, as two
worker processes or two replicas do. Broker B's background catalog reload is stopped, so it holds
the key state of before A made a retention-epoch key: exactly the window in which, before the
fix, B answered an unwrap of A's new key with INVALID_ARGUMENT "wrapped key is invalid".
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from keybroker.adapters.catalog import CachedCatalog
from keybroker.core.wrapped_key import KeyRef
from keybroker.devenv import DevEnv, mint_token
from keybroker.errors import KeyStateStaleError
from keybroker.server.app import RunningBroker, connect_hsm, create_server
from keybroker.server.status import REASON_METADATA
from keybroker.v1 import keybroker_pb2 as pb
from tests.conftest import load_settings
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, free_port, stop_all

DAY = 86400


@pytest.fixture
def base_key(devenv: DevEnv) -> Iterator[str]:
    """A key of this test's own (its epoch keys are new to every broker)."""
    keks = connect_hsm(load_settings(devenv))
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    keks.create_version(KeyRef(name, 1))
    yield name
    for ref in keks.versions_on_token():
        if ref.name.startswith(name):
            keks.destroy_version(ref)


@pytest.fixture
def pair(
    devenv: DevEnv, store_url: str, tmp_path: Path, base_key: str
) -> Iterator[tuple[RunningBroker, RunningBroker]]:
    brokers = []
    for i in range(2):
        settings = load_settings(
            devenv,
            state_url=store_url,
            audit_dir=str(tmp_path / f"journal-{i}"),
            keys_retention_epoch="1d",
            state_refresh_interval="60",
            state_scheduler_interval="3600",
        )
        brokers.append(create_server(settings))
    a, b = brokers
    assert b.catalog is not None
    b.catalog.stop()  # B now only reloads when a call makes it: its state is A's of before
    try:
        yield a, b
    finally:
        for broker in brokers:
            broker.stop(1)


def _reason(err: Any) -> str:
    return str(dict(err.trailing_metadata() or ()).get(REASON_METADATA, ""))


def _generate(devenv: DevEnv, port: int, base_key: str, days: int) -> pb.GenerateDataKeyResponse:
    token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
    request = generate_request(recording_id=f"rec-{uuid.uuid4().hex[:8]}", key_name=base_key)
    request.retain_until.CopyFrom(Timestamp(seconds=int(time.time()) + days * DAY))
    with channel(devenv, port, own_connection=True) as ch:
        response: pb.GenerateDataKeyResponse = stub(ch).GenerateDataKey(
            request, metadata=auth(token)
        )
    return response


def _generate_within_budget(
    devenv: DevEnv, port: int, base_key: str, days: int
) -> pb.GenerateDataKeyResponse:
    """:func:`_generate`, again on a new connection when the worker that answered has used its
    budget of new epoch keys (6 a minute per process: UNAVAILABLE ``epoch_key_rate_limited``,
    the documented retryable answer); the other worker has budget left (bounded: 40 tries)."""
    for _ in range(40):
        try:
            return _generate(devenv, port, base_key, days)
        except grpc.RpcError as exc:
            unavailable = exc.code() is grpc.StatusCode.UNAVAILABLE
            if not unavailable or _reason(exc) != "epoch_key_rate_limited":
                raise
            time.sleep(0.1)
    raise AssertionError("no worker had budget for a new epoch key")


def _unwrap(devenv: DevEnv, port: int, rec: str, blob: bytes) -> pb.UnwrapDataKeyResponse:
    token = mint_token(devenv, scopes=["keys:unwrap"], purposes=["support"])
    with channel(devenv, port, own_connection=True) as ch:
        response: pb.UnwrapDataKeyResponse = stub(ch).UnwrapDataKey(
            pb.UnwrapDataKeyRequest(recording_id=rec, wrapped_key=blob, purpose="support"),
            metadata=auth(token),
        )
    return response


def test_an_epoch_key_made_on_one_broker_unwraps_at_once_on_the_other(
    devenv: DevEnv, pair: tuple[RunningBroker, RunningBroker], base_key: str
) -> None:
    """B has never loaded the epoch key A just made: it reloads on the miss and unwraps."""
    a, b = pair
    made = _generate(devenv, a.port, base_key, days=3)
    assert made.key_ref.key_name != base_key  # a new retention-epoch key, made by A just now
    assert b.catalog is not None
    assert made.key_ref.key_name not in b.catalog.snapshot().keys  # B's state predates it
    rec = _record_of(made)
    unwrapped = _unwrap(devenv, b.port, rec, made.wrapped_key)
    assert unwrapped.data_key == made.data_key
    assert unwrapped.key_ref == made.key_ref


def test_a_key_new_to_the_broker_is_generated_with_at_once(
    devenv: DevEnv, pair: tuple[RunningBroker, RunningBroker], base_key: str
) -> None:
    """GenerateDataKey naming a key created through A a moment ago is not NOT_FOUND on B."""
    a, b = pair
    assert a.lifecycle is not None
    name = f"{base_key}-new"
    a.lifecycle.create(name)
    made = _generate(devenv, b.port, name, days=5)
    assert made.key_ref.key_name.startswith(name)


def test_a_key_seen_mid_creation_is_generated_with_once_created(
    devenv: DevEnv, pair: tuple[RunningBroker, RunningBroker], base_key: str
) -> None:
    """CreateKey commits twice (the key with no current version, then version 1 active). B
    read the store between the two: the key is in its snapshot, but with no current version.
    Once CreateKey has returned, GenerateDataKey naming it on B is not NOT_FOUND: B decides on
    fresh state (found by tests/deploy/test_three_replicas.py)."""
    a, b = pair
    assert a.store is not None and b.catalog is not None
    name = f"{base_key}-mid"
    assert a.store.create_key(name, time.time(), rotation_period=None, rotate_after_wraps=2**28)
    b.catalog.refresh()
    assert b.catalog.snapshot().keys[name].current_version == 0  # B saw it mid-creation
    a.keks.create_version(KeyRef(name, 1))
    a.store.activate_version(name, 1, time.time())  # CreateKey's end: version 1 is current
    made = _generate(devenv, b.port, name, days=13)
    assert made.key_ref.key_name.startswith(name)


def test_a_version_destroyed_meanwhile_is_destroyed_not_invalid(
    devenv: DevEnv, pair: tuple[RunningBroker, RunningBroker], base_key: str
) -> None:
    """B's state still lists the version as enabled but its HSM object is gone (shredded through
    A): B reloads and says destroyed (FAILED_PRECONDITION), not "wrapped key is invalid"."""
    a, b = pair
    made = _generate(devenv, a.port, base_key, days=11)
    assert b.catalog is not None and a.lifecycle is not None
    b.catalog.refresh()  # B knows the version as enabled (and has no handle for it yet)
    assert made.key_ref.key_name in b.catalog.snapshot().keys
    assert a.privacy is not None  # the registry keeps the blob A issued (flushed in seconds,
    a.privacy.flush_registry()  # long before any real destruction): so B may say "destroyed"
    assert a.lifecycle.shred(made.key_ref.key_name, "test") == 1
    with pytest.raises(grpc.RpcError) as info:
        _unwrap(devenv, b.port, _record_of(made), made.wrapped_key)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(info.value) == "key_version_destroyed"


def test_a_version_unknown_after_a_fresh_reload_is_invalid(
    devenv: DevEnv, pair: tuple[RunningBroker, RunningBroker], base_key: str
) -> None:
    """A version the shared store does not know, even freshly read, is still a bad blob."""
    a, b = pair
    made = _generate(devenv, a.port, base_key, days=7)
    forged = _with_version(made.wrapped_key, made.key_ref.version + 5)
    with pytest.raises(grpc.RpcError) as info:
        _unwrap(devenv, b.port, _record_of(made), forged)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(info.value) == "wrapped_key_invalid"


def test_a_replica_that_cannot_reload_answers_unavailable_not_invalid(
    devenv: DevEnv, pair: tuple[RunningBroker, RunningBroker], base_key: str
) -> None:
    """Store unreachable at the moment of the miss: UNAVAILABLE (retryable), reason
    key_state_stale; once it can reload, the same blob unwraps."""
    a, b = pair
    made = _generate(devenv, a.port, base_key, days=9)
    assert b.store is not None
    real = b.store.generation

    def unreachable() -> int:
        raise OSError("store down")

    b.store.generation = unreachable  # type: ignore[method-assign]
    try:
        with pytest.raises(grpc.RpcError) as info:
            _unwrap(devenv, b.port, _record_of(made), made.wrapped_key)
    finally:
        b.store.generation = real  # type: ignore[method-assign]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _reason(info.value) == "key_state_stale"
    assert _unwrap(devenv, b.port, _record_of(made), made.wrapped_key).data_key == made.data_key


def test_forced_reloads_are_rate_limited(tmp_path: Path, devenv: DevEnv) -> None:
    """Once the burst is spent, a miss costs the store nothing: the caller gets
    KeyStateStaleError rather than a verdict on state read before it asked."""
    from keybroker.server.app import open_store

    store = open_store(load_settings(devenv, state_url=f"sqlite:{tmp_path / 'kb.db'}"))
    reads = 0
    real = store.generation

    def counted() -> int:
        nonlocal reads
        reads += 1
        return real()

    store.generation = counted  # type: ignore[method-assign]
    catalog = CachedCatalog(store, miss_refresh_burst=3, miss_refresh_rate=0.01)
    try:
        for _ in range(3):
            catalog.fresh_snapshot()
        with pytest.raises(KeyStateStaleError):
            catalog.fresh_snapshot()
        assert reads == 3
    finally:
        store.close()


def _record_of(made: pb.GenerateDataKeyResponse) -> str:
    from keybroker.core.wrapped_key import WrappedKey

    return WrappedKey.parse(made.wrapped_key).bindings.recording_id


def _with_version(blob: bytes, version: int) -> bytes:
    """The same blob claiming another version of its key (header edited, tag now wrong)."""
    from keybroker.core.wrapped_key import WrappedKey

    parsed = WrappedKey.parse(blob)
    header = WrappedKey.header(KeyRef(parsed.key.name, version), parsed.nonce, parsed.bindings)
    return header + parsed.ciphertext


def test_two_worker_processes_unwrap_each_others_new_epoch_keys(
    devenv: DevEnv, tmp_path: Path, base_key: str
) -> None:
    """The scenario as found: ``processes = 2`` on one SQLite file, a new epoch key made by
    whichever worker answers GenerateDataKey, the unwrap on a fresh connection answered by
    either. Each round makes a new epoch key; with ten rounds the other worker answers at least
    one unwrap except with probability ~2^-10."""
    proc = BrokerProcess(
        devenv,
        tmp_path / "serve.log",
        {
            "KEYBROKER_SERVER_PROCESSES": "2",
            "KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{free_port()}",  # one port, both workers
            "KEYBROKER_STATE_URL": f"sqlite:{tmp_path / 'kb.db'}",
            "KEYBROKER_STATE_REFRESH_INTERVAL": "60",  # only a miss can make a worker reload
            "KEYBROKER_KEYS_RETENTION_EPOCH": "1d",
            "KEYBROKER_AUDIT_DIR": str(tmp_path / "journal"),
        },
    )
    try:
        port = proc.wait_listening(count=2)
        for day in range(20, 30):
            made = _generate_within_budget(devenv, port, base_key, days=day)
            unwrapped = _unwrap(devenv, port, _record_of(made), made.wrapped_key)
            assert unwrapped.data_key == made.data_key
    finally:
        assert stop_all([proc]) == [0]
    answered = [len(list((tmp_path / "journal" / w).glob("journal-*"))) for w in ("w0", "w1")]
    assert all(answered), "both workers answered calls"
