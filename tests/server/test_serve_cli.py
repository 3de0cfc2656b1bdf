"""`keybroker serve` and `keybroker kek` as an operator runs them: fail fast on bad settings,
graceful SIGTERM, several worker processes on one port, no KEK overwrite."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest

from keybroker.devenv import DevEnv, mint_token
from keybroker.v1 import keybroker_pb2 as pb
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, free_port, run_cli


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"KEYBROKER_TLS_CLIENT_CA_FILE": ""}, "[tls] client_ca_file"),
        ({"KEYBROKER_AUTH_ALGORITHMS": "ES256,HS256"}, "[auth] algorithms"),
        ({"KEYBROKER_AUTH_ALGORITHMS": "none"}, "[auth] algorithms"),
        ({"KEYBROKER_AUTH_LEEWAY": "300"}, "[auth] leeway"),
        ({"KEYBROKER_HSM_TOKEN_LABEL": "no-such-token"}, "[hsm] token_label"),
        ({"KEYBROKER_KEYS_DEFAULT": "missing-key"}, "[keys] default"),
        ({"KEYBROKER_SERVER_NOPE": "1"}, "[server] nope"),
    ],
)
def test_bad_configuration_fails_fast_naming_the_key(
    devenv: DevEnv, tmp_path: Path, override: dict[str, str], expected: str
) -> None:
    """The broker refuses to start, exit code 2, with a message naming the setting."""
    # its own journal: the session's in-process broker holds the dev one (one writer per journal)
    journal = str(tmp_path / "journal")
    env = {"KEYBROKER_SERVER_LISTEN": "127.0.0.1:0", "KEYBROKER_AUDIT_DIR": journal, **override}
    if override.get("KEYBROKER_TLS_CLIENT_CA_FILE") == "":
        # An empty path is refused by the settings loader; prove the serve check with a config
        # that simply has no client CA.
        config = devenv.root / "no-client-ca.toml"
        config.write_text(devenv.config.read_text().replace('client_ca_file = "pki/ca.pem"\n', ""))
        out = run_cli(
            "serve", "--config", str(config), env={"KEYBROKER_SERVER_LISTEN": "127.0.0.1:0"}
        )
    else:
        out = run_cli("serve", "--config", str(devenv.config), env=env)
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr
    assert "Traceback" not in out.stderr


def test_wrong_pin_fails_fast(devenv: DevEnv, tmp_path: Path) -> None:
    """A wrong PIN is a configuration error, not a crash."""
    pin = tmp_path / "wrong.pin"
    pin.write_text("0000\n")
    out = run_cli(
        "serve",
        "--config",
        str(devenv.config),
        env={"KEYBROKER_HSM_PIN_FILE": str(pin), "KEYBROKER_AUDIT_DIR": str(tmp_path / "j")},
    )
    assert out.returncode == 2
    assert "[hsm] pin_file" in out.stderr


def test_kek_create_offline_refuses_to_overwrite(devenv: DevEnv) -> None:
    """`keybroker kek create --offline` never replaces an existing key."""
    out = run_cli("kek", "create", "recordings", "--offline", "--config", str(devenv.config))
    assert out.returncode == 1
    assert "already exists" in out.stderr
    again = run_cli(
        "kek", "create", "recordings", "--offline", "--if-missing", "--config", str(devenv.config)
    )
    assert again.returncode == 0, again.stderr


#: Runs the broker, sending itself SIGTERM when it enters app.<argv[2]> (a moment of start-up).
SIGTERM_AT = textwrap.dedent(
    """
    import logging, os, signal, sys
    from pathlib import Path
    from keybroker import settings
    from keybroker.server import app

    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    step = getattr(app, sys.argv[2])

    def step_after_a_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return step(*args, **kwargs)

    setattr(app, sys.argv[2], step_after_a_sigterm)
    app.serve(settings.load(Path(sys.argv[1])))
    """
)


def test_a_sigterm_right_after_listening_stops_gracefully(devenv: DevEnv, tmp_path: Path) -> None:
    """SIGTERM arrived after a worker said "listening" (and readiness SERVING) but before it had
    installed its signal handler, while it settled its heap: the default action killed it, with
    no drain and no final journal checkpoint, and the health port closed without ever saying
    NOT_SERVING (a clean-clone run of the suite saw it). The handler is now in place before the
    server starts."""
    env = {
        **os.environ,
        "KEYBROKER_SERVER_LISTEN": "127.0.0.1:0",
        "KEYBROKER_SERVER_PROCESSES": "1",
        "KEYBROKER_AUDIT_DIR": str(tmp_path / "journal"),
    }
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT, str(devenv.config), "settle_heap"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # the exit code is asserted below, with the output
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "keybroker listening" in output
    assert "signal 15: stopping" in output


@pytest.mark.parametrize(
    ("moment", "said"),
    [
        ("replay_with_own_journal", "stopped before the workers started"),
        ("_watch_workers", "signal 15: stopping (the workers)"),
    ],
)
def test_a_sigterm_during_the_supervisors_start_stops_it_in_order(
    devenv: DevEnv, tmp_path: Path, moment: str, said: str
) -> None:
    """With several workers, the supervisor installed its signal handlers only once its workers
    were started: a SIGTERM during its journal replay or while the workers started took the
    default action, killing it outright (exit -15) with its workers left behind. The handlers
    are now in place before the replay."""
    env = {
        **os.environ,
        "KEYBROKER_SERVER_LISTEN": "127.0.0.1:0",
        "KEYBROKER_SERVER_PROCESSES": "2",
        "KEYBROKER_AUDIT_DIR": str(tmp_path / "journal"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_AT, str(devenv.config), moment],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the workers are found, and cleaned up
    )
    try:
        output, _ = proc.communicate(timeout=60)
        left_behind = _group_alive(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == 0, output[-3000:]
    assert not left_behind, "worker processes outlived the supervisor"
    assert said in output


def _group_alive(pgid: int, within: float = 5.0) -> bool:
    """Whether a process of the group is still alive ``within`` seconds (multiprocessing's
    resource tracker exits a moment after the supervisor)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    return True


