"""The KeyBroker service over real mTLS with a real SoftHSM token, directly and through the
strict-HSM test module (HSM-chosen GCM IVs, no C_CopyObject), and on openCryptoki 3.23 when run
inside the Debian 13 root (tests/server/test_opencryptoki.py): every status code, every rule."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.sdk.trace import ReadableSpan

from keybroker.core.retention import EpochScheme
from keybroker.core.wrapped_key import Bindings, KeyRef, WrappedKey
from keybroker.devenv import TOKEN_LABEL, DevEnv, softhsm_module
from keybroker.server.app import RunningBroker
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from tests.conftest import HSM_MODULES, OPENCRYPTOKI, Clock, TokenFactory, code_of
from tests.support.clients import auth, channel, generate_request, new_recording_id, stub
from tests.support.process import run_fresh

Spans = Callable[[], Sequence[ReadableSpan]]


@pytest.fixture(params=HSM_MODULES)
def data_broker(request: pytest.FixtureRequest) -> RunningBroker:
    """The broker on SoftHSM, then the one on the strict module (and, inside the Debian 13 root,
    the one on openCryptoki 3.23: tests/server/test_opencryptoki.py)."""
    fixtures = {
        "softhsm": "broker",
        "strict": "strict_broker",
        "opencryptoki": "opencryptoki_broker",
    }
    running: RunningBroker = request.getfixturevalue(fixtures[request.param])
    return running


@pytest.fixture
def kb(data_broker: RunningBroker, devenv: DevEnv) -> Iterator[pb_grpc.KeyBrokerStub]:
    """A KeyBroker stub to :func:`data_broker`."""
    with channel(devenv, data_broker.port) as ch:
        yield stub(ch)


REC = "rec-1"
"""This test's recording id (each test has its own: the broker registers an id once)."""


@pytest.fixture(autouse=True)
def _new_recording() -> None:
    global REC  # noqa: PLW0603 - read by the tests and helpers of this module
    REC = new_recording_id()


def generate(kb: pb_grpc.KeyBrokerStub, token: str, **kwargs: Any) -> pb.GenerateDataKeyResponse:
    kwargs.setdefault("recording_id", REC)
    resp: pb.GenerateDataKeyResponse = kb.GenerateDataKey(
        generate_request(**kwargs), metadata=auth(token)
    )
    return resp


def test_generate_then_unwrap_returns_the_same_key(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """A generated data key unwraps to the same 32 bytes, under the retention epoch key of
    ``recordings`` that holds its retain-until (default: 90 days from now)."""
    t = token()
    gen = generate(kb, t, context={"tenant": "acme"})
    assert len(gen.data_key) == 32
    epoch = EpochScheme().epoch_of(time.time() + 90 * 86400)
    assert (gen.key_ref.key_name, gen.key_ref.version) == (f"recordings.e{epoch.label}", 1)
    out = kb.UnwrapDataKey(
        pb.UnwrapDataKeyRequest(
            recording_id=REC,
            wrapped_key=gen.wrapped_key,
            purpose="support",
            context={"tenant": "acme"},
        ),
        metadata=auth(t),
    )
    assert out.data_key == gen.data_key
    assert out.key_ref == gen.key_ref


def test_generate_wrapped_returns_no_plaintext(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """GenerateWrappedDataKey's response type has no data_key at all; the blob unwraps."""
    t = token()
    resp = kb.GenerateWrappedDataKey(generate_request(REC), metadata=auth(t))
    assert "data_key" not in pb.GenerateWrappedDataKeyResponse.DESCRIPTOR.fields_by_name
    out = kb.UnwrapDataKey(
        pb.UnwrapDataKeyRequest(recording_id=REC, wrapped_key=resp.wrapped_key, purpose="support"),
        metadata=auth(t),
    )
    assert len(out.data_key) == 32


def test_rewrap_keeps_key_and_bindings(kb: pb_grpc.KeyBrokerStub, token: TokenFactory) -> None:
    """RewrapDataKey returns a new blob for the same data key, still bound to the same purposes."""
    t = token(purposes=["support", "qa"])
    gen = generate(kb, t, purposes=["support", "qa"], context={"k": "v"})
    re = kb.RewrapDataKey(
        pb.RewrapDataKeyRequest(recording_id=REC, wrapped_key=gen.wrapped_key), metadata=auth(t)
    )
    assert re.wrapped_key != gen.wrapped_key
    assert not hasattr(re, "data_key")
    out = kb.UnwrapDataKey(
        pb.UnwrapDataKeyRequest(
            recording_id=REC, wrapped_key=re.wrapped_key, purpose="support", context={"k": "v"}
        ),
        metadata=auth(t),
    )
    assert out.data_key == gen.data_key
    code, _ = code_of(
        lambda: kb.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(
                recording_id=REC,
                wrapped_key=re.wrapped_key,
                purpose="marketing",
                context={"k": "v"},
            ),
            metadata=auth(token(purposes=["marketing"])),
        )
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("scopes", "call"),
    [
        (["keys:unwrap", "keys:rewrap"], "generate"),
        (["keys:generate", "keys:rewrap"], "unwrap"),
        (["keys:generate", "keys:unwrap"], "rewrap"),
    ],
)
def test_missing_scope_is_permission_denied(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory, scopes: list[str], call: str, spans: Spans
) -> None:
    """Each operation needs its own scope."""
    wrapped = generate(kb, token()).wrapped_key
    t = token(scopes=scopes)
    calls = {
        "generate": lambda: kb.GenerateDataKey(generate_request(REC), metadata=auth(t)),
        "unwrap": lambda: kb.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(recording_id=REC, wrapped_key=wrapped, purpose="support"),
            metadata=auth(t),
        ),
        "rewrap": lambda: kb.RewrapDataKey(
            pb.RewrapDataKeyRequest(recording_id=REC, wrapped_key=wrapped), metadata=auth(t)
        ),
    }
    code, message = code_of(calls[call])
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "scope" in message
    assert (spans()[-1].attributes or {})["keybroker.reason"] == "scope_missing"


