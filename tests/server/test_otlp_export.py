"""Decision spans reach a real OTLP/gRPC receiver from a real broker process."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc

from keybroker.adapters.export import Pseudonymizer
from keybroker.devenv import DevEnv, mint_token
from keybroker.v1 import keybroker_pb2 as pb
from tests.conftest import code_of
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.otlp import Receiver
from tests.support.process import BrokerProcess, run_cli

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_spans_are_exported_over_otlp(devenv: DevEnv, tmp_path: Path) -> None:
    """With [telemetry] otlp_endpoint set, allow and deny decisions arrive at the collector,
    flushed at shutdown, carrying the documented attributes and no secret."""
    receiver = Receiver()
    receiver.server.start()
    try:
        proc = BrokerProcess(
            devenv,
            tmp_path / "b.log",
            {
                "KEYBROKER_TELEMETRY_OTLP_ENDPOINT": f"127.0.0.1:{receiver.port}",
                "KEYBROKER_TELEMETRY_OTLP_INSECURE": "true",
                "KEYBROKER_TELEMETRY_SERVICE_NAME": "keybroker-test",
                "KEYBROKER_AUDIT_DIR": str(tmp_path / "journal"),  # only this test's records
            },
        )
        port = proc.wait_listening()
        token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
        with channel(devenv, port) as ch:
            kb = stub(ch)
            gen = kb.GenerateDataKey(
                generate_request(recording_id="rec-otlp", subject_ids=["subj-otlp"]),
                metadata=(*auth(token), ("traceparent", TRACEPARENT)),
            )
            denied = pb.UnwrapDataKeyRequest(
                recording_id="rec-otlp", wrapped_key=gen.wrapped_key, purpose="ads"
            )
            assert (
                code_of(lambda: kb.UnwrapDataKey(denied, metadata=auth(token)))[0]
                is grpc.StatusCode.PERMISSION_DENIED
            )
        assert proc.stop(signal.SIGTERM) == 0
        spans = list(receiver.spans())
    finally:
        receiver.server.stop(None)
    by_name = {name: attrs for name, attrs in spans}
    generate = by_name["keybroker.v1.KeyBroker/GenerateDataKey"]
    unwrap = by_name["keybroker.v1.KeyBroker/UnwrapDataKey"]
    assert generate["keybroker.decision"] == "allow"
    pseudonym = Pseudonymizer(bytes.fromhex(devenv.pseudonym_key.read_text()))(
        "recording", "rec-otlp"
    )
    assert generate["keybroker.recording.id"] == pseudonym  # pseudonymised by default
    pseudonymize = Pseudonymizer(bytes.fromhex(devenv.pseudonym_key.read_text()))
    assert list(generate["keybroker.subject.ids"]) == [pseudonymize("subject", "subj-otlp")]
    # an auditor finds a known identifier's records by its pseudonym
    for kind, identifier, expected in (
        ("recording", "rec-otlp", pseudonym),
        ("subject", "subj-otlp", pseudonymize("subject", "subj-otlp")),
    ):
        out = run_cli(
            "audit", "pseudonym", identifier, "--kind", kind, "--config", str(devenv.config)
        )
        assert (out.returncode, out.stdout.strip()) == (0, expected), out.stderr
    # the span exported from the journal joins the caller's trace (W3C traceparent)
    exported = {
        span.name: span
        for request in receiver.requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    }
    joined = exported["keybroker.v1.KeyBroker/GenerateDataKey"]
    assert joined.trace_id.hex() == TRACEPARENT.split("-")[1]
    assert joined.parent_span_id.hex() == TRACEPARENT.split("-")[2]
    assert b"subj-otlp" not in b"".join(r.SerializeToString() for r in receiver.requests)
    assert (unwrap["keybroker.decision"], unwrap["keybroker.reason"]) == (
        "deny",
        "purpose_not_granted",
    )
    assert unwrap["keybroker.key.version"] == 1
    raw = b"".join(r.SerializeToString() for r in receiver.requests)
    assert gen.data_key not in raw
    assert gen.wrapped_key not in raw
    assert token.encode() not in raw
    assert b"rec-otlp" not in raw
