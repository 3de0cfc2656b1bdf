"""One writer per journal: a second broker on the same `[audit] dir` exits 2 before it binds,
naming the holder's PID and the path, and the journal still verifies afterwards."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from keybroker.adapters.journal_lock import lock_directory, lock_slot
from keybroker.devenv import DevEnv, mint_token
from keybroker.errors import ConfigurationError
from keybroker.v1 import keybroker_pb2 as pb
from tests.server.test_startup_errors import ELSEWHERE
from tests.server.test_startup_errors import documented as troubleshooting
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, free_port, run_cli


def _calls(devenv: DevEnv, port: int, count: int) -> None:
    token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    with channel(devenv, port) as ch:
        for _ in range(count):
            request = generate_request()  # a new recording id each (ids are registered once)
            gen = stub(ch).GenerateDataKey(request, metadata=auth(token))
            stub(ch).UnwrapDataKey(
                pb.UnwrapDataKeyRequest(
                    recording_id=request.recording_id,
                    wrapped_key=gen.wrapped_key,
                    purpose="support",
                ),
                metadata=auth(token),
            )


@pytest.mark.parametrize("first_processes", ["1", "2"])
def test_a_second_broker_on_the_same_journal_exits_2_and_the_journal_verifies(
    devenv: DevEnv, tmp_path: Path, first_processes: str
) -> None:
    """The first broker serves; a second one with the same config and journal refuses to start
    (exit 2, holder's PID and lock path in the message, nothing bound), the first keeps serving,
    and `keybroker audit verify` passes once it has stopped."""
    journal = tmp_path / "journal"
    port = free_port()
    shared = {
        "KEYBROKER_AUDIT_DIR": str(journal),
        "KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{port}",
        "KEYBROKER_STATE_URL": f"sqlite:{tmp_path / 'kb.db'}",
    }
    first = BrokerProcess(
        devenv, tmp_path / "first.log", {**shared, "KEYBROKER_SERVER_PROCESSES": first_processes}
    )
    try:
        first.wait_listening(count=int(first_processes))
        _calls(devenv, port, 6)
        second = run_cli("serve", "--config", str(devenv.config), env=shared)
        assert second.returncode == 2, second.stderr
        message = second.stderr
        assert "in use by another keybroker" in message
        documented = ELSEWHERE["tests/server/test_journal_lock.py"]
        assert troubleshooting()[documented].search(message)  # docs/TROUBLESHOOTING.md's line
        assert f"pid {first.proc.pid}" in message
        lock = journal / "keybroker.lock"
        assert str(lock) in message
        assert "listening on port" not in message
        assert "Traceback" not in message
        _calls(devenv, port, 6)  # the first one was not disturbed
    finally:
        assert first.stop(signal.SIGTERM) == 0
    verify = run_cli("audit", "verify", "--config", str(devenv.config), env=shared)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "TAMPERED" not in verify.stdout


def test_brokers_with_their_own_journals_share_a_state_store(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """Two brokers on one SQLite store but each with its own [audit] dir both serve."""
    state = {"KEYBROKER_STATE_URL": f"sqlite:{tmp_path / 'kb.db'}"}
    a = BrokerProcess(
        devenv, tmp_path / "a.log", {**state, "KEYBROKER_AUDIT_DIR": str(tmp_path / "ja")}
    )
    b = BrokerProcess(
        devenv, tmp_path / "b.log", {**state, "KEYBROKER_AUDIT_DIR": str(tmp_path / "jb")}
    )
    try:
        for proc in (a, b):
            _calls(devenv, proc.wait_listening(), 2)
    finally:
        assert [a.stop(), b.stop()] == [0, 0]


def test_a_leftover_worker_holding_a_slot_stops_a_new_supervisor(tmp_path: Path) -> None:
    """The slot lock of w1, held by a process of another broker, is named; the directory lock
    and slot locks are released with their holder (no stale lock after a crash)."""
    held = lock_slot(tmp_path, 1)
    try:
        with pytest.raises(ConfigurationError) as info:
            lock_slot(tmp_path, 1)
        assert re.search(
            r"journal .*/w1 is in use by another keybroker \(pid \d+", info.value.message
        )
        assert str(tmp_path / "w1" / "writer.lock") in info.value.message
    finally:
        held.release()
    lock_slot(tmp_path, 1).release()  # free again once its holder let go
    lock_directory(tmp_path).release()
    assert (tmp_path / "keybroker.lock").stat().st_mode & 0o077 == 0
