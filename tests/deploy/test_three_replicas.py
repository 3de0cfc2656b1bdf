"""Three replicas of the shipped deploy/ configuration, proven on this machine (issue #15, item 10).

The dev overlay's keybroker.toml (deploy/kubernetes, rendered by tests/deploy/kustomize.py) and
the StatefulSet's KEYBROKER_* variables run as three ``keybroker serve`` processes on 127.0.0.1,
sharing one real PostgreSQL database and one SoftHSM token. Only what must differ on this machine
is changed (:func:`on_this_machine`), through the same KEYBROKER_* overrides the overlays use, and
the test checks that nothing else differs from the shipped settings.

Storage-service load (the SDK's client, round robin over the three) runs throughout while, through
replica A alone, a key is rotated, a version disabled and enabled again, a recording and a subject
erased, and a legal hold placed and released: B and C honour each within 1 s (the lag is measured
and printed). Then C is killed with SIGKILL under load (its whole process group, as a container
runtime does) and restarted on its journal. The verdict: no wrong answer (a wrong key, a key after
an erasure, a disabled version served, INVALID_ARGUMENT or any other refusal for a valid key),
and every answered call (allow or deny) has its decision in a journal that ``keybroker audit
verify`` accepts. Every call carries a token of its own, so its ``jti`` finds its decision.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest

from keybroker import errors
from keybroker import settings as settings_mod
from keybroker.adapters.audit_reader import decisions
from keybroker.client import KeyBrokerClient, TlsFiles
from keybroker.client.admin import KeyAdminClient
from keybroker.client.privacy import PrivacyClient
from keybroker.client.retry import NO_RETRY
from keybroker.devenv import ISSUER, DevEnv, mint_token, softhsm_module
from keybroker.server.app import connect_hsm
from keybroker.server.cpus import available_cpus
from tests.conftest import load_settings
from tests.deploy.kustomize import build
from tests.deploy.test_manifests import KUBERNETES, _container, _env, _one
from tests.support.process import BrokerProcess, free_port, run_cli, stop_all

pytestmark = pytest.mark.slow

T = TypeVar("T")

#: B and C must honour every change made through A within this many seconds.
HONOUR_WITHIN = 1.0
LOAD_THREADS = 3
#: Bounds of the whole load (each thread), whatever happens.
MAX_CALLS_PER_THREAD = 5000
#: The load's pace: a faster machine makes no more calls (or denials, which the broker journals
#: one by one only up to [limits] denials_per_minute per caller, 100 as shipped).
CALLS_PER_SECOND_PER_THREAD = 60
LOAD_DEADLINE = 90.0
PURPOSE = "support"


# -- the shipped configuration and what this machine changes -------------------------------------


def shipped_configuration() -> tuple[str, dict[str, str]]:
    """The dev overlay's keybroker.toml (ConfigMap) and its container's KEYBROKER_* variables
    (plus SOFTHSM2_CONF, which the dev overlay sets for the SoftHSM module)."""
    objects = build(KUBERNETES / "overlays" / "dev")
    toml: str = _one(objects, "ConfigMap", "keybroker-config")["data"]["keybroker.toml"]
    pod = _one(objects, "StatefulSet", "keybroker")["spec"]["template"]["spec"]
    env = {
        k: v
        for k, v in _env(_container(pod)).items()
        if k.startswith("KEYBROKER_") or k == "SOFTHSM2_CONF"
    }
    env.pop("KEYBROKER_CONFIG")  # the path inside the container; here: serve --config FILE
    return toml, env


def on_this_machine(devenv: DevEnv, postgres: str, port: int, journal: Path) -> dict[str, str]:
    """Everything that differs from the pod, and why: nothing else is changed."""
    return {
        # three replicas on one host: a port each, loopback only (the pod: 0.0.0.0:50051)
        "KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{port}",
        # and a health port each (the pod: 0.0.0.0:8081, for kubelet)
        "KEYBROKER_SERVER_HEALTH_LISTEN": f"127.0.0.1:{free_port()}",
        # three pods of 2 CPUs each ("auto": a worker per CPU) on this 2-core host: one each
        "KEYBROKER_SERVER_PROCESSES": "1",
        # the mounted Secrets (cert-manager, the issuer's JWKS, the HSM PIN, the audit keys)
        # are the dev environment's files here
        "KEYBROKER_TLS_CERT_FILE": str(devenv.cert("server")),
        "KEYBROKER_TLS_KEY_FILE": str(devenv.key("server")),
        "KEYBROKER_TLS_CLIENT_CA_FILE": str(devenv.ca_cert),
        "KEYBROKER_AUTH_ISSUER": ISSUER,
        "KEYBROKER_AUTH_JWKS_URL": "",
        "KEYBROKER_AUTH_JWKS_FILE": str(devenv.jwks),
        "KEYBROKER_HSM_MODULE": softhsm_module(),
        "KEYBROKER_HSM_PIN_FILE": str(devenv.pin_file),
        "SOFTHSM2_CONF": str(devenv.softhsm_conf),  # one token, shared by the three
        "KEYBROKER_AUDIT_CHAIN_KEY_FILE": str(devenv.chain_key),
        "KEYBROKER_AUDIT_SIGNING_KEY_FILE": str(devenv.checkpoint_key),
        "KEYBROKER_AUDIT_PSEUDONYM_KEY_FILE": str(devenv.pseudonym_key),
        # the pod's volume: a journal per replica
        "KEYBROKER_AUDIT_DIR": str(journal),
        # the dev overlay is one replica on SQLite; several replicas share PostgreSQL (as in
        # production), here this test's own database on the test server
        "KEYBROKER_STATE_URL": postgres,
    }


#: The settings on_this_machine may change (section, key); the test fails if any other differs.
ADAPTED = {
    ("server", "listen"),
    ("server", "health_listen"),
    ("server", "processes"),
    ("tls", "cert_file"),
    ("tls", "key_file"),
    ("tls", "client_ca_file"),
    ("auth", "issuer"),
    ("auth", "jwks_url"),
    ("auth", "jwks_file"),
    ("hsm", "module"),
    ("hsm", "pin_file"),
    ("audit", "chain_key_file"),
    ("audit", "signing_key_file"),
    ("audit", "pseudonym_key_file"),
    ("audit", "dir"),
    ("state", "url"),
}


def _differences(a: settings_mod.Settings, b: settings_mod.Settings) -> set[tuple[str, str]]:
    found = set()
    for section in fields(a):
        left, right = getattr(a, section.name), getattr(b, section.name)
        if not is_dataclass(left):
            if left != right:
                found.add((section.name, ""))
            continue
        for item in fields(left):
            if getattr(left, item.name) != getattr(right, item.name):
                found.add((section.name, item.name))
    return found


# -- calls, each with a token of its own ---------------------------------------------------------


class Tokens:
    """A token provider minting a new token for every call; ``last()`` is the ``jti`` of the
    calling thread's latest call (the SDK asks for the token on the calling thread)."""

    def __init__(self, devenv: DevEnv, scopes: list[str], *, mfa: bool = False) -> None:
        self._devenv = devenv
        self._scopes = scopes
        self._mfa = mfa
        self._local = threading.local()

    def __call__(self) -> str:
        token = mint_token(
            self._devenv, scopes=self._scopes, purposes=[PURPOSE], amr=["mfa"] if self._mfa else []
        )
        self._local.jti = jwt.decode(token, options={"verify_signature": False})["jti"]
        return token

    def last(self) -> str:
        jti: str = getattr(self._local, "jti", "")
        return jti