def test_generate_requires_every_purpose_granted(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """A token granting 'support' cannot create a key bound to 'marketing' too."""
    code, message = code_of(
        lambda: generate(kb, token(purposes=["support"]), purposes=["support", "marketing"])
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "marketing" in message


@pytest.mark.parametrize(
    ("token_purposes", "request_purpose", "reason"),
    [
        (["support"], "marketing", "purpose_not_granted"),
        (["support", "marketing"], "marketing", "purpose_not_bound"),
    ],
)
def test_unwrap_purpose_must_be_granted_and_bound(
    kb: pb_grpc.KeyBrokerStub,
    token: TokenFactory,
    spans: Spans,
    token_purposes: list[str],
    request_purpose: str,
    reason: str,
) -> None:
    """Unwrap needs the purpose in the token's grant and among the recording's bound purposes."""
    wrapped = generate(kb, token()).wrapped_key
    t = token(purposes=token_purposes)
    code, _ = code_of(
        lambda: kb.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(recording_id=REC, wrapped_key=wrapped, purpose=request_purpose),
            metadata=auth(t),
        )
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    attrs = spans()[-1].attributes or {}
    assert attrs["keybroker.reason"] == reason
    assert attrs["keybroker.decision"] == "deny"


@pytest.mark.parametrize(
    ("recording_id", "context", "reason"),
    [
        ("rec-2", {"tenant": "acme"}, "recording_mismatch"),
        (None, {"tenant": "evil"}, "context_mismatch"),  # None: the recording's own id
        (None, {}, "context_mismatch"),
    ],
)
def test_unwrap_recording_and_context_must_match(
    kb: pb_grpc.KeyBrokerStub,
    token: TokenFactory,
    spans: Spans,
    recording_id: str | None,
    context: dict[str, str],
    reason: str,
) -> None:
    """The recording id and context presented must equal the bound ones."""
    t = token()
    wrapped = generate(kb, t, context={"tenant": "acme"}).wrapped_key
    code, _ = code_of(
        lambda: kb.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(
                recording_id=recording_id or REC,
                wrapped_key=wrapped,
                purpose="support",
                context=context,
            ),
            metadata=auth(t),
        )
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert (spans()[-1].attributes or {})["keybroker.reason"] == reason


def test_unwrap_after_retention_is_failed_precondition(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory, clock: Clock, spans: Spans
) -> None:
    """Once retain_until has passed the key is refused, for unwrap and rewrap alike."""
    t = token()
    until = Timestamp(seconds=int(clock()) + 3600)
    req = generate_request(REC)
    req.retain_until.CopyFrom(until)
    wrapped = kb.GenerateDataKey(req, metadata=auth(t)).wrapped_key
    clock.offset = 7200
    code, message = code_of(
        lambda: kb.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(recording_id=REC, wrapped_key=wrapped, purpose="support"),
            metadata=auth(t),
        )
    )
    assert (code, message) == (grpc.StatusCode.FAILED_PRECONDITION, "retention expired")
    code, _ = code_of(
        lambda: kb.RewrapDataKey(
            pb.RewrapDataKeyRequest(recording_id=REC, wrapped_key=wrapped), metadata=auth(t)
        )
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION


def test_retain_until_in_the_past_is_invalid(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """A key cannot be generated already expired."""
    req = generate_request(REC)
    req.retain_until.CopyFrom(Timestamp(seconds=1))
    code, message = code_of(lambda: kb.GenerateDataKey(req, metadata=auth(token())))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "retain_until" in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recording_id": ""},
        {"recording_id": "x" * 256},
        {"purposes": []},
        {"purposes": ["Support!"]},
        {"subject_ids": ["s\n1"]},
        {"context": {f"k{i}": "v" for i in range(17)}},
        {"key_name": "Bad Name"},
    ],
)
def test_malformed_generate_requests_are_invalid_argument(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory, kwargs: dict[str, Any]
) -> None:
    """Out-of-bounds fields get INVALID_ARGUMENT with a message naming the field."""
    code, message = code_of(lambda: generate(kb, token(), **kwargs))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert any(
        word in message
        for word in ("recording_id", "purpose", "subject_ids", "context", "key_name")
    )


def test_unknown_key_name_is_not_found(kb: pb_grpc.KeyBrokerStub, token: TokenFactory) -> None:
    """Asking to wrap under a key that does not exist is NOT_FOUND."""
    code, message = code_of(lambda: generate(kb, token(), key_name="nosuchkey"))
    assert code is grpc.StatusCode.NOT_FOUND
    assert "nosuchkey" in message


def test_garbage_wrapped_key_is_uniform_invalid_argument(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """Any blob that does not parse reads the same."""
    for blob in (b"", b"garbage", b"KBW\x02" + bytes(100), bytes(40000)):
        code, message = code_of(
            lambda blob=blob: kb.UnwrapDataKey(  # type: ignore[misc]
                pb.UnwrapDataKeyRequest(recording_id=REC, wrapped_key=blob, purpose="support"),
                metadata=auth(token()),
            )
        )
        assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "wrapped key is invalid")


def test_every_single_byte_change_and_truncation_is_refused(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """Flipping any byte or cutting the blob anywhere gives the one uniform INVALID_ARGUMENT."""
    t = token()
    wrapped = generate(kb, t, context={"c": "v"}).wrapped_key
    variants = [
        wrapped[:i] + bytes([wrapped[i] ^ 0x01]) + wrapped[i + 1 :] for i in range(len(wrapped))
    ]
    variants += [wrapped[:i] for i in range(len(wrapped))]
    variants.append(wrapped + b"\x00")
    for blob in variants:
        code, message = code_of(
            lambda blob=blob: kb.UnwrapDataKey(  # type: ignore[misc]
                pb.UnwrapDataKeyRequest(
                    recording_id=REC, wrapped_key=blob, purpose="support", context={"c": "v"}
                ),
                metadata=auth(t),
            )
        )
        assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "wrapped key is invalid")


def test_oversized_request_is_resource_exhausted(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory
) -> None:
    """Requests over the message limit are refused before any handler runs."""
    code, _ = code_of(
        lambda: kb.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(recording_id=REC, wrapped_key=bytes(70_000), purpose="support"),
            metadata=auth(token()),
        )
    )
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unexpected_failure_is_internal_and_generic(
    kb: pb_grpc.KeyBrokerStub,
    token: TokenFactory,
    data_broker: RunningBroker,
    monkeypatch: pytest.MonkeyPatch,
    spans: Spans,
) -> None:
    """A bug inside a call becomes INTERNAL with a generic message, never UNKNOWN; the server keeps serving."""

    def boom(size: int) -> bytes:
        raise RuntimeError("secret detail that must not leak")

    monkeypatch.setattr(data_broker.keks, "random", boom)
    code, message = code_of(lambda: generate(kb, token()))
    assert (code, message) == (grpc.StatusCode.INTERNAL, "internal error")
    assert (spans()[-1].attributes or {})["keybroker.decision"] == "error"
    monkeypatch.undo()
    assert len(generate(kb, token()).data_key) == 32