def test_sigterm_lets_in_flight_calls_finish(devenv: DevEnv, tmp_path: Path) -> None:
    """On SIGTERM the broker stops accepting calls, finishes in-flight ones, and exits 0."""
    proc = BrokerProcess(devenv, tmp_path / "b.log", {"KEYBROKER_SERVER_GRACE_PERIOD": "5"})
    port = proc.wait_listening()
    token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
    results: list[int] = []
    refusals: list[grpc.StatusCode] = []
    with channel(devenv, port) as ch:
        kb = stub(ch)
        kb.GenerateDataKey(generate_request(), metadata=auth(token))
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    results.append(
                        len(kb.GenerateDataKey(generate_request(), metadata=auth(token)).data_key)
                    )
                except grpc.RpcError as exc:
                    refusals.append(exc.code())
                    break

        worker = threading.Thread(target=load)
        worker.start()
        deadline = time.monotonic() + 10
        while not results and not refusals and time.monotonic() < deadline:
            time.sleep(0.005)  # calls are flowing before the signal arrives
        try:
            assert proc.stop(signal.SIGTERM, timeout=20) == 0
        finally:
            stop.set()
            worker.join(10)
    assert results
    assert set(results) == {32}
    assert refusals in ([], [grpc.StatusCode.UNAVAILABLE])


def test_two_worker_processes_share_the_port(devenv: DevEnv, tmp_path: Path) -> None:
    """With [server] processes = 2 both workers serve (SO_REUSEPORT) and SIGTERM stops both."""
    port = free_port()
    proc = BrokerProcess(
        devenv,
        tmp_path / "b.log",
        {"KEYBROKER_SERVER_PROCESSES": "2", "KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{port}"},
    )
    proc.wait_listening(count=2)
    token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    for _ in range(12):
        with channel(devenv, port, own_connection=True) as ch:
            request = generate_request()
            gen = stub(ch).GenerateDataKey(request, metadata=auth(token))
            out = stub(ch).UnwrapDataKey(
                pb.UnwrapDataKeyRequest(
                    recording_id=request.recording_id,
                    wrapped_key=gen.wrapped_key,
                    purpose="support",
                ),
                metadata=auth(token),
            )
            assert out.data_key == gen.data_key
    assert proc.output().count("listening on port") == 2
    assert proc.stop(signal.SIGTERM) == 0


def test_operator_token_script_then_kek_create(tmp_path: Path) -> None:
    """softhsm/init-token.sh makes a token that `keybroker kek create` can use."""
    root = Path(__file__).resolve().parents[2]
    hsm = tmp_path / "hsm"
    script = subprocess.run(
        [str(root / "softhsm" / "init-token.sh"), str(hsm), "ops-token"],
        input="ops-so-pin\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr
    assert (hsm / "user.pin").stat().st_mode & 0o077 == 0
    config = tmp_path / "keybroker.toml"
    config.write_text(
        "[hsm]\n"
        f'token_label = "ops-token"\npin_file = "{hsm / "user.pin"}"\n'
        f'env = {{ SOFTHSM2_CONF = "{hsm / "softhsm2.conf"}" }}\n'
    )
    env = {"SOFTHSM2_CONF": str(hsm / "softhsm2.conf")}
    created = run_cli("kek", "create", "calls", "--offline", "--config", str(config), env=env)
    assert created.returncode == 0, created.stderr
    assert "calls/v1" in created.stdout
