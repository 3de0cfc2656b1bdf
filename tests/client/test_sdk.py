"""The client SDK against a real broker, one set of tests for both clients (blocking and asyncio):
typed errors, retries, token files, trace propagation, batch rewrap, and recording encryption end
to end with bounded memory."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import inspect
import io
import os
import threading
import time
import tracemalloc
import typing
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

from keybroker import errors
from keybroker.client import (
    NO_RETRY,
    AsyncKeyBrokerClient,
    KeyBrokerClient,
    RetryPolicy,
    TlsFiles,
    TokenFile,
    _api,
)
from keybroker.client.recording import RecordingHeader
from keybroker.devenv import DevEnv, mint_token
from keybroker.server.app import RunningBroker
from tests.conftest import Clock, TokenFactory
from tests.support.process import BrokerProcess, free_port

_SUFFIX = ""


@pytest.fixture(autouse=True)
def _fresh_recording_ids() -> None:
    """The broker registers a recording id once: every test (and flavour) gets its own ids."""
    global _SUFFIX  # noqa: PLW0603 - read by R() in this module's tests
    _SUFFIX = uuid.uuid4().hex[:8]


def R(name: str) -> str:
    """This test's recording id ``name``."""
    return f"{name}-{_SUFFIX}"


Spans = Callable[[], Sequence[ReadableSpan]]
FLAVOURS = ["blocking", "asyncio"]


def tls(env: DevEnv) -> TlsFiles:
    return TlsFiles(env.ca_cert, env.cert("client"), env.key("client"))


class Client:
    """Either client behind one face: a blocking client's methods are called, an asyncio
    client's are awaited on a loop of the test's own, so one test body exercises both."""

    def __init__(self, flavour: str, target: str | Sequence[str], **kwargs: Any) -> None:
        self.flavour = flavour
        self._loop: asyncio.AbstractEventLoop | None = None
        if flavour == "asyncio":
            self._loop = asyncio.new_event_loop()

            async def make() -> AsyncKeyBrokerClient:
                return AsyncKeyBrokerClient(target, **kwargs)

            self._client: Any = self._loop.run_until_complete(make())
        else:
            self._client = KeyBrokerClient(target, **kwargs)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if self._loop is None:
                return result
            assert inspect.iscoroutine(result), f"{name} of the asyncio client is not awaitable"
            return self._loop.run_until_complete(result)

        return call

    def close(self) -> None:
        if self._loop is None:
            self._client.close()
            return
        self._loop.run_until_complete(self._client.close())
        self._loop.close()


ClientFactory = Callable[..., Client]