def test_missing_token_is_unauthenticated(kb: pb_grpc.KeyBrokerStub) -> None:
    """No authorization metadata: UNAUTHENTICATED."""
    code, _ = code_of(lambda: kb.GenerateDataKey(generate_request(REC)))
    assert code is grpc.StatusCode.UNAUTHENTICATED


_V1_SEAL = """
import json, os, sys
import pkcs11
from pkcs11 import Mechanism, ObjectClass
job = json.loads(sys.argv[1])
token = pkcs11.lib(job["module"]).get_token(token_label=job["token_label"])
with token.open(user_pin=job["pin"]) as session:
    key = session.get_key(label="kek:recordings:v1", object_class=ObjectClass.SECRET_KEY)
    sealed = key.encrypt(
        bytes.fromhex(job["data_key"]),
        mechanism=Mechanism.AES_GCM,
        mechanism_param=pkcs11.GCMParams(bytes.fromhex(job["nonce"]), bytes.fromhex(job["aad"]), 128),
    )
print(sealed.hex())
"""


def test_a_v1_wrapped_key_from_an_earlier_release_still_unwraps(
    kb: pb_grpc.KeyBrokerStub, token: TokenFactory, devenv: DevEnv, request: pytest.FixtureRequest
) -> None:
    """A format-v1 blob (nonce chosen by the caller and inside the AAD), sealed in SoftHSM as an
    earlier release did, unwraps through SoftHSM and through the strict module (and one sealed
    in openCryptoki through openCryptoki)."""
    data_key, nonce = os.urandom(32), os.urandom(12)
    bindings = Bindings.create(
        recording_id="rec-v1",
        purposes=["support"],
        subject_ids=["subj-1"],
        retain_until=int(time.time()) + 86400,
        context={},
    )
    aad = WrappedKey.header(KeyRef("recordings", 1), nonce, bindings)
    if request.node.callspec.params["data_broker"] == "opencryptoki":
        ock = json.loads(OPENCRYPTOKI)
        module, label, pin = ock["module"], ock["label"], Path(ock["pin_file"]).read_text()
    else:
        module, label, pin = softhsm_module(), TOKEN_LABEL, devenv.pin_file.read_text()
    job = {
        "module": module,
        "token_label": label,
        "pin": pin.strip(),
        "data_key": data_key.hex(),
        "nonce": nonce.hex(),
        "aad": aad.hex(),
    }
    env = {**os.environ, "SOFTHSM2_CONF": str(devenv.softhsm_conf.resolve())}
    script = "import sys; sys.argv[1:] = " + repr([json.dumps(job)]) + "\n" + _V1_SEAL
    blob = aad + bytes.fromhex(run_fresh(script, env).strip())
    assert WrappedKey.parse(blob).format_version == 1
    out = kb.UnwrapDataKey(
        pb.UnwrapDataKeyRequest(recording_id="rec-v1", wrapped_key=blob, purpose="support"),
        metadata=auth(token()),
    )
    assert out.data_key == data_key


def test_new_wrapped_keys_are_v2_with_the_iv_the_module_used(
    kb: pb_grpc.KeyBrokerStub,
    token: TokenFactory,
    data_broker: RunningBroker,
    request: pytest.FixtureRequest,
) -> None:
    """Every wrap writes format v2. On SoftHSM (and openCryptoki) the broker drew the IV; on the
    strict module the module chose it (the probe found it overwrites caller IVs) and it was read
    back."""
    caps = data_broker.keks.capabilities
    assert caps is not None
    gen = generate(kb, token())
    parsed = WrappedKey.parse(gen.wrapped_key)
    assert parsed.format_version == 2
    if request.node.callspec.params["data_broker"] in ("softhsm", "opencryptoki"):
        assert (caps.iv_behaviour, caps.iv_source) == ("keeps", "caller")
    else:
        assert (caps.iv_behaviour, caps.iv_source, caps.session_copies) == (
            "overwrites",
            "hsm",
            False,
        )
