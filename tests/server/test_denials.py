"""Denials name their target and caller; calls refused before any handler are counted per peer
(issue 14, item 7). The trace headers a record keeps are capped (item 8)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan

from keybroker.adapters.audit_reader import decisions
from keybroker.core.decision import Decision
from keybroker.core.wrapped_key import WrappedKey
from keybroker.devenv import DevEnv, mint_token
from keybroker.server.app import RunningBroker
from keybroker.server.guard import trace_context
from keybroker.server.refusals import MALFORMED_MESSAGE, NO_MESSAGE, UNKNOWN_METHOD, RefusalLog
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from tests.support.clients import auth, channel, generate_request

Spans = Callable[[], Sequence[ReadableSpan]]


def _rid() -> str:
    return f"rec-{uuid.uuid4().hex[:10]}"


def _record(broker: RunningBroker, recording_id: str) -> Decision:
    assert broker.journal is not None
    found = [
        d for _ts, d in decisions(broker.journal.directory.parent) if d.recording_id == recording_id
    ]
    assert len(found) == 1, found
    return found[0]


def _span(spans: Spans, recording_id: str) -> dict[str, Any]:
    found = [
        dict(s.attributes or {})
        for s in spans()
        if (s.attributes or {}).get("keybroker.recording.id") == recording_id
    ]
    assert len(found) == 1, found
    return found[0]


def _raw(ch: grpc.Channel, method: str) -> Any:
    """A bytes-in, bytes-out callable for any method name of the KeyBroker service."""
    return ch.unary_unary(
        f"/keybroker.v1.KeyBroker/{method}", request_serializer=None, response_deserializer=None
    )


def _refused(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    code: grpc.StatusCode = err.code()
    return code


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"now": time.time() - 7200, "lifetime": 600}, "token_expired"),
        ({"extra_claims": {"aud": "someone-else"}}, "bad_audience"),
    ],
    ids=["expired", "audience"],
)
def test_a_token_refused_after_its_signature_verified_names_its_holder(
    devenv: DevEnv,
    broker: RunningBroker,
    kb: pb_grpc.KeyBrokerStub,
    spans: Spans,
    claims: dict[str, Any],
    reason: str,
) -> None:
    """Signature good, time or audience wrong: the denial carries sub, jti and client_id of the
    token, the requested recording and key, and the peer; never the token itself."""
    good = mint_token(devenv, scopes=["keys:generate"], purposes=["support"])
    rec = _rid()
    blob = kb.GenerateWrappedDataKey(
        generate_request(recording_id=rec), metadata=auth(good)
    ).wrapped_key
    token = mint_token(
        devenv, scopes=["keys:unwrap"], purposes=["support"], subject="late-storage", **claims
    )
    request = pb.UnwrapDataKeyRequest(recording_id=rec, wrapped_key=blob, purpose="support")
    spans()  # (the generate's span is in there too; only the denial names the recording twice)
    assert _refused(lambda: kb.UnwrapDataKey(request, metadata=auth(token))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    denials = [
        d
        for _ts, d in decisions(broker.journal.directory.parent)  # type: ignore[union-attr]
        if d.recording_id == rec and d.operation == "UnwrapDataKey"
    ]
    assert len(denials) == 1
    d = denials[0]
    assert (d.outcome.value, d.reason) == ("deny", reason)
    assert d.subject == "late-storage"
    assert d.token_id  # the jti
    assert d.client_id == "dev-storage"
    named = WrappedKey.parse(blob).key
    assert (d.key_name, d.key_version) == (named.name, named.version)  # from the request's blob
    assert d.cert_identity == "spiffe://keybroker.dev/storage/dev"  # the client certificate's name
    assert d.peer_address and "127.0.0.1" in d.peer_address
    [span] = [
        dict(s.attributes or {})
        for s in spans()
        if (s.attributes or {}).get("keybroker.recording.id") == rec
        and (s.attributes or {}).get("rpc.method") == "UnwrapDataKey"
    ]
    assert span["keybroker.principal.sub"] == "late-storage"
    assert span["keybroker.token.jti"] == d.token_id
    assert span["keybroker.key.name"] == named.name
    assert token not in repr(span) and token.split(".")[2] not in repr(d)


def test_a_badly_signed_token_names_nobody_but_still_the_target_and_peer(
    devenv: DevEnv, broker: RunningBroker, kb: pb_grpc.KeyBrokerStub, spans: Spans
) -> None:
    """An unverified token's claims are never trusted, so no sub; the requested recording and
    key name and the peer are still recorded (GenerateDataKey refused before the use case)."""
    token = mint_token(devenv, scopes=["keys:generate"], purposes=["support"], subject="forger")
    head, body, sig = token.split(".")
    forged = f"{head}.{body}.{sig[:-4]}AAAA"
    rec = _rid()
    request = generate_request(recording_id=rec, key_name="archive-x")
    assert _refused(lambda: kb.GenerateDataKey(request, metadata=auth(forged))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    d = _record(broker, rec)
    assert d.reason == "bad_signature"
    assert d.subject is None and d.token_id is None
    assert d.key_name == "archive-x"
    assert d.peer_address and d.cert_thumbprint
    assert d.cert_identity == "spiffe://keybroker.dev/storage/dev"
    assert _span(spans, rec)["keybroker.key.name"] == "archive-x"


def test_a_missing_token_still_names_the_peer_and_target(
    devenv: DevEnv, broker: RunningBroker, kb: pb_grpc.KeyBrokerStub
) -> None:
    rec = _rid()
    assert _refused(lambda: kb.GenerateDataKey(generate_request(recording_id=rec))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    d = _record(broker, rec)
    assert d.reason == "token_missing"
    assert d.peer_address and "127.0.0.1" in d.peer_address
    assert d.cert_identity == "spiffe://keybroker.dev/storage/dev"


def test_calls_refused_before_any_handler_are_counted_per_peer_and_logged(
    devenv: DevEnv, broker: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Unknown method, a request that does not parse, and one over max_message_bytes: no
    decision, but counted per IP and logged (aggregated) with the IP and the interval."""
    refusals = broker.server.refusals
    assert refusals is not None
    before = dict(refusals.totals)
    token = tuple(auth(mint_token(devenv, scopes=["keys:unwrap"], purposes=["support"])))
    with channel(devenv, broker.port, own_connection=True) as ch:
        unknown = _raw(ch, "NoSuchMethod")
        assert _refused(lambda: unknown(b"", metadata=token)) == (grpc.StatusCode.UNIMPLEMENTED)
        raw = _raw(ch, "UnwrapDataKey")
        assert _refused(lambda: raw(b"\xff\xff\xff", metadata=token)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        huge = pb.UnwrapDataKeyRequest(recording_id="r", wrapped_key=b"x" * 200_000)
        assert (
            _refused(lambda: raw(huge.SerializeToString(), metadata=token))
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    deadline = time.monotonic() + 5
    counted: dict[tuple[str, str], int] = {}
    while time.monotonic() < deadline:
        counted = {k: v - before.get(k, 0) for k, v in refusals.totals.items()}
        if counted.get(("127.0.0.1", NO_MESSAGE)):
            break
        time.sleep(0.05)
    assert counted.get(("127.0.0.1", UNKNOWN_METHOD)) == 1
    assert counted.get(("127.0.0.1", MALFORMED_MESSAGE)) == 1
    assert counted.get(("127.0.0.1", NO_MESSAGE)) == 1  # the oversized one never arrived
    with caplog.at_level(logging.WARNING, logger="keybroker.server.refusals"):
        summaries = refusals.flush()
    [mine] = [s for s in summaries if s.ip == "127.0.0.1"]
    assert mine.total >= 3
    assert any("from 127.0.0.1 between" in r.getMessage() for r in caplog.records)


def test_refusal_log_aggregates_per_ip_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """A flood from one IP is one line per interval, with the kinds counted."""
    now = [1_700_000_000.0]
    log = RefusalLog(clock=lambda: now[0])
    for port in range(500):
        log.note(f"ipv4:10.0.0.5:{1000 + port}", UNKNOWN_METHOD)
    log.note("ipv6:[::1]:4711", MALFORMED_MESSAGE)
    now[0] += 60
    with caplog.at_level(logging.WARNING, logger="keybroker.server.refusals"):
        summaries = log.flush()
    assert [(s.ip, s.kinds) for s in summaries] == [
        ("10.0.0.5", {UNKNOWN_METHOD: 500}),
        ("::1", {MALFORMED_MESSAGE: 1}),
    ]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert (
        "500 calls from 10.0.0.5 between 2023-11-14T22:13:20Z and 2023-11-14T22:14:20Z"
        in (lines[0])
    )
    assert log.flush() == []  # reset


def test_trace_headers_are_capped_to_w3c_sizes() -> None:
    """traceparent: exactly the version-00 form (55 chars) or the first 55 of a later version;
    tracestate: whole members, at most 32 and 512 characters; anything else is dropped."""
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert trace_context((("traceparent", good),)) == {"traceparent": good}
    assert trace_context((("traceparent", good + "x" * 10_000),)) == {}
    assert trace_context((("traceparent", "01" + good[2:] + "-future"),)) == {
        "traceparent": "01" + good[2:]
    }
    assert trace_context((("traceparent", "x" * 100_000),)) == {}
    state = ",".join(f"k{i}=v{i}" for i in range(100))
    kept = trace_context((("tracestate", state),))["tracestate"]
    assert kept.split(",") == [f"k{i}=v{i}" for i in range(32)]
    wide = ",".join(f"k{i}={'v' * 200}" for i in range(10))
    kept = trace_context((("tracestate", wide),))["tracestate"]
    assert len(kept) <= 512 and kept.split(",")[0].startswith("k0=")
    assert trace_context((("tracestate", "a" * 100_000),)) == {}


def test_a_flood_of_trace_context_never_reaches_the_record(
    devenv: DevEnv, broker: RunningBroker, kb: pb_grpc.KeyBrokerStub
) -> None:
    """A 6 kB tracestate on a refused call: the journal record keeps at most 512 characters."""
    rec = _rid()
    metadata = [("tracestate", ",".join(f"v{i}={'x' * 60}" for i in range(100)))]
    assert (
        _refused(lambda: kb.GenerateDataKey(generate_request(recording_id=rec), metadata=metadata))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    d = _record(broker, rec)
    assert 0 < len(d.trace_context.get("tracestate", "")) <= 512