@dataclass
class Call:
    """One SDK call as the caller saw it (monotonic times)."""

    op: str
    recording: str
    where: str
    jti: str
    started: float
    ended: float
    result: Any = None
    error: errors.KeybrokerError | None = None

    @property
    def answered(self) -> str | None:
        """``allow`` or ``deny`` when a broker decided; None when none could (UNAVAILABLE)."""
        if self.error is None:
            return "allow"
        if isinstance(self.error, errors.UnavailableError):
            return None
        return "deny"

    @property
    def reason(self) -> str:
        return self.error.reason if self.error is not None else ""


@dataclass
class Recording:
    recording: str
    subject: str
    plaintext: bytes = field(repr=False)
    wrapped: bytes = field(repr=False)
    version: int


class Ledger:
    """Every call made and every recording made, shared by the load threads and the checks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.recordings: list[Recording] = []
        self.in_flight: Counter[str] = Counter()  # calls under way, by where they were sent

    def call(
        self, op: str, recording: str, where: str, tokens: Tokens, fn: Callable[[], T]
    ) -> Call:
        with self.lock:
            self.in_flight[where] += 1
        started = time.monotonic()
        try:
            result: Any = fn()
            error = None
        except errors.KeybrokerError as exc:
            result, error = None, exc
        finally:
            with self.lock:
                self.in_flight[where] -= 1
        call = Call(op, recording, where, tokens.last(), started, time.monotonic(), result, error)
        with self.lock:
            self.calls.append(call)
        return call

    def wait_in_flight(self, where: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.in_flight[where] >= count:
                    return
            time.sleep(0.001)

    def add(self, recording: Recording) -> None:
        with self.lock:
            self.recordings.append(recording)

    def pick(self, rng: random.Random, avoid: set[str] | frozenset[str] = frozenset()) -> Recording:
        """A recording at random, none of ``avoid`` (recording ids)."""
        with self.lock:
            return rng.choice([r for r in self.recordings if r.recording not in avoid])


@dataclass
class Timeline:
    """When each change was made through A (start and end of its call, monotonic)."""

    epoch_key: str = ""
    rotated: tuple[float, float] = (0.0, 0.0)
    disabled: tuple[float, float] = (0.0, 0.0)
    enabled: tuple[float, float] = (0.0, 0.0)
    erased: dict[str, tuple[float, float]] = field(default_factory=dict)
    killed: tuple[float, float] = (0.0, 0.0)


# -- the three replicas ------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    port: int
    journal: Path
    env: dict[str, str]
    process: BrokerProcess | None = None
    previous: list[BrokerProcess] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _start(devenv: DevEnv, config: Path, replica: Replica, log: Path) -> None:
    replica.process = BrokerProcess(devenv, log, replica.env, config=config, new_session=True)


def _wait(replica: Replica, workers: int) -> None:
    assert replica.process is not None
    replica.process.wait_listening(count=workers, timeout=60)


@pytest.fixture
def test_key(devenv: DevEnv) -> Iterator[str]:
    """A key of this test's own; its HSM objects (and its epoch keys') are destroyed after."""
    name = f"replicas-{uuid.uuid4().hex[:8]}"
    yield name
    keks = connect_hsm(load_settings(devenv))
    for ref in keks.versions_on_token():
        if ref.name.startswith(name):
            keks.destroy_version(ref)


def test_three_replicas_of_the_shipped_configuration(
    devenv: DevEnv, postgres_url: str, tmp_path: Path, test_key: str
) -> None:
    """See the module docstring; the measurements are printed (pytest -s shows them)."""
    started = time.monotonic()
    toml, shipped_env = shipped_configuration()
    config = tmp_path / "keybroker.toml"
    config.write_text(toml)  # the ConfigMap's file, unchanged
    replicas = []
    for name in "abc":
        port, journal = free_port(), tmp_path / f"journal-{name}"
        adapted = on_this_machine(devenv, postgres_url, port, journal)
        replicas.append(Replica(name, port, journal, {**shipped_env, **adapted}))
    a = replicas[0]
    as_shipped = settings_mod.load(config, environ=_keybroker(shipped_env))
    here = settings_mod.load(config, environ=_keybroker(a.env))
    assert _differences(as_shipped, here) <= ADAPTED
    workers = here.server.processes or available_cpus()  # "auto", as the broker counts

    for replica in replicas:
        _start(devenv, config, replica, tmp_path / f"replica-{replica.name}.log")
    try:
        for replica in replicas:
            _wait(replica, workers)
        print(f"three replicas serving after {time.monotonic() - started:.1f}s")
        answered = _run(devenv, tmp_path, config, replicas, test_key, workers)
    finally:
        stopping = time.monotonic()
        running = [r.process for r in replicas if r.process is not None]
        for process in running:  # all at once (each takes its time), and once only
            if process.proc.poll() is None:
                process.proc.send_signal(signal.SIGTERM)
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.proc.wait(60)
        codes = stop_all(running)  # the exit codes (and a kill for any that did not stop)
        print(f"stopped in {time.monotonic() - stopping:.1f}s")
        for replica in replicas:
            stop_all(replica.previous)
    assert codes == [0, 0, 0], [p.output()[-3000:] for p in running]
    _journals_hold_every_decision(config, replicas, answered)
    print(f"whole test {time.monotonic() - started:.1f}s")


def _keybroker(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("KEYBROKER_")}


def _run(
    devenv: DevEnv,
    tmp_path: Path,
    config: Path,
    replicas: list[Replica],
    test_key: str,
    workers: int,
) -> list[Call]:
    """The load and the changes; the calls that got an answer."""
    a, c = replicas[0], replicas[2]
    tls = TlsFiles(devenv.ca_cert, devenv.cert("client"), devenv.key("client"))
    ledger = Ledger()
    timeline = Timeline()
    begun = time.monotonic()

    def mark(label: str) -> None:
        print(f"[{time.monotonic() - begun:5.1f}s, {len(ledger.calls):4} calls] {label}")

    data_tokens = Tokens(devenv, ["keys:generate", "keys:unwrap"])
    admin_tokens = Tokens(devenv, ["keys:admin"], mfa=True)
    privacy_tokens = Tokens(devenv, ["privacy:erase", "privacy:hold"], mfa=True)
    admin = KeyAdminClient(a.target, tls=tls, token=admin_tokens)
    privacy = PrivacyClient(a.target, tls=tls, token=privacy_tokens)
    pinned = {
        r.name: KeyBrokerClient(r.target, tls=tls, token=data_tokens, timeout=5, retry=NO_RETRY)
        for r in replicas
    }

    def generate(where: str, kb: KeyBrokerClient, subject: str) -> Call:
        rec = f"rec-{uuid.uuid4().hex[:12]}"
        call = ledger.call(
            "generate", rec, where, data_tokens,
            lambda: kb.generate_data_key(rec, purposes=[PURPOSE], subject_ids=[subject],
                                         key_name=test_key),
        )  # fmt: skip
        if call.error is None:
            key = call.result
            ledger.add(Recording(rec, subject, key.plaintext, key.wrapped, key.key_ref.version))
            timeline.epoch_key = key.key_ref.name
        return call

    def unwrap(where: str, kb: KeyBrokerClient, rec: Recording) -> Call:
        return ledger.call(
            "unwrap", rec.recording, where, data_tokens,
            lambda: kb.unwrap_data_key(rec.recording, rec.wrapped, purpose=PURPOSE),
        )  # fmt: skip

    def administer(op: str, target: str, tokens: Tokens, fn: Callable[[], T]) -> Call:
        call = ledger.call(op, target, "a", tokens, fn)
        assert call.error is None, (op, call.error)
        return call

    # The key, made through A; at once its first recordings through all three at the same
    # moment, so the three race to make its retention-epoch key.
    administer("CreateKey", test_key, admin_tokens, lambda: admin.create_key(test_key))
    with ThreadPoolExecutor(6) as pool:
        seeds = list(pool.map(lambda n: generate(replicas[n % 3].name, pinned[replicas[n % 3].name],
                                                 f"subj-{n % 3}"), range(6)))  # fmt: skip
    assert [call.error for call in seeds] == [None] * 6
    epoch_key = timeline.epoch_key
    assert epoch_key.startswith(f"{test_key}.e"), epoch_key

    # Storage-service load, round robin over the three, from start to end.
    stop = threading.Event()
    load_errors: list[BaseException] = []

    def load(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + LOAD_DEADLINE
        targets = [r.target for r in replicas]
        try:
            with KeyBrokerClient(targets, tls=tls, token=data_tokens, timeout=10,
                                 server_name="localhost") as kb:  # fmt: skip
                due = time.monotonic()
                for _ in range(MAX_CALLS_PER_THREAD):
                    if stop.is_set() or time.monotonic() > deadline:
                        return
                    due += 1 / CALLS_PER_SECOND_PER_THREAD  # at most, however fast the machine
                    time.sleep(max(0.0, due - time.monotonic()))
                    if rng.random() < 0.3:
                        generate("any", kb, f"subj-{rng.randrange(3)}")
                    else:
                        unwrap("any", kb, ledger.pick(rng))
        except BaseException as exc:  # asserted below
            load_errors.append(exc)

    threads = [threading.Thread(target=load, args=(seed,)) for seed in range(LOAD_THREADS)]
    for thread in threads:
        thread.start()
    lags: dict[str, dict[str, float]] = {}

    def honoured(change: str, check: Callable[[str], bool]) -> None:
        """Poll B and C (and A) until ``check(replica)`` holds; at most HONOUR_WITHIN each."""
        made = time.monotonic()
        lags[change] = {}
        for name in ("a", "b", "c"):
            while not check(name):
                assert time.monotonic() - made < HONOUR_WITHIN, f"{name} ignores {change}"
                time.sleep(0.01)
            lags[change][name] = time.monotonic() - made

    try:
        mark("load started")
        _settle(ledger, 150)

        # -- rotation of the epoch key through A: B and C wrap under the new version; a key A
        # wraps under it at once unwraps on B and C at once (never "invalid")
        timeline.rotated = _span(administer("RotateKey", epoch_key, admin_tokens,
                                            lambda: admin.rotate_key(epoch_key)))  # fmt: skip
        first = generate("a", pinned["a"], "subj-0")
        assert first.error is None and first.result.key_ref.version == 2, first
        fresh = next(r for r in ledger.recordings if r.recording == first.recording)
        for name in ("b", "c"):
            unwrapped = unwrap(name, pinned[name], fresh)
            assert unwrapped.error is None, (name, unwrapped.error)

        def wraps_v2(name: str) -> bool:
            call = generate(name, pinned[name], "subj-0")
            assert call.error is None, call.error
            return bool(call.result.key_ref.version == 2)

        honoured("rotation", wraps_v2)
        mark("rotation honoured")
        _settle(ledger, 100)

        # -- disable version 1 through A: B and C refuse it; enable it again: they serve it
        old = next(r for r in ledger.recordings if r.version == 1)
        timeline.disabled = _span(administer("DisableKeyVersion", epoch_key, admin_tokens,
                                             lambda: admin.disable_version(epoch_key, 1)))  # fmt: skip

        def refuses_v1(name: str) -> bool:
            call = unwrap(name, pinned[name], old)
            return call.reason == "key_version_disabled"

        honoured("disable", refuses_v1)
        _settle(ledger, 30)
        timeline.enabled = _span(administer("EnableKeyVersion", epoch_key, admin_tokens,
                                            lambda: admin.enable_version(epoch_key, 1)))  # fmt: skip

        def serves_v1(name: str) -> bool:
            return unwrap(name, pinned[name], old).error is None

        honoured("enable", serves_v1)
        mark("disable and enable honoured")
        _settle(ledger, 100)

        # -- erasure of a recording and of a subject through A: B and C refuse their keys
        # never ``old`` (the v1 key served again after C's restart) nor a key erased already
        victim = ledger.pick(random.Random(7), avoid={old.recording})
        _erase(ledger, timeline, privacy, privacy_tokens, "recording", victim.recording)

        def refuses(rec: Recording) -> Callable[[str], bool]:
            return lambda name: unwrap(name, pinned[name], rec).reason == "erased"

        honoured("erase recording", refuses(victim))
        doomed = [generate("a", pinned["a"], "subj-doomed") for _ in range(3)]
        assert all(call.error is None for call in doomed)
        _erase(ledger, timeline, privacy, privacy_tokens, "subject", "subj-doomed")
        of_subject = [r for r in ledger.recordings if r.subject == "subj-doomed"]
        honoured("erase subject", lambda name: all(refuses(r)(name) for r in of_subject))
        mark("erasures honoured")
        _settle(ledger, 100)

        # -- legal hold through A: B and C refuse to erase the recording; released: they erase
        held = next(
            r
            for r in ledger.recordings
            if r.subject == "subj-1" and r.recording not in {old.recording, *timeline.erased}
        )
        administer("PlaceLegalHold", held.recording, privacy_tokens,
                   lambda: privacy.place_hold(recording_id=held.recording, reason="case 1"))  # fmt: skip
        hold_clients = {r.name: PrivacyClient(r.target, tls=tls, token=privacy_tokens)
                        for r in replicas}  # fmt: skip

        def keeps_held(name: str) -> bool:
            call = ledger.call(
                "EraseRecording", held.recording, name, privacy_tokens,
                lambda: hold_clients[name].erase_recording(held.recording, reason="try"),
            )  # fmt: skip
            return call.reason == "legal_hold"

        honoured("legal hold", keeps_held)
        administer("ReleaseLegalHold", held.recording, privacy_tokens,
                   lambda: privacy.release_hold(recording_id=held.recording))  # fmt: skip
        erased = ledger.call(
            "EraseRecording", held.recording, "b", privacy_tokens,
            lambda: hold_clients["b"].erase_recording(held.recording, reason="released"),
        )  # fmt: skip
        assert erased.error is None, erased.error
        timeline.erased[held.recording] = _span(erased)
        honoured("hold released, erased through b", refuses(held))
        mark("hold honoured")
        for client in hold_clients.values():
            client.close()
        _settle(ledger, 100)

        # -- C killed with SIGKILL under load (calls of its own in flight too), restarted on
        # its journal
        assert c.process is not None
        burst_stop = threading.Event()

        def burst(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(200):
                if burst_stop.is_set():
                    return
                unwrap("c", pinned["c"], ledger.pick(rng))

        with ThreadPoolExecutor(4) as pool:
            bursts = [pool.submit(burst, seed) for seed in range(100, 104)]
            ledger.wait_in_flight("c", 3, timeout=5.0)
            kill_at = time.monotonic()
            c.process.kill_group()
            burst_stop.set()
        for done in bursts:
            done.result()
        mark("c killed")
        assert c.process.proc.wait(10) < 0
        c.previous.append(c.process)
        # the journal as the kill left it (no final checkpoint, maybe a torn last record)
        crashed = run_cli("audit", "verify", "--config", str(config), "--dir", str(c.journal),
                          env=c.env)  # fmt: skip
        assert crashed.returncode == 0, (crashed.stdout, crashed.stderr)
        print(f"c's journal as the kill left it: {crashed.stdout.strip().splitlines()[1:]}")
        _settle(ledger, 60)
        _start(devenv, config, c, tmp_path / "replica-c-restarted.log")
        _wait(c, workers)
        back = time.monotonic()
        timeline.killed = (kill_at, back)
        print(f"c killed and serving again after {back - kill_at:.1f}s")
        with ledger.lock:
            in_flight = [call for call in ledger.calls if call.started < kill_at < call.ended]
        assert in_flight, "no call was in flight when c was killed"
        print(f"{len(in_flight)} calls in flight at the kill")
        pinned["c"].close()
        pinned["c"] = KeyBrokerClient(c.target, tls=tls, token=data_tokens, timeout=5,
                                      retry=NO_RETRY)  # fmt: skip
        # the storage services' round robin comes back to it (gRPC reconnects with backoff)
        rejoined = _load_reaches(ledger, c, back, timeout=20.0)
        print(f"the round-robin load reached the restarted c {rejoined - back:.1f}s after")
        # the restarted replica serves the state of before: version 2, the erasures
        assert wraps_v2("c")
        assert refuses(victim)("c")
        v1_after_restart = unwrap("c", pinned["c"], old)
        assert v1_after_restart.error is None, v1_after_restart.error  # serves v1
        after_restart = ledger.pick(random.Random(11), avoid={old.recording, *timeline.erased})
        _erase(ledger, timeline, privacy, privacy_tokens, "recording", after_restart.recording)
        honoured("erase after the restart", refuses(after_restart))
        mark("c restarted, erasure honoured")
        _settle(ledger, 100)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        for kb in pinned.values():
            kb.close()
        admin.close()
        privacy.close()
    assert load_errors == []
    for change, lag in lags.items():
        print(
            f"{change}: in force on "
            + ", ".join(f"{n} by {s * 1000:.0f} ms" for n, s in lag.items())
            + " (polled in turn)"
        )

    wrong = _wrong_answers(ledger, timeline)
    counts = Counter(
        (call.op, call.answered or f"unanswered {call.reason}") for call in ledger.calls
    )
    print(f"{len(ledger.calls)} calls: {dict(counts)}")
    assert wrong == [], wrong[:20]
    answered = [call for call in ledger.calls if call.answered]
    assert len(answered) >= 0.95 * len(ledger.calls)
    mark("load checked")
    return answered


def _load_reaches(ledger: Ledger, replica: Replica, since: float, timeout: float) -> float:
    """When a load call started after ``since`` is first found in ``replica``'s journal."""
    deadline = time.monotonic() + timeout
    while True:
        with ledger.lock:
            load = {c.jti for c in ledger.calls if c.where == "any" and c.started > since}
        if any(d.token_id in load for _ts, d in decisions(replica.journal)):
            return time.monotonic()
        assert time.monotonic() < deadline, f"no load call reached {replica.name} again"
        time.sleep(0.2)


