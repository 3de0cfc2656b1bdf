"""Several broker replicas behind one client: gRPC's round_robin spreads the calls, gRPC's retry
policy (UNAVAILABLE only) and wait-for-ready carry calls past a replica that dies mid-run, and
every operation stays within its deadline."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from keybroker import errors
from keybroker.client import AsyncKeyBrokerClient, KeyBrokerClient, RetryPolicy, TlsFiles
from keybroker.client._base import channel_target, service_config
from keybroker.devenv import DevEnv, mint_token
from tests.client.tinydns import TinyDns
from tests.server.test_key_admin import journal_records
from tests.support.process import BrokerProcess, free_port, stop_all

pytestmark = pytest.mark.slow


def test_a_list_of_addresses_becomes_one_static_target() -> None:
    """IP:port lists become gRPC's ipv4:/ipv6: targets; strings pass unchanged; host names and
    mixed families are refused with a pointer to dns:///."""
    assert channel_target("dns:///keybroker-headless:50051") == "dns:///keybroker-headless:50051"
    assert channel_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert channel_target(["kb:1"]) == "kb:1"
    with pytest.raises(ValueError, match="dns:///"):
        channel_target(["kb-0:1", "kb-1:1"])
    with pytest.raises(ValueError, match="IPv4 or all IPv6"):
        channel_target(["127.0.0.1:1", "[::1]:1"])
    with pytest.raises(ValueError, match="no target"):
        channel_target([])
    with pytest.raises(ValueError, match=r"\[addr\]:port"):
        channel_target(["::1:1", "::1:2"])
    with pytest.raises(ValueError, match="IP:port"):
        channel_target(["127.0.0.1", "127.0.0.2"])


def test_a_list_of_addresses_needs_the_name_to_check_certificates_against(
    devenv: DevEnv,
) -> None:
    """Several addresses and no server_name: refused at construction, naming the option."""
    tls = TlsFiles(devenv.ca_cert, devenv.cert("client"), devenv.key("client"))
    with pytest.raises(ValueError, match="server_name"):
        KeyBrokerClient(["127.0.0.1:1", "127.0.0.1:2"], tls=tls, token="t")


def test_service_config_balances_and_retries_only_unavailable() -> None:
    """round_robin; the retry policy lists UNAVAILABLE alone (never a denial); gRPC's cap of 5
    attempts is applied, not hidden; no retry policy at all for a single attempt."""
    config = json.loads(
        service_config(["keybroker.v1.KeyBroker"], RetryPolicy(max_attempts=9), "round_robin")
    )
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "keybroker.v1.KeyBroker"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 5
    assert method["waitForReady"] is True
    once = json.loads(service_config(["s"], RetryPolicy(max_attempts=1), "pick_first"))
    assert "retryPolicy" not in once["methodConfig"][0]


def _replicas(
    devenv: DevEnv, tmp_path: Path, count: int, listen: list[str] | None = None
) -> list[BrokerProcess]:
    store = f"sqlite:{tmp_path / 'shared.db'}"
    procs = []
    for i in range(count):
        env = {
            "KEYBROKER_SERVER_LISTEN": listen[i] if listen else "127.0.0.1:0",
            "KEYBROKER_STATE_URL": store,
            "KEYBROKER_AUDIT_DIR": str(tmp_path / f"journal-{i}"),
            "KEYBROKER_SERVER_PROCESSES": "1",
            "KEYBROKER_KEYS_RETENTION_EPOCHS": "false",
        }
        procs.append(BrokerProcess(devenv, tmp_path / f"replica-{i}.log", env))
    return procs


def _served(tmp_path: Path, i: int) -> int:
    return sum(1 for r in journal_records(tmp_path / f"journal-{i}") if r.get("outcome") == "allow")


