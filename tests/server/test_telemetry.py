"""Every decision is a span with the documented attributes, joined to the caller's trace, and no
key, wrapped blob or token ever reaches a span or a log line."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from keybroker.devenv import DevEnv
from keybroker.server.peer import certificate_thumbprint
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from tests.conftest import TokenFactory, code_of
from tests.support.clients import auth, generate_request

Spans = Callable[[], Sequence[ReadableSpan]]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_allow_span_carries_the_documented_attributes(
    devenv: DevEnv, kb: pb_grpc.KeyBrokerStub, token: TokenFactory, spans: Spans
) -> None:
    """An allowed unwrap produces one SERVER span with who, from where, what, why."""
    t = token(client_id="storage-eu")
    gen = kb.GenerateDataKey(generate_request(recording_id="rec-span"), metadata=auth(t))
    kb.UnwrapDataKey(
        pb.UnwrapDataKeyRequest(
            recording_id="rec-span", wrapped_key=gen.wrapped_key, purpose="support"
        ),
        metadata=auth(t, [("traceparent", TRACEPARENT)]),
    )
    generate_span, unwrap_span = spans()[-2:]
    assert generate_span.name == "keybroker.v1.KeyBroker/GenerateDataKey"
    assert unwrap_span.name == "keybroker.v1.KeyBroker/UnwrapDataKey"
    assert unwrap_span.kind is SpanKind.SERVER
    attrs = dict(unwrap_span.attributes or {})
    assert attrs["keybroker.decision"] == "allow"
    assert attrs["keybroker.reason"] == "ok"
    assert attrs["rpc.system"] == "grpc"
    assert attrs["rpc.service"] == "keybroker.v1.KeyBroker"
    assert attrs["rpc.method"] == "UnwrapDataKey"
    assert attrs["rpc.grpc.status_code_name"] == "OK"
    assert attrs["keybroker.principal.sub"] == "dev-storage"
    assert attrs["keybroker.token.client_id"] == "storage-eu"
    assert isinstance(attrs["keybroker.token.jti"], str)
    assert attrs["keybroker.client_cert.identity"] == "spiffe://keybroker.dev/storage/dev"
    assert attrs["keybroker.client_cert.sha256"] == certificate_thumbprint(
        devenv.cert("client").read_bytes()
    )
    assert str(attrs["client.address"]).startswith("ipv4:127.0.0.1:")
    assert attrs["keybroker.recording.id"] == "rec-span"
    assert list(attrs["keybroker.purposes"]) == ["support"]  # type: ignore[arg-type]
    assert str(attrs["keybroker.key.name"]).startswith("recordings.e")  # its retention epoch key
    assert attrs["keybroker.key.version"] == 1


def test_span_joins_the_callers_trace(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory, spans: Spans
) -> None:
    """A W3C traceparent in the request metadata makes the decision span a child of the caller's."""
    kb.GenerateDataKey(generate_request(), metadata=auth(token(), [("traceparent", TRACEPARENT)]))
    span = spans()[-1]
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == "00f067aa0ba902b7"


def test_every_denial_is_a_span(kb: pb_grpc.KeyBrokerStub, spans: Spans) -> None:
    """A call without a token still leaves a deny span with its reason."""
    code_of(lambda: kb.GenerateDataKey(generate_request()))
    attrs = spans()[-1].attributes or {}
    assert (attrs["keybroker.decision"], attrs["keybroker.reason"]) == ("deny", "token_missing")
    assert attrs["rpc.grpc.status_code_name"] == "UNAUTHENTICATED"


def _forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
    ]


def test_no_secret_in_spans_or_logs(
    kb: pb_grpc.KeyBrokerStub,
    token: TokenFactory,
    spans: Spans,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Data keys, wrapped keys and tokens appear in no span attribute, span event or log line."""
    caplog.set_level(logging.DEBUG)
    t = token()
    request = generate_request()
    gen = kb.GenerateDataKey(request, metadata=auth(t))
    kb.UnwrapDataKey(
        pb.UnwrapDataKeyRequest(
            recording_id=request.recording_id, wrapped_key=gen.wrapped_key, purpose="support"
        ),
        metadata=auth(t),
    )
    tampered = gen.wrapped_key[:-1] + bytes([gen.wrapped_key[-1] ^ 1])
    code_of(
        lambda: kb.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(
                recording_id=request.recording_id, wrapped_key=tampered, purpose="support"
            ),
            metadata=auth(t),
        )
    )
    code_of(
        lambda: kb.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(
                recording_id=request.recording_id, wrapped_key=gen.wrapped_key, purpose="x"
            ),
            metadata=auth(t),
        )
    )
    code_of(lambda: kb.GenerateDataKey(generate_request(), metadata=auth(t + "x")))
    out, err = capfd.readouterr()
    haystack = "\n".join(
        [out, err, caplog.text]
        + [
            repr(dict(s.attributes or {})) + repr([e.attributes for e in s.events]) + s.name
            for s in spans()
        ]
        + [str(s.status.description) for s in spans()]
    )
    assert len(spans()) >= 5
    needles = (
        _forms(gen.data_key)
        + _forms(gen.wrapped_key)
        + _forms(gen.wrapped_key[-48:])
        + [t, t.split(".")[2]]
    )
    for needle in needles:
        assert needle not in haystack


def test_repeated_denials_raise_an_alert(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory, caplog: pytest.LogCaptureFixture, spans: Spans
) -> None:
    """Ten denials of one principal within a minute: an alert log line and an alert span."""
    caplog.set_level(logging.WARNING, logger="keybroker.alerts")
    t = token(subject="noisy-neighbour", scopes=["keys:unwrap"])
    for _ in range(10):
        code_of(lambda: kb.GenerateDataKey(generate_request(), metadata=auth(t)))
    assert any(
        "repeated_denials_principal" in r.getMessage() and "noisy-neighbour" in r.getMessage()
        for r in caplog.records
    )
    alert_spans = [s for s in spans() if s.name == "keybroker.alert/repeated_denials_principal"]
    assert len(alert_spans) == 1
    assert (alert_spans[0].attributes or {})["keybroker.alert.subject"] == "noisy-neighbour"