def _span(call: Call) -> tuple[float, float]:
    return (call.started, call.ended)


def _settle(ledger: Ledger, calls: int, timeout: float = 20.0) -> None:
    """Let the load make ``calls`` more calls (bounded in time)."""
    with ledger.lock:
        target = len(ledger.calls) + calls
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with ledger.lock:
            if len(ledger.calls) >= target:
                return
        time.sleep(0.02)


def _erase(
    ledger: Ledger,
    timeline: Timeline,
    privacy: PrivacyClient,
    tokens: Tokens,
    kind: str,
    target: str,
) -> None:
    if kind == "recording":
        call = ledger.call("EraseRecording", target, "a", tokens,
                           lambda: privacy.erase_recording(target, reason="art. 17"))  # fmt: skip
    else:
        call = ledger.call("EraseSubject", target, "a", tokens,
                           lambda: privacy.erase_subject(target, reason="art. 17"))  # fmt: skip
    assert call.error is None, call.error
    print(f"erase {kind}: the call took {(call.ended - call.started) * 1000:.0f} ms")
    if kind == "recording":
        timeline.erased[target] = _span(call)
    else:
        for rec in ledger.recordings:
            if rec.subject == target:
                timeline.erased[rec.recording] = _span(call)


def _wrong_answers(ledger: Ledger, timeline: Timeline) -> list[str]:
    """Every answer the state of the moment did not allow."""
    by_id = {r.recording: r for r in ledger.recordings}
    wrong = []
    killed = timeline.killed
    for call in ledger.calls:
        if call.op == "generate":
            wrong += _wrong_generate(call, timeline, killed)
        elif call.op == "unwrap":
            wrong += _wrong_unwrap(call, by_id[call.recording], timeline)
    return wrong


