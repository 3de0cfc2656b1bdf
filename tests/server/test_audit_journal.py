"""The audit journal: every decision durable before the reply, tampering evident, fail closed on a
full disk and recover, and export that loses nothing across collector and broker crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keybroker import settings as settings_mod
from keybroker.adapters.journal import PREALLOCATE, Journal, JournalConfig, read_lines
from keybroker.core import journal as jf
from keybroker.core.decision import Decision, Outcome
from keybroker.devenv import DevEnv, mint_token
from tests.conftest import code_of
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, free_port, run_cli

ROOT = Path(__file__).resolve().parents[2]


def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout}s")


def make_journal(devenv: DevEnv, directory: Path, decisions: int = 20) -> Path:
    """A real journal: decisions with a checkpoint in the middle and one at the end."""
    key, signing = settings_mod.load(devenv.config, environ={}).audit.load_keys()
    journal = Journal(JournalConfig(directory / "w0", key, signing))
    for i in range(decisions):
        journal.record(
            Decision(
                service="s",
                operation="UnwrapDataKey",
                outcome=Outcome.ALLOW,
                reason="ok",
                recording_id=f"r{i}",
            )
        )
        if i == decisions // 2:
            journal.checkpoint()
    journal.close()
    return directory / "w0"


def verify(devenv: DevEnv, directory: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("audit", "verify", "--config", str(devenv.config), "--dir", str(directory))


def _lines(chain: Path) -> tuple[Path, list[bytes]]:
    [path] = sorted(chain.glob("journal-*.jsonl"))
    return path, path.read_bytes().splitlines(keepends=True)


def test_intact_journal_verifies(devenv: DevEnv, tmp_path: Path) -> None:
    """An untouched journal verifies, with its signed checkpoints."""
    make_journal(devenv, tmp_path)
    out = verify(devenv, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "w0: OK: records 1..22 intact, 2 signed checkpoints" in out.stdout


def _modify(lines: list[bytes]) -> tuple[list[bytes], str]:
    lines[6] = lines[6].replace(b'"allow"', b'"deny"')
    return lines, "journal-000000000001.jsonl:7: record 7 was modified (MAC mismatch)"


def _reorder(lines: list[bytes]) -> tuple[list[bytes], str]:
    lines[4], lines[5] = lines[5], lines[4]
    return lines, "journal-000000000001.jsonl:5: expected record 5, found 6"


def _insert(lines: list[bytes]) -> tuple[list[bytes], str]:
    lines.insert(8, lines[2])
    return (
        lines,
        "journal-000000000001.jsonl:9: expected record 9, found 3: records out of order or inserted",
    )


def _delete(lines: list[bytes]) -> tuple[list[bytes], str]:
    del lines[9]
    return (
        lines,
        "journal-000000000001.jsonl:10: expected record 10, found 11: records missing (deleted)",
    )


def _truncate(lines: list[bytes]) -> tuple[list[bytes], str]:
    return (
        lines[:15],
        "checkpoints.jsonl:2: journal truncated: it ends at record 15, the checkpoint anchors record 22",
    )


def _forge_signature(lines: list[bytes]) -> tuple[list[bytes], str]:
    record = json.loads(lines[11])
    assert record["kind"] == "checkpoint"
    record["sig"] = "00" * 64
    lines[11] = jf.canonical(record) + b"\n"
    return lines, "journal-000000000001.jsonl:12: record 12 was modified (MAC mismatch)"


@pytest.mark.parametrize(
    "tamper",
    [_modify, _reorder, _insert, _delete, _truncate, _forge_signature],
    ids=lambda f: f.__name__[1:],
)
def test_each_kind_of_tampering_is_caught_and_located(
    devenv: DevEnv, tmp_path: Path, tamper: Callable[[list[bytes]], tuple[list[bytes], str]]
) -> None:
    """audit verify exits 1 and names the file, line and record of a modified, reordered, inserted
    or deleted record, a forged checkpoint, and truncation below an anchored checkpoint."""
    chain = make_journal(devenv, tmp_path)
    path, lines = _lines(chain)
    changed, expected = tamper(lines)
    path.write_bytes(b"".join(changed))
    out = verify(devenv, tmp_path)
    assert out.returncode == 1
    assert f"w0: TAMPERED at {expected}" in out.stdout


def test_a_re_signed_checkpoint_with_another_key_is_caught(devenv: DevEnv, tmp_path: Path) -> None:
    """Someone holding the chain key but not the signing key cannot forge a checkpoint."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key, _ = settings_mod.load(devenv.config, environ={}).audit.load_keys()
    journal = Journal(JournalConfig(tmp_path / "w0", key, Ed25519PrivateKey.generate()))
    journal.record(Decision(service="s", operation="op"))
    journal.close()
    out = verify(devenv, tmp_path)
    assert out.returncode == 1
    assert "checkpoint signature invalid" in out.stdout