@pytest.fixture(params=FLAVOURS)
def make_client(request: pytest.FixtureRequest, devenv: DevEnv) -> Iterator[ClientFactory]:
    """``make_client(target, token=..., **kwargs)``: the parametrised flavour, closed afterwards."""
    made: list[Client] = []

    def make(target: str | Sequence[str], **kwargs: Any) -> Client:
        kwargs.setdefault("tls", tls(devenv))
        made.append(Client(request.param, target, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(make_client: ClientFactory, broker: RunningBroker, token: TokenFactory) -> Client:
    return make_client(f"127.0.0.1:{broker.port}", token=token())


# -- the two clients declare the same API --------------------------------------------------------


def _public_methods(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, callable)
        if not name.startswith("_") and name not in {"close", "from_files"}
    }


def _return_type(cls: type, name: str) -> Any:
    """The return type of ``cls.name`` with the class's generic parameters filled in."""
    hints = typing.get_type_hints(getattr(cls, name))
    ret = hints["return"]
    for base in getattr(cls, "__orig_bases__", ()):
        origin = typing.get_origin(base)
        if origin is _api.KeyBrokerApi:
            params = getattr(origin, "__parameters__")  # noqa: B009 - not in the stubs
            return dict(zip(params, typing.get_args(base), strict=True)).get(ret, ret)
    return ret


def test_both_clients_have_the_same_methods_and_signatures() -> None:
    """Every public method of the blocking client exists on the asyncio client with the same
    parameters; where the blocking one returns T, the asyncio one returns a coroutine of T."""
    sync, aio = _public_methods(KeyBrokerClient), _public_methods(AsyncKeyBrokerClient)
    assert set(sync) == set(aio)
    assert {"encrypt_recording", "decrypt_recording", "rewrap_data_keys"} <= set(aio)
    for name in sync:
        s_sig, a_sig = inspect.signature(sync[name]), inspect.signature(aio[name])
        assert s_sig.parameters == a_sig.parameters, name
        s_ret, a_ret = _return_type(KeyBrokerClient, name), _return_type(AsyncKeyBrokerClient, name)
        assert typing.get_origin(a_ret) is Coroutine, name
        assert typing.get_args(a_ret)[-1] == s_ret, name
    assert inspect.signature(KeyBrokerClient.__init__) == inspect.signature(
        AsyncKeyBrokerClient.__init__
    )
    assert inspect.signature(KeyBrokerClient.from_files) == inspect.signature(
        AsyncKeyBrokerClient.from_files
    )


# -- calls ------------------------------------------------------------------------------------------


def test_round_trip_and_rewrap(client: Client) -> None:
    """generate -> unwrap -> rewrap -> unwrap gives the same key; reprs hide key material."""
    key = client.generate_data_key(
        R("rec-sdk"), purposes=["support"], subject_ids=["s1"], context={"t": "1"}
    )
    assert key.plaintext.hex() not in repr(key)
    again = client.unwrap_data_key(R("rec-sdk"), key.wrapped, purpose="support", context={"t": "1"})
    assert again.plaintext == key.plaintext
    moved = client.rewrap_data_key(R("rec-sdk"), key.wrapped)
    assert (
        client.unwrap_data_key(
            R("rec-sdk"), moved.wrapped, purpose="support", context={"t": "1"}
        ).plaintext
        == key.plaintext
    )
    wrapped_only = client.generate_wrapped_data_key(R("rec-sdk2"), purposes=["support"])
    assert wrapped_only.key_ref.name.startswith("recordings.e")  # a retention epoch key


def test_batch_rewrap_returns_a_result_or_an_error_per_item(client: Client) -> None:
    """rewrap_data_keys: one result per item, in order; a bad item is its domain error."""
    a = client.generate_wrapped_data_key(R("rec-b1"), purposes=["support"])
    b = client.generate_wrapped_data_key(R("rec-b2"), purposes=["support"])
    results = client.rewrap_data_keys(
        [(R("rec-b1"), a.wrapped), (R("rec-b2"), b.wrapped[:-1]), (R("rec-b1"), b.wrapped)]
    )
    assert len(results) == 3
    assert results[0].key_ref == a.key_ref
    assert isinstance(results[1], errors.InvalidWrappedKeyError)
    assert isinstance(results[2], errors.PermissionDeniedError)
    assert client.unwrap_data_key(R("rec-b1"), results[0].wrapped, purpose="support").plaintext


def test_errors_are_typed(client: Client, clock: Clock, spans: Spans) -> None:
    """Each refusal raises its domain class with the server's message and reason."""
    key = client.generate_data_key(
        R("rec-e"),
        purposes=["support"],
        retain_until=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    with pytest.raises(errors.PermissionDeniedError) as denied:
        client.unwrap_data_key(R("rec-e"), key.wrapped, purpose="marketing")
    assert denied.value.reason == "purpose_not_granted"
    with pytest.raises(errors.InvalidWrappedKeyError):
        client.unwrap_data_key(R("rec-e"), key.wrapped[:-1], purpose="support")
    with pytest.raises(errors.AlreadyExistsError) as exists:
        client.generate_data_key(R("rec-e"), purposes=["support"])
    assert exists.value.reason == "recording_registered"
    with pytest.raises(errors.NotFoundError):
        client.generate_data_key(R("rec-e-2"), purposes=["support"], key_name="nope")
    with pytest.raises(errors.InvalidRequestError):
        client.generate_data_key("", purposes=["support"])
    clock.offset = 7200
    with pytest.raises(errors.RetentionExpiredError):
        client.unwrap_data_key(R("rec-e"), key.wrapped, purpose="support")


def test_bad_token_is_authentication_error(
    make_client: ClientFactory, broker: RunningBroker
) -> None:
    """An invalid token surfaces as AuthenticationError."""
    kb = make_client(f"127.0.0.1:{broker.port}", token="not-a-token")
    with pytest.raises(errors.AuthenticationError):
        kb.generate_data_key("r", purposes=["support"])


def test_denials_are_never_retried(client: Client, spans: Spans) -> None:
    """A PERMISSION_DENIED is raised after exactly one call, whatever the retry policy."""
    key = client.generate_data_key(R("rec-r"), purposes=["support"])
    before = len(spans())
    with pytest.raises(errors.PermissionDeniedError):
        client.unwrap_data_key(R("rec-r"), key.wrapped, purpose="ads")
    assert len(spans()) - before == 1


def test_unavailable_is_retried_until_the_broker_is_back(
    make_client: ClientFactory, devenv: DevEnv, tmp_path: Path
) -> None:
    """The client rides out a broker restart within its deadline (wait-for-ready plus gRPC's
    retry on UNAVAILABLE); with NO_RETRY it fails at once with UnavailableError."""
    port = free_port()
    env = {"KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{port}"}
    first = BrokerProcess(devenv, tmp_path / "a.log", env)
    first.wait_listening()
    token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    retry = RetryPolicy(initial_backoff=0.05, max_backoff=0.3)
    kb = make_client(f"127.0.0.1:{port}", token=token, retry=retry, timeout=30)
    key = kb.generate_data_key(R("rec-restart"), purposes=["support"])
    assert first.stop() == 0
    second: list[BrokerProcess] = []

    def restart() -> None:
        time.sleep(1.0)
        second.append(BrokerProcess(devenv, tmp_path / "b.log", env))

    threading.Thread(target=restart).start()
    try:
        started = time.monotonic()
        got = kb.unwrap_data_key(R("rec-restart"), key.wrapped, purpose="support")
        assert got.plaintext == key.plaintext
        assert time.monotonic() - started >= 1.0  # it did wait for the restart
    finally:
        deadline = time.monotonic() + 30
        while not second and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in second:
            proc.stop()
    fail_fast = make_client(f"127.0.0.1:{port}", token=token, retry=NO_RETRY, timeout=10)
    started = time.monotonic()
    with pytest.raises(errors.UnavailableError):
        fail_fast.generate_data_key(R("rec-x"), purposes=["support"])
    assert time.monotonic() - started < 5


def test_token_file_is_reread_when_it_changes(
    make_client: ClientFactory, broker: RunningBroker, tmp_path: Path, token: TokenFactory
) -> None:
    """A TokenFile picks up a refreshed token without a new client."""
    path = tmp_path / "token"
    path.write_text(token(scopes=["keys:unwrap"]) + "\n")
    kb = make_client(f"127.0.0.1:{broker.port}", token=TokenFile(path))
    with pytest.raises(errors.PermissionDeniedError):
        kb.generate_data_key(R("rec-tf"), purposes=["support"])
    path.write_text(token(scopes=["keys:generate"]) + "\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert len(kb.generate_data_key(R("rec-tf"), purposes=["support"]).plaintext) == 32


def test_trace_context_is_propagated(client: Client, spans: Spans) -> None:
    """A call made inside a client span becomes the parent of the broker's decision span."""
    tracer = TracerProvider().get_tracer("storage-service")
    with tracer.start_as_current_span("store-recording") as parent:
        client.generate_data_key(R("rec-trace"), purposes=["support"])
    decision = spans()[-1]
    assert decision.context.trace_id == parent.get_span_context().trace_id
    assert decision.parent is not None
    assert decision.parent.span_id == parent.get_span_context().span_id
    assert trace.get_current_span().get_span_context().is_valid is False


# -- recordings -------------------------------------------------------------------------------------


def test_recording_round_trip_and_refusals(client: Client) -> None:
    """encrypt_recording/decrypt_recording end to end; wrong purpose and a forged header are refused."""
    audio = os.urandom(300_000)
    sealed = io.BytesIO()
    ref = client.encrypt_recording(
        io.BytesIO(audio),
        sealed,
        recording_id=R("rec-file"),
        purposes=["support"],
        segment_size=65536,
    )
    assert ref.name.startswith("recordings.e")
    out = io.BytesIO()
    header = client.decrypt_recording(io.BytesIO(sealed.getvalue()), out, purpose="support")
    assert out.getvalue() == audio
    assert header.recording_id == R("rec-file")
    with pytest.raises(errors.PermissionDeniedError):
        client.decrypt_recording(io.BytesIO(sealed.getvalue()), io.BytesIO(), purpose="marketing")
    forged = sealed.getvalue().replace(R("rec-file").encode(), R("rec-fake").encode(), 1)
    with pytest.raises(errors.PermissionDeniedError) as info:
        client.decrypt_recording(io.BytesIO(forged), io.BytesIO(), purpose="support")
    assert info.value.reason == "recording_mismatch"


def test_damaged_recordings_raise_integrity_errors(client: Client) -> None:
    """A truncated file and a file that is no recording raise RecordingIntegrityError."""
    sealed = io.BytesIO()
    client.encrypt_recording(
        io.BytesIO(os.urandom(20_000)), sealed, recording_id=R("rec-d"), purposes=["support"],
        segment_size=4096,
    )  # fmt: skip
    with pytest.raises(errors.RecordingIntegrityError):
        client.decrypt_recording(
            io.BytesIO(sealed.getvalue()[:-1]), io.BytesIO(), purpose="support"
        )
    with pytest.raises(errors.RecordingIntegrityError) as info:
        client.decrypt_recording(io.BytesIO(b"RIFF" + bytes(200)), io.BytesIO(), purpose="support")
    assert info.value.reason == "not_a_recording"


def test_bad_segment_size_is_refused_before_the_broker_is_asked(
    client: Client, spans: Spans
) -> None:
    """An out-of-range segment size raises ValueError and makes no call (no decision span)."""
    before = len(spans())
    with pytest.raises(ValueError, match="segment size"):
        client.encrypt_recording(
            io.BytesIO(b"x"), io.BytesIO(), recording_id=R("rec-s"), purposes=["support"],
            segment_size=10,
        )  # fmt: skip
    assert len(spans()) == before


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as they are read (nothing held)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


class _Digest(io.RawIOBase):
    """Hashes what is written and keeps nothing."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(data)
        return len(data)


def test_recording_encryption_memory_is_bounded_by_segments(client: Client) -> None:
    """A 48 MiB stream (64 KiB segments) is encrypted and decrypted with traced memory well under
    1 MiB above the start: two segments, not the file, whichever client runs it."""
    size, segment = 48 * 1024 * 1024, 65536
    sealed_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kb-mem-{os.getpid()}.kbr"
    tracemalloc.start()
    try:
        with sealed_path.open("wb") as sealed:
            client.encrypt_recording(
                _Zeros(size), sealed, recording_id=R("rec-mem"), purposes=["support"],
                segment_size=segment,
            )  # fmt: skip
        _, peak_encrypt = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        digest = _Digest()
        with sealed_path.open("rb") as src:
            client.decrypt_recording(src, digest, purpose="support")
        _, peak_decrypt = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sealed_path.unlink(missing_ok=True)
    assert digest.size == size
    assert digest.hash.digest() == hashlib.sha256(bytes(size)).digest()
    assert peak_encrypt < 1024 * 1024, peak_encrypt
    assert peak_decrypt < 1024 * 1024, peak_decrypt


def test_a_recording_decrypts_with_its_rewrapped_key_from_the_database(client: Client) -> None:
    """After a rewrap job replaced the stored wrapped key, the file (header unchanged) decrypts
    with the new copy; a wrapped key of another recording is refused by the broker."""
    audio = os.urandom(10_000)
    sealed = io.BytesIO()
    client.encrypt_recording(
        io.BytesIO(audio), sealed, recording_id=R("rec-rw"), purposes=["support"]
    )
    header = RecordingHeader.read(io.BytesIO(sealed.getvalue()))
    current = client.rewrap_data_key(R("rec-rw"), header.wrapped_key).wrapped
    assert current != header.wrapped_key
    out = io.BytesIO()
    client.decrypt_recording(
        io.BytesIO(sealed.getvalue()), out, purpose="support", wrapped_key=current
    )
    assert out.getvalue() == audio
    other = client.generate_wrapped_data_key(R("rec-other"), purposes=["support"]).wrapped
    with pytest.raises(errors.PermissionDeniedError) as info:
        client.decrypt_recording(
            io.BytesIO(sealed.getvalue()), io.BytesIO(), purpose="support", wrapped_key=other
        )
    assert info.value.reason == "recording_mismatch"


def test_an_unaccepted_certificate_ends_at_the_deadline_with_a_useful_message(
    make_client: ClientFactory, devenv: DevEnv, broker: RunningBroker, token: TokenFactory
) -> None:
    """A client certificate from a foreign CA never completes the handshake: with the default
    wait-for-ready the call ends at its deadline as UnavailableError saying what that may mean;
    with NO_RETRY it fails at once with gRPC's connection error."""
    foreign = TlsFiles(devenv.ca_cert, devenv.cert("foreign"), devenv.key("foreign"))
    target = f"127.0.0.1:{broker.port}"
    waiting = make_client(target, tls=foreign, token=token(), timeout=1.0)
    started = time.monotonic()
    with pytest.raises(errors.UnavailableError) as info:
        waiting.generate_data_key(R("rec-tls"), purposes=["support"])
    assert 0.9 < time.monotonic() - started < 5
    assert info.value.reason == "deadline_exceeded"
    assert "TLS handshake" in info.value.message
    at_once = make_client(target, tls=foreign, token=token(), timeout=10, retry=NO_RETRY)
    started = time.monotonic()
    with pytest.raises(errors.UnavailableError) as info:
        at_once.generate_data_key(R("rec-tls"), purposes=["support"])
    assert time.monotonic() - started < 5
    assert "deadline" not in info.value.message
