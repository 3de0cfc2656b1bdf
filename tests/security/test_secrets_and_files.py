"""Regression tests for the fixes that keep secrets off command lines, out of telemetry, out of
core dumps and out of other users' reach (see tests/security/README.md for how each test names the
CHANGELOG entry it guards)."""

from __future__ import annotations

import base64
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keybroker.devenv import DevEnv
from keybroker.v1 import keybroker_pb2 as pb
from tests.security.conftest import Start
from tests.security.support import Caller, new_id, refused
from tests.support.clients import auth, generate_request
from tests.support.process import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]
SO_PIN = "so-pin-regression-5b1e"


def test_init_token_puts_no_pin_on_a_command_line_nor_the_so_pin_beside_the_user_pin(
    tmp_path: Path,
) -> None:
    """Unreleased, Security: "`softhsm/init-token.sh` no longer passes PINs on `softhsm2-util`'s
    command line (visible to every local user in `ps`) and no longer stores the SO PIN beside
    the user PIN".

    The script runs under ``bash -x`` with the SO PIN on stdin; xtrace prints every command it
    runs with its arguments expanded: neither PIN appears there, and nothing in the token
    directory holds the SO PIN."""
    hsm = tmp_path / "hsm"
    done = subprocess.run(
        ["bash", "-x", str(ROOT / "softhsm" / "init-token.sh"), str(hsm), "regress-token"],
        input=SO_PIN + "\n", capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    user_pin = (hsm / "user.pin").read_text().strip()
    assert len(user_pin) >= 16
    assert "+ " in done.stderr  # the trace is there
    assert SO_PIN not in done.stderr and user_pin not in done.stderr
    assert done.returncode == 0, done.stderr
    assert not (hsm / "so.pin").exists()
    assert [p for p in hsm.rglob("*") if p.is_file() and SO_PIN.encode() in p.read_bytes()] == []


def _forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
    ]


def test_no_key_wrapped_key_or_token_reaches_logs_spans_errors_or_the_journal(
    devenv: DevEnv,
    start: Start,
    own_spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unreleased, Security: "No key, wrapped key or token appears in logs, spans, error messages
    or reprs (tested)".

    A generate, an unwrap, a tampered unwrap and a forged token, with every log at DEBUG: the
    data key, the wrapped key, its ciphertext and the token (or its signature) appear in no log
    line, span, error message, journal byte or repr of what the broker returned."""
    caplog.set_level(logging.DEBUG)
    broker = start()
    caller = Caller(devenv, broker.port)
    try:
        token = caller.token(["keys:generate", "keys:unwrap"])
        rec = new_id()
        made = caller.kb.GenerateDataKey(generate_request(rec), metadata=auth(token))
        request = pb.UnwrapDataKeyRequest(
            recording_id=rec, wrapped_key=made.wrapped_key, purpose="support"
        )
        caller.kb.UnwrapDataKey(request, metadata=auth(token))
        tampered = pb.UnwrapDataKeyRequest(
            recording_id=rec,
            wrapped_key=made.wrapped_key[:-1] + bytes([made.wrapped_key[-1] ^ 1]),
            purpose="support",
        )
        errors = [
            refused(lambda: caller.kb.UnwrapDataKey(tampered, metadata=auth(token)))[1],
            refused(lambda: caller.kb.UnwrapDataKey(request, metadata=auth(token + "x")))[1],
        ]
    finally:
        caller.close()
    assert broker.journal is not None
    journal = b"".join(p.read_bytes() for p in broker.journal.directory.rglob("*") if p.is_file())
    haystack = "\n".join(
        [caplog.text, *errors, journal.decode("utf-8", "replace")]
        + [
            repr(dict(s.attributes or {})) + repr(s.events) + s.name
            for s in own_spans.get_finished_spans()
        ]
    )
    assert len(own_spans.get_finished_spans()) >= 4
    secrets = (
        _forms(made.data_key)
        + _forms(made.wrapped_key)
        + _forms(made.wrapped_key[-48:])
        + [token, token.split(".")[2]]
    )
    for secret in secrets:
        assert secret not in haystack
    assert token not in repr(broker.keks) and made.data_key.hex() not in repr(made)


def _core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError("no core limit line")


def test_every_broker_process_runs_with_core_dumps_off(devenv: DevEnv, tmp_path: Path) -> None:
    """Unreleased, Security: "Core dumps are off in every broker process (`RLIMIT_CORE = 0`; on
    Linux also `PR_SET_DUMPABLE = 0`".

    ``keybroker serve`` with two workers: the supervisor and each worker have a core-file limit
    of 0 (soft and hard), so a crash writes no PIN or key to disk."""
    proc = BrokerProcess(
        devenv,
        tmp_path / "b.log",
        {"KEYBROKER_SERVER_PROCESSES": "2", "KEYBROKER_AUDIT_DIR": str(tmp_path / "journal"),
         "KEYBROKER_STATE_URL": f"sqlite:{tmp_path / 'kb.db'}"},
    )  # fmt: skip
    try:
        proc.wait_listening(count=2)
        pid = proc.proc.pid
        workers = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert len(workers) >= 2
        assert {_core_limit(p) for p in (pid, *workers)} == {"0 0"}
    finally:
        assert proc.stop(signal.SIGTERM) == 0


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _loose(root: Path) -> list[str]:
    return [
        f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p}"
        for p in [root, *root.rglob("*")]
        if stat.S_IMODE(p.lstat().st_mode) & 0o077
    ]


def test_files_the_broker_and_dev_init_create_are_owner_only_whatever_the_umask(
    devenv: DevEnv, start: Start, tmp_path: Path
) -> None:
    """Unreleased, Security: "Files the broker and `keybroker dev init` create — certificates,
    JWKS, settings, the SQLite database (and its WAL), the span file, journal directories — were
    0644/0755 under the usual umask".

    Under umask 000, a broker's database, journal and span file, and everything ``keybroker dev
    init`` writes, are 0600 in 0700 directories."""
    state = tmp_path / "state"
    with _umask(0):
        broker = start(
            state_url=f"sqlite:{state / 'db' / 'keybroker.db'}",
            audit_dir=str(state / "journal"),
            telemetry_span_file=str(state / "spans" / "spans.jsonl"),
        )
    caller = Caller(devenv, broker.port)
    try:
        caller.generate(new_id())
    finally:
        caller.close()
    broker.stop(0)
    created = {p.name for p in state.rglob("*")}
    assert {"keybroker.db", "w0", "spans.jsonl"} <= created
    assert _loose(state) == []
    init = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$0" -m keybroker.cli.main dev init --state-dir "$1" '
         "--listen 127.0.0.1:0", sys.executable, str(tmp_path / "dev")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    assert _loose(tmp_path / "dev") == []
