"""The client SDK against a real broker: sync and asyncio, typed errors, retries, token files,
trace propagation, and recording encryption end to end."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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
)
from keybroker.devenv import DevEnv, mint_token
from keybroker.server.app import RunningBroker
from tests.conftest import Clock, TokenFactory
from tests.support.process import BrokerProcess, free_port

Spans = Callable[[], Sequence[ReadableSpan]]


def tls(env: DevEnv) -> TlsFiles:
    return TlsFiles(env.ca_cert, env.cert("client"), env.key("client"))


@pytest.fixture
def client(devenv: DevEnv, broker: RunningBroker, token: TokenFactory) -> KeyBrokerClient:
    return KeyBrokerClient(f"127.0.0.1:{broker.port}", tls=tls(devenv), token=token())


def test_sync_round_trip_and_rewrap(client: KeyBrokerClient) -> None:
    """generate -> unwrap -> rewrap -> unwrap gives the same key; reprs hide key material."""
    with client:
        key = client.generate_data_key(
            "rec-sdk", purposes=["support"], subject_ids=["s1"], context={"t": "1"}
        )
        assert key.plaintext.hex() not in repr(key)
        assert (
            client.unwrap_data_key(
                "rec-sdk", key.wrapped, purpose="support", context={"t": "1"}
            ).plaintext
            == key.plaintext
        )
        moved = client.rewrap_data_key("rec-sdk", key.wrapped)
        assert (
            client.unwrap_data_key(
                "rec-sdk", moved.wrapped, purpose="support", context={"t": "1"}
            ).plaintext
            == key.plaintext
        )
        wrapped_only = client.generate_wrapped_data_key("rec-sdk2", purposes=["support"])
        assert wrapped_only.key_ref.name.startswith("recordings.e")  # a retention epoch key


def test_async_round_trip(devenv: DevEnv, broker: RunningBroker, token: TokenFactory) -> None:
    """The asyncio client has the same API."""

    async def run() -> None:
        async with AsyncKeyBrokerClient(
            f"127.0.0.1:{broker.port}", tls=tls(devenv), token=token()
        ) as kb:
            key = await kb.generate_data_key("rec-async", purposes=["support"])
            got = await kb.unwrap_data_key("rec-async", key.wrapped, purpose="support")
            assert got.plaintext == key.plaintext
            with pytest.raises(errors.PermissionDeniedError):
                await kb.unwrap_data_key("rec-async", key.wrapped, purpose="marketing")
            assert (await kb.rewrap_data_key("rec-async", key.wrapped)).key_ref.version == 1
            assert (await kb.generate_wrapped_data_key("rec-a2", purposes=["support"])).wrapped

    asyncio.run(run())


def test_errors_are_typed(client: KeyBrokerClient, clock: Clock, spans: Spans) -> None:
    """Each refusal raises its domain class with the server's message and reason."""
    key = client.generate_data_key(
        "rec-e", purposes=["support"], retain_until=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    )
    with pytest.raises(errors.PermissionDeniedError) as denied:
        client.unwrap_data_key("rec-e", key.wrapped, purpose="marketing")
    assert denied.value.reason == "purpose_not_granted"
    with pytest.raises(errors.InvalidWrappedKeyError):
        client.unwrap_data_key("rec-e", key.wrapped[:-1], purpose="support")
    with pytest.raises(errors.AlreadyExistsError) as exists:
        client.generate_data_key("rec-e", purposes=["support"])
    assert exists.value.reason == "recording_registered"
    with pytest.raises(errors.NotFoundError):
        client.generate_data_key("rec-e-2", purposes=["support"], key_name="nope")
    with pytest.raises(errors.InvalidRequestError):
        client.generate_data_key("", purposes=["support"])
    clock.offset = 7200
    with pytest.raises(errors.RetentionExpiredError):
        client.unwrap_data_key("rec-e", key.wrapped, purpose="support")


def test_bad_token_is_authentication_error(devenv: DevEnv, broker: RunningBroker) -> None:
    """An invalid token surfaces as AuthenticationError."""
    kb = KeyBrokerClient(f"127.0.0.1:{broker.port}", tls=tls(devenv), token="not-a-token")
    with kb, pytest.raises(errors.AuthenticationError):
        kb.generate_data_key("r", purposes=["support"])