def _wrong_generate(call: Call, timeline: Timeline, killed: tuple[float, float]) -> list[str]:
    what = f"generate {call.recording} on {call.where}"
    if call.error is not None:
        in_kill = killed[0] <= call.ended and call.started <= killed[1] + 5
        if call.answered and not (in_kill and isinstance(call.error, errors.AlreadyExistsError)):
            return [f"{what}: refused {call.error!r}"]
        return []
    version = call.result.key_ref.version
    if call.started > timeline.rotated[1] + HONOUR_WITHIN and version != 2:
        return [f"{what}: version {version} after the rotation"]
    if call.ended < timeline.rotated[0] and version != 1:
        return [f"{what}: version {version} before the rotation"]
    return []


def _wrong_unwrap(call: Call, rec: Recording, timeline: Timeline) -> list[str]:
    what = f"unwrap {call.recording} (v{rec.version}) on {call.where}"
    erased = timeline.erased.get(call.recording)
    disabled, enabled = timeline.disabled, timeline.enabled
    if call.error is None:
        in_force = (disabled[1] + HONOUR_WITHIN, enabled[0])
        problems = {
            "a wrong key": call.result.plaintext != rec.plaintext,
            "a key after its erasure": erased is not None and call.started > erased[1],
            "a key under a disabled version": rec.version == 1
            and in_force[0] < call.started
            and call.ended < in_force[1],
        }
        return [f"{what}: {problem}" for problem, found in problems.items() if found]
    allowed = {
        # no broker could decide (killed, overloaded): not an answer
        "": not call.answered,
        "erased": erased is not None and call.ended > erased[0],
        "key_version_disabled": rec.version == 1
        and call.ended > disabled[0]
        and call.started < enabled[1] + HONOUR_WITHIN,
    }
    if allowed.get("" if not call.answered else call.reason, False):
        return []
    return [f"{what}: refused {call.error!r}"]