def test_every_answered_call_is_in_the_journal(devenv: DevEnv, tmp_path: Path) -> None:
    """Allow and deny decisions are journaled with who, what and why; query finds them."""
    journal_dir = tmp_path / "journal"
    proc = BrokerProcess(devenv, tmp_path / "b.log", {"KEYBROKER_AUDIT_DIR": str(journal_dir)})
    port = proc.wait_listening()
    token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
    with channel(devenv, port) as ch:
        kb = stub(ch)
        kb.GenerateDataKey(
            generate_request(recording_id="rec-j1", subject_ids=["subj-j"]), metadata=auth(token)
        )
        code_of(
            lambda: kb.GenerateDataKey(
                generate_request(recording_id="rec-j2", purposes=["ads"]), metadata=auth(token)
            )
        )
    assert proc.stop() == 0
    env = {"KEYBROKER_AUDIT_DIR": str(journal_dir)}
    out = run_cli("audit", "query", "--config", str(devenv.config), "--json", env=env)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    rows = [r for r in rows if r["service"] == "keybroker.v1.KeyBroker"]  # not key lifecycle
    assert [(r["recording_id"], r["outcome"], r["reason"]) for r in rows] == [
        ("rec-j1", "allow", "ok"),
        ("rec-j2", "deny", "purpose_not_granted"),
    ]
    assert rows[0]["subject_ids"] == ["subj-j"]
    by_subject = run_cli(
        "audit", "query", "--config", str(devenv.config), "--subject", "subj-j", "--json", env=env
    )
    assert len(by_subject.stdout.splitlines()) == 1
    # every other filter, each matching one of the two calls (all given filters must match)
    thumbprint = rows[0]["cert_thumbprint"]
    for flags, expected in (
        (["--recording", "rec-j2"], ["rec-j2"]),
        (["--decision", "deny"], ["rec-j2"]),
        (["--decision", "allow", "--operation", "GenerateDataKey"], ["rec-j1"]),
        (["--principal", rows[0]["subject"], "--recording", "rec-j1"], ["rec-j1"]),
        (["--cert", thumbprint, "--decision", "deny"], ["rec-j2"]),
        (["--key", rows[0]["key_name"], "--decision", "allow"], ["rec-j1"]),
        (["--key", f"{rows[0]['key_name']}/v{rows[0]['key_version']}"], ["rec-j1"]),
        (["--since", "2000-01-01", "--until", "2100-01-01", "--recording", "rec-j1"], ["rec-j1"]),
        (["--until", "2000-01-01"], []),
    ):
        out = run_cli("audit", "query", "--config", str(devenv.config), "--json", *flags, env=env)
        found = [json.loads(line) for line in out.stdout.splitlines()]
        found = [r["recording_id"] for r in found if r["service"] == "keybroker.v1.KeyBroker"]
        assert (out.returncode, found) == (0, expected), (flags, out.stderr)
    assert verify(devenv, journal_dir).returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs to fill up (root only, as in CI)."""
    assert os.geteuid() == 0, "the disk-full test mounts a tmpfs and needs root (CI runs as root)"
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_closed_and_recovers(
    devenv: DevEnv, tmp_path: Path, tiny_disk: Path
) -> None:
    """With the journal's disk full, calls fail UNAVAILABLE (no data key leaves) and health is
    NOT_SERVING; once space is freed the broker serves again by itself and the chain is intact."""
    proc = BrokerProcess(
        devenv,
        tmp_path / "b.log",
        {"KEYBROKER_AUDIT_DIR": str(tiny_disk), "KEYBROKER_HSM_HEALTH_INTERVAL": "0.2"},
    )
    port = proc.wait_listening()
    token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
    filler = tiny_disk / "filler"
    try:
        with channel(devenv, port) as ch:
            kb = stub(ch)
            health = health_pb2_grpc.HealthStub(ch)

            def serving() -> bool:
                resp = health.Check(
                    health_pb2.HealthCheckRequest(service="keybroker.v1.KeyBroker"), timeout=5
                )
                return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

            assert len(kb.GenerateDataKey(generate_request(), metadata=auth(token)).data_key) == 32
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for _ in range(1024):  # 1 MiB disk: full long before 4 MiB
                    os.write(fd, b"\0" * 4096)
            except OSError:
                pass
            finally:
                os.close(fd)
            # Records still fit in the space the journal preallocated (at most PREALLOCATE bytes,
            # a few hundred records); once that is used up the disk refuses the next
            # preallocation, and from then on every call fails closed.
            refused = None
            for _ in range(PREALLOCATE // 200):
                try:
                    kb.GenerateDataKey(generate_request(), metadata=auth(token))
                except grpc.RpcError as exc:
                    refused = (exc.code(), exc.details())
                    break
            assert refused == (grpc.StatusCode.UNAVAILABLE, "audit journal temporarily unavailable")
            code, _ = code_of(lambda: kb.GenerateDataKey(generate_request(), metadata=auth(token)))
            assert code is grpc.StatusCode.UNAVAILABLE
            eventually(lambda: not serving(), what="NOT_SERVING while the disk is full")
            filler.unlink()
            eventually(serving, what="SERVING after space is freed")
            assert len(kb.GenerateDataKey(generate_request(), metadata=auth(token)).data_key) == 32
    finally:
        filler.unlink(missing_ok=True)
        proc.stop()
    out = verify(devenv, tiny_disk)
    assert out.returncode == 0, out.stdout


class ReceiverProcess:
    def __init__(self, port: int, out: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.otlp_receiver", str(port), str(out)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "receiver ready"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def received(out: Path) -> list[tuple[str, int]]:
    if not out.exists():
        return []
    keys = []
    for line in out.read_text().splitlines():
        attrs = json.loads(line)["attributes"]
        keys.append((attrs["keybroker.audit.chain"], int(attrs["keybroker.audit.seq"])))
    return keys


def journaled(directory: Path) -> set[tuple[str, int]]:
    found = set()
    for chain in sorted(directory.glob("w*")):
        for _, raw in read_lines(chain):
            found.add((chain.name, int(json.loads(raw)["seq"])))
    return found


def test_collector_outage_loses_nothing_and_never_slows_calls(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """Kill the receiver mid-run and restart it: calls stay fast and every record arrives, with
    duplicates within the documented bound (one export batch)."""
    port, out, journal_dir = free_port(), tmp_path / "received.jsonl", tmp_path / "journal"
    receiver = ReceiverProcess(port, out)
    proc = BrokerProcess(devenv, tmp_path / "b.log", {
        "KEYBROKER_AUDIT_DIR": str(journal_dir), "KEYBROKER_TELEMETRY_OTLP_ENDPOINT": f"127.0.0.1:{port}",
        "KEYBROKER_TELEMETRY_OTLP_INSECURE": "true", "KEYBROKER_TELEMETRY_OTLP_TIMEOUT": "1",
        "KEYBROKER_AUDIT_EXPORT_MAX_BACKOFF": "1",
    })  # fmt: skip
    broker_port = proc.wait_listening()
    token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
    slowest = 0.0
    try:
        with channel(devenv, broker_port) as ch:
            kb = stub(ch)
            for i in range(150):
                if i == 50:
                    receiver.kill()
                if i == 120:
                    receiver = ReceiverProcess(port, out)
                started = time.monotonic()
                kb.GenerateDataKey(
                    generate_request(recording_id=f"rec-{i}"), metadata=auth(token), timeout=10
                )
                slowest = max(slowest, time.monotonic() - started)
        expected = journaled(journal_dir)
        eventually(
            lambda: expected <= set(received(out)), timeout=30, what="every record at the receiver"
        )
    finally:
        proc.stop()
        receiver.stop()
    assert len(expected) >= 150
    assert slowest < 1.0, f"a call took {slowest:.2f}s while the collector was down"
    keys = received(out)
    duplicates = len(keys) - len(set(keys))
    assert duplicates <= 256


def test_broker_killed_mid_load_loses_no_answered_decision(devenv: DevEnv, tmp_path: Path) -> None:
    """kill -9 the broker under load and restart it: every call that got an answer is in the
    journal, and reaches the receiver."""
    port, out, journal_dir = free_port(), tmp_path / "received.jsonl", tmp_path / "journal"
    listen = f"127.0.0.1:{free_port()}"
    env = {
        "KEYBROKER_AUDIT_DIR": str(journal_dir), "KEYBROKER_TELEMETRY_OTLP_ENDPOINT": f"127.0.0.1:{port}",
        "KEYBROKER_TELEMETRY_OTLP_INSECURE": "true", "KEYBROKER_AUDIT_PSEUDONYMIZE": "false",
        "KEYBROKER_SERVER_LISTEN": listen, "KEYBROKER_AUDIT_EXPORT_MAX_BACKOFF": "1",
    }  # fmt: skip
    receiver = ReceiverProcess(port, out)
    proc = BrokerProcess(devenv, tmp_path / "a.log", env)
    broker_port = proc.wait_listening()
    token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(n: int) -> None:
        with channel(devenv, broker_port, own_connection=True) as ch:
            kb = stub(ch)
            for i in range(5000):
                if stop.is_set():
                    return
                rid = f"rec-{n}-{i}"
                try:
                    kb.GenerateDataKey(
                        generate_request(recording_id=rid), metadata=auth(token), timeout=5
                    )
                except grpc.RpcError:
                    return  # the broker died: this call got no answer
                with lock:
                    answered.append(rid)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        eventually(lambda: len(answered) >= 300, what="load under way")
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
        restarted = BrokerProcess(devenv, tmp_path / "b.log", env)
        restarted.wait_listening()
        in_journal = set()
        for chain in sorted(journal_dir.glob("w*")):
            for _, raw in read_lines(chain):
                d = json.loads(raw).get("d", {})
                in_journal.add(d.get("recording_id"))
        missing = set(answered) - in_journal
        assert not missing, f"{len(missing)} answered calls missing from the journal"

        def exported() -> set[str]:
            ids = set()
            for line in out.read_text().splitlines() if out.exists() else []:
                ids.add(json.loads(line)["attributes"].get("keybroker.recording.id"))
            return ids

        eventually(
            lambda: set(answered) <= exported(),
            timeout=30,
            what="every answered decision at the receiver",
        )
        restarted.stop()
    finally:
        stop.set()
        proc.stop()
        receiver.stop()
    assert verify(devenv, journal_dir).returncode == 0