def test_three_replicas_one_killed_mid_run_no_operation_fails(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """Three brokers on 127.0.0.1; a blocking client and an asyncio client (4 calls in flight)
    encrypt and decrypt recordings through all three; one broker is killed (SIGKILL) a third of
    the way in. Every operation succeeds, and each broker served calls before the kill."""
    procs = _replicas(devenv, tmp_path, 3)
    try:
        ports = [p.wait_listening() for p in procs]
        targets = [f"127.0.0.1:{p}" for p in ports]
        tls = TlsFiles(devenv.ca_cert, devenv.cert("client"), devenv.key("client"))
        token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
        kwargs: dict[str, Any] = {
            "tls": tls,
            "token": token,
            "timeout": 20,
            "server_name": "localhost",
        }
        blocking_ops, async_ops = 45, 60
        done = {"blocking": 0, "asyncio": 0}
        failures: list[BaseException] = []
        served_before_kill: list[int] = []
        started = time.monotonic()

        def round_trip_bytes(kb: Any, n: int) -> tuple[bytes, io.BytesIO]:
            audio = os.urandom(5000 + n)
            return audio, io.BytesIO()

        def blocking() -> None:
            try:
                with KeyBrokerClient(targets, **kwargs) as kb:
                    for n in range(blocking_ops):
                        audio, sealed = round_trip_bytes(kb, n)
                        kb.encrypt_recording(
                            io.BytesIO(audio), sealed, recording_id=f"b{n}", purposes=["support"]
                        )
                        out = io.BytesIO()
                        kb.decrypt_recording(io.BytesIO(sealed.getvalue()), out, purpose="support")
                        assert out.getvalue() == audio
                        done["blocking"] += 1
            except BaseException as exc:  # collected and asserted below
                failures.append(exc)

        async def asynchronous() -> None:
            async with AsyncKeyBrokerClient(targets, **kwargs) as kb:

                async def worker(w: int) -> None:
                    for n in range(async_ops // 4):
                        audio, sealed = round_trip_bytes(kb, n)
                        await kb.encrypt_recording(
                            io.BytesIO(audio),
                            sealed,
                            recording_id=f"a{w}-{n}",
                            purposes=["support"],
                        )
                        out = io.BytesIO()
                        await kb.decrypt_recording(
                            io.BytesIO(sealed.getvalue()), out, purpose="support"
                        )
                        assert out.getvalue() == audio
                        done["asyncio"] += 1

                await asyncio.gather(*(worker(w) for w in range(4)))

        def killer() -> None:
            deadline = time.monotonic() + 60
            while (
                sum(done.values()) < (blocking_ops + async_ops) // 3 and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            served_before_kill.extend(_served(tmp_path, i) for i in range(3))
            procs[1].proc.send_signal(signal.SIGKILL)

        threads = [threading.Thread(target=blocking), threading.Thread(target=killer)]
        for t in threads:
            t.start()
        try:
            asyncio.run(asyncio.wait_for(asynchronous(), 120))
        except BaseException as exc:  # collected and asserted below
            failures.append(exc)
        for t in threads:
            t.join(120)
        assert failures == []
        assert done == {"blocking": blocking_ops, "asyncio": async_ops}
        assert procs[1].proc.wait(10) == -signal.SIGKILL
        assert all(n > 0 for n in served_before_kill), served_before_kill  # round robin
        assert time.monotonic() - started < 120
    finally:
        codes = stop_all(procs)
    assert codes[0] == codes[2] == 0


def test_a_denial_is_not_retried_on_another_replica(devenv: DevEnv, tmp_path: Path) -> None:
    """With three replicas, a PERMISSION_DENIED is one decision on one replica: no retry."""
    procs = _replicas(devenv, tmp_path, 3)
    try:
        targets = [f"127.0.0.1:{p.wait_listening()}" for p in procs]
        tls = TlsFiles(devenv.ca_cert, devenv.cert("client"), devenv.key("client"))
        token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
        with KeyBrokerClient(
            targets, tls=tls, token=token, timeout=20, server_name="localhost"
        ) as kb:
            wrapped = kb.generate_data_key("rec-deny", purposes=["support"]).wrapped
            with pytest.raises(errors.PermissionDeniedError):
                kb.unwrap_data_key("rec-deny", wrapped, purpose="support")  # no keys:unwrap scope
        denials = [
            r for i in range(3) for r in journal_records(tmp_path / f"journal-{i}")
            if r.get("outcome") == "deny"
        ]  # fmt: skip
        assert len(denials) == 1
    finally:
        assert stop_all(procs) == [0, 0, 0]


def test_one_dns_name_with_two_addresses_is_balanced_and_survives_a_kill(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """``dns://<server>/kb.test:<port>`` where the name has an A (127.0.0.1) and an AAAA (::1)
    record, a broker on each: gRPC resolves both (through a DNS responder of the test's own),
    round robin reaches both, and when one is killed the rest of the run still succeeds."""
    port = free_port()
    procs = _replicas(devenv, tmp_path, 2, listen=[f"127.0.0.1:{port}", f"[::1]:{port}"])
    dns = TinyDns({"kb.test": ["127.0.0.1", "::1"]})
    try:
        for proc in procs:
            proc.wait_listening()
        tls = TlsFiles(devenv.ca_cert, devenv.cert("client"), devenv.key("client"))
        token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
        target = f"dns://127.0.0.1:{dns.port}/kb.test:{port}"
        with KeyBrokerClient(
            target, tls=tls, token=token, timeout=20, server_name="localhost"
        ) as kb:
            for n in range(40):
                if n == 20:
                    assert all(_served(tmp_path, i) > 0 for i in range(2))  # both addresses used
                    procs[0].proc.send_signal(signal.SIGKILL)
                key = kb.generate_data_key(f"dns-{n}", purposes=["support"])
                assert kb.unwrap_data_key(f"dns-{n}", key.wrapped, purpose="support").plaintext
        assert ("kb.test", 1) in dns.queries
        assert ("kb.test", 28) in dns.queries
        assert procs[0].proc.wait(10) == -signal.SIGKILL
    finally:
        dns.close()
        codes = stop_all(procs)
    assert codes[1] == 0