def _journals_hold_every_decision(
    config: Path, replicas: list[Replica], answered: list[Call]
) -> None:
    """``keybroker audit verify`` accepts each replica's journal (C's torn by the kill), and
    every answered call's decision is in one of them, with the outcome the caller saw."""

    def verify(replica: Replica) -> subprocess.CompletedProcess[str]:
        return run_cli("audit", "verify", "--config", str(config), "--dir", str(replica.journal),
                       env=replica.env)  # fmt: skip

    with ThreadPoolExecutor(len(replicas)) as pool:
        verified = list(pool.map(verify, replicas))
    journaled: dict[str, set[str]] = {}
    served_by: dict[str, str] = {}
    for replica, done in zip(replicas, verified, strict=True):
        assert done.returncode == 0, (replica.name, done.stdout, done.stderr)
        print(f"audit verify {replica.name}: {done.stdout.strip().splitlines()[1:]}")
        for _ts, decision in decisions(replica.journal):
            if decision.token_id:
                journaled.setdefault(decision.token_id, set()).add(str(decision.outcome))
                served_by[decision.token_id] = replica.name
    balanced = Counter(served_by.get(call.jti) for call in answered if call.where == "any")
    print(f"the round-robin load, by the replica that answered: {dict(balanced)}")
    assert all(balanced[replica.name] for replica in replicas), balanced
    missing = [
        f"{call.op} {call.recording} on {call.where}: {call.answered}"
        for call in answered
        if call.answered not in journaled.get(call.jti, set())
    ]
    assert missing == [], (len(missing), missing[:20])
    print(f"{len(answered)} answered calls, each with its decision in a journal")
