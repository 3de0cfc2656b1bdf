"""Secrets and files (issue #14, item 13): no core dumps of a broker, owner-only files whatever
the umask, and the erasure justification pseudonymised in exported spans."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keybroker import settings as settings_mod
from keybroker.adapters.export import JournalExporter, Pseudonymizer
from keybroker.adapters.journal import Journal, JournalConfig
from keybroker.core.decision import Decision, Outcome
from keybroker.devenv import DevEnv, mint_token
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, run_cli, run_fresh

HARDEN_AND_REPORT = """
import json, resource
from keybroker.server.hardening import disable_core_dumps, is_dumpable
before = is_dumpable()
disable_core_dumps()
print(json.dumps({"before": before, "after": is_dumpable(),
                  "core": resource.getrlimit(resource.RLIMIT_CORE)}))
"""


def test_core_dumps_are_disabled_in_a_fresh_process() -> None:
    """RLIMIT_CORE becomes 0 (soft and hard) and the process is no longer dumpable."""
    result = json.loads(run_fresh(HARDEN_AND_REPORT))
    assert result["before"] is True
    assert result == {"before": True, "after": False, "core": [0, 0]}


def _core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError("no core limit line")


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _loose(root: Path) -> list[str]:
    """Paths under ``root`` (itself included) that group or others may access."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{oct(mode)} {path.relative_to(root.parent)}")
    return found


def test_a_broker_under_umask_000_creates_only_owner_files_and_dumps_no_core(
    tmp_path: Path,
) -> None:
    """`keybroker dev init` and `keybroker serve` (two workers) under umask 000: every file and
    directory they create (keys, certificates, settings, SQLite database with its WAL, journal,
    checkpoints, span file) is 0600/0700; the supervisor and both workers run with a core limit
    of 0."""
    state = tmp_path / "state"
    init = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$0" -m keybroker.cli.main dev init --state-dir "$1" '
         "--listen 127.0.0.1:0", sys.executable, str(state)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    env = DevEnv(state)
    with umask(0):  # inherited by the broker at fork
        proc = BrokerProcess(
            env,
            tmp_path / "b.log",
            {"KEYBROKER_SERVER_PROCESSES": "2", "KEYBROKER_AUDIT_DIR": str(state / "journal")},
        )
    try:
        port = proc.wait_listening(count=2)
        workers = _children(proc.proc.pid)
        assert len(workers) >= 2
        for pid in (proc.proc.pid, *workers):
            assert _core_limit(pid) == "0 0", pid
        token = mint_token(env, scopes=["keys:generate"], purposes=["support"])
        with channel(env, port) as ch:
            kb = stub(ch)
            for i in range(4):  # each connection may land on either worker
                kb.GenerateDataKey(
                    generate_request(recording_id=f"rec-mode-{i}"), metadata=auth(token)
                )
        deadline = time.monotonic() + 10
        while not (state / "spans.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert proc.stop(signal.SIGTERM) == 0
    created = {p.name for p in state.rglob("*")}
    assert {"keybroker.db", "spans.jsonl", "w0", "checkpoints.jsonl", "chain.key"} <= created
    assert _loose(state) == []


def test_the_justification_is_pseudonymised_in_exported_spans(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """An erasure's justification (free text that may name the person) leaves the host only as a
    keyed pseudonym, like recording and subject ids; the local journal keeps it for `audit
    query`, and `audit pseudonym --kind justification` finds it."""
    key, signing = settings_mod.load(devenv.config, environ={}).audit.load_keys()
    chain = tmp_path / "w0"
    journal = Journal(JournalConfig(chain, key, signing))
    reason = "art. 17 request from Jane Doe, ticket 4711"
    journal.record(
        Decision(
            service="keybroker.v1.Privacy",
            operation="EraseSubject",
            outcome=Outcome.ALLOW,
            reason="ok",
            subject="dpo",
            subject_ids=("cust-42",),
            justification=reason,
            reference="erasure:1",
        )
    )
    journal.close()
    pseudonymize = Pseudonymizer(bytes.fromhex(devenv.pseudonym_key.read_text()))
    memory = InMemorySpanExporter()
    exporter = JournalExporter(chain, memory, Resource.create(), pseudonymize=pseudonymize)
    assert exporter.export_once() == 2  # the decision and the final checkpoint
    [span] = [s for s in memory.get_finished_spans() if s.name.endswith("/EraseSubject")]
    attributes = dict(span.attributes or {})
    assert attributes["keybroker.justification"] == pseudonymize("justification", reason)
    assert "Jane Doe" not in json.dumps(attributes)
    assert attributes["keybroker.reference"] == "erasure:1"
    found = run_cli(
        "audit", "pseudonym", reason, "--kind", "justification", "--config", str(devenv.config)
    )
    assert (found.returncode, found.stdout.strip()) == (
        0,
        pseudonymize("justification", reason),
    ), found.stderr


def _posix_locks(path: Path) -> list[str]:
    """This process's POSIX locks on ``path`` (from /proc/locks)."""
    inode, pid = path.stat().st_ino, str(os.getpid())
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "POSIX" and fields[4] == pid and fields[5].endswith(f":{inode}"):
            found.append(" ".join(fields[3:]))
    return found


def test_opening_a_connection_keeps_the_locks_of_the_others(tmp_path: Path) -> None:
    """Making the database file 0600 must never open an existing database: closing any
    descriptor of a file drops this process's POSIX locks on it, SQLite's included, and other
    connections then corrupt the database (seen as "database disk image is malformed" under
    load when a first version of the 0600 change did exactly that)."""
    from keybroker.adapters.sqldb import SqliteDialect

    path = tmp_path / "state" / "keybroker.db"
    dialect = SqliteDialect(path)
    holder = dialect.connect()
    try:
        holder.execute("CREATE TABLE t (x INTEGER)")
        holder.execute("BEGIN")
        holder.execute("SELECT * FROM t").fetchall()  # a reader holds its shared lock
        held = _posix_locks(path)
        assert held, "expected SQLite to hold a POSIX lock on the database file"
        dialect.connect().close()  # another connection of this process comes and goes
        assert _posix_locks(path) == held
    finally:
        holder.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