def test_denials_are_never_retried(client: KeyBrokerClient, spans: Spans) -> None:
    """A PERMISSION_DENIED is raised after exactly one call, whatever the retry policy."""
    key = client.generate_data_key("rec-r", purposes=["support"])
    before = len(spans())
    with pytest.raises(errors.PermissionDeniedError):
        client.unwrap_data_key("rec-r", key.wrapped, purpose="ads")
    assert len(spans()) - before == 1


def test_unavailable_is_retried_until_the_broker_is_back(devenv: DevEnv, tmp_path: Path) -> None:
    """The client rides out a broker restart: UNAVAILABLE calls are retried with backoff."""
    port = free_port()
    env = {"KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{port}"}
    first = BrokerProcess(devenv, tmp_path / "a.log", env)
    first.wait_listening()
    token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    retry = RetryPolicy(max_attempts=200, initial_backoff=0.05, max_backoff=0.3)
    with KeyBrokerClient(
        f"127.0.0.1:{port}", tls=tls(devenv), token=token, retry=retry, timeout=2
    ) as kb:
        key = kb.generate_data_key("rec-restart", purposes=["support"])
        assert first.stop() == 0
        second: list[BrokerProcess] = []

        def restart() -> None:
            time.sleep(1.0)
            second.append(BrokerProcess(devenv, tmp_path / "b.log", env))

        threading.Thread(target=restart).start()
        try:
            assert (
                kb.unwrap_data_key("rec-restart", key.wrapped, purpose="support").plaintext
                == key.plaintext
            )
        finally:
            deadline = time.monotonic() + 30
            while not second and time.monotonic() < deadline:
                time.sleep(0.05)
            for proc in second:
                proc.stop()
    with (
        KeyBrokerClient(
            f"127.0.0.1:{port}", tls=tls(devenv), token=token, retry=NO_RETRY, timeout=2
        ) as kb,
        pytest.raises(errors.UnavailableError),
    ):
        kb.generate_data_key("rec-x", purposes=["support"])


def test_token_file_is_reread_when_it_changes(
    devenv: DevEnv, broker: RunningBroker, tmp_path: Path, token: TokenFactory
) -> None:
    """A TokenFile picks up a refreshed token without a new client."""
    path = tmp_path / "token"
    path.write_text(token(scopes=["keys:unwrap"]) + "\n")
    with KeyBrokerClient(f"127.0.0.1:{broker.port}", tls=tls(devenv), token=TokenFile(path)) as kb:
        with pytest.raises(errors.PermissionDeniedError):
            kb.generate_data_key("rec-tf", purposes=["support"])
        path.write_text(token(scopes=["keys:generate"]) + "\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        assert len(kb.generate_data_key("rec-tf", purposes=["support"]).plaintext) == 32


def test_trace_context_is_propagated(client: KeyBrokerClient, spans: Spans) -> None:
    """A call made inside a client span becomes the parent of the broker's decision span."""
    tracer = TracerProvider().get_tracer("storage-service")
    with tracer.start_as_current_span("store-recording") as parent:
        client.generate_data_key("rec-trace", purposes=["support"])
    decision = spans()[-1]
    assert decision.context.trace_id == parent.get_span_context().trace_id
    assert decision.parent is not None
    assert decision.parent.span_id == parent.get_span_context().span_id
    assert trace.get_current_span().get_span_context().is_valid is False


def test_recording_round_trip_and_refusals(client: KeyBrokerClient) -> None:
    """encrypt_recording/decrypt_recording end to end; wrong purpose and a forged header are refused."""
    audio = os.urandom(300_000)
    sealed = io.BytesIO()
    ref = client.encrypt_recording(
        io.BytesIO(audio), sealed, recording_id="rec-file", purposes=["support"], segment_size=65536
    )
    assert ref.name.startswith("recordings.e")
    out = io.BytesIO()
    header = client.decrypt_recording(io.BytesIO(sealed.getvalue()), out, purpose="support")
    assert out.getvalue() == audio
    assert header.recording_id == "rec-file"
    with pytest.raises(errors.PermissionDeniedError):
        client.decrypt_recording(io.BytesIO(sealed.getvalue()), io.BytesIO(), purpose="marketing")
    forged = sealed.getvalue().replace(b"rec-file", b"rec-fake", 1)
    with pytest.raises(errors.PermissionDeniedError) as info:
        client.decrypt_recording(io.BytesIO(forged), io.BytesIO(), purpose="support")
    assert info.value.reason == "recording_mismatch"
