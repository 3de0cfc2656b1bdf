"""Fuzz the request -> core translation of every RPC, through the real server's handlers.

One broker is built per process exactly as ``keybroker serve`` builds it (``create_server``: real
SoftHSM token, SQLite state, audit journal, JWT verification), on a fresh dev environment in a
scratch folder. Calls do not go over the network: each input is handed to the same function the
server loop runs for a unary call (``keybroker.server.loop._run_unary``: deserialise, handler,
status), with a call context that carries a real token and the dev client certificate over
"TLS 1.3". Every method of KeyBroker, KeyAdmin and Privacy is reachable.

Input: byte 0 picks the method; byte 1 picks the token (bits 0-2: full rights with MFA most
of the time, data plane only, no token, a malformed one) and the request's form (bit 3): raw
bytes for the deserialiser, or a message built field by field from the rest of the input, with
values drawn from fuzzed text and numbers, names and purposes the broker knows and wrapped keys it
made (the structure-aware form, what libprotobuf-mutator would do, which has no wheel here).

A call may end with any status the error table allows for a caller's mistake; INTERNAL or UNKNOWN
(a bug, or a foreign exception reaching the handler's edge) is a failure, and so is any exception
escaping the call.

State grows as calls create keys, epochs and holds; a process is therefore run for a bounded
number of executions (``tests/fuzz/campaign.py`` runs this harness in chunks of fresh processes).
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import message_factory

from keybroker import settings as settings_mod
from keybroker.devenv import DevEnv, mint_token, provision
from keybroker.server import handlers as server_handlers
from keybroker.server import loop
from keybroker.server.app import RunningBroker, create_server
from keybroker.v1 import admin_pb2, keybroker_pb2, privacy_pb2
from tests.fuzz._common import FuzzFailure, Provider, provider

SERVICES = (
    keybroker_pb2.DESCRIPTOR.services_by_name["KeyBroker"],
    admin_pb2.DESCRIPTOR.services_by_name["KeyAdmin"],
    privacy_pb2.DESCRIPTOR.services_by_name["Privacy"],
)
METHODS = tuple(f"/{s.full_name}/{m.name}" for s in SERVICES for m in s.methods)
INPUT_TYPES = {f"/{s.full_name}/{m.name}": m.input_type for s in SERVICES for m in s.methods}
SPARE_KEY = "fuzz-spare"
FORBIDDEN = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
ALL_SCOPES = [
    "keys:generate",
    "keys:unwrap",
    "keys:rewrap",
    "keys:admin",
    "privacy:erase",
    "privacy:hold",
    "privacy:amend",
    "audit:read",
]
PURPOSES = ("support", "quality", "billing")
KNOWN_TEXT = (
    "recordings", "rec-fuzz-1", "rec-fuzz-2", "subject-1", "subject-2", "support", "quality",
    "billing", "fraud", "recordings.2026-12", SPARE_KEY, "a", "", "x" * 256, "é", "\u0000", "legal reason",
)  # fmt: skip


class FuzzContext(loop.LoopContext):
    """A call context with fixed metadata and a TLS 1.3 peer holding the dev client certificate."""

    def __init__(self, metadata: Sequence[tuple[str, str]], auth: Mapping[str, Any]) -> None:
        # LoopContext's own __init__ reads a gRPC core event; set what it would.
        self._metadata = tuple(metadata)
        self._deadline = time.time() + 60
        self._lock = threading.Lock()
        self._callbacks = []
        self.code = None
        self.details = ""
        self.trailing = ()
        self.deferred = None  # record at once, as calls on the pool do
        self._auth = auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> Mapping[str, Any]:
        return self._auth


@dataclass
class World:
    root: Path
    env: DevEnv
    broker: RunningBroker
    handlers: dict[str, server_handlers.Handler]
    tokens: tuple[str, ...]
    auth: Mapping[str, Any]
    wrapped: list[bytes]

    def call(self, method: str, request: bytes, token: int) -> tuple[grpc.StatusCode, str]:
        metadata = [] if token == 2 else [("authorization", f"Bearer {self.tokens[token]}")]
        context = FuzzContext(metadata, self.auth)
        code, details, _ = loop._run_unary(self.handlers[method], request, context)
        return code, details


def _close(world: World) -> None:
    try:
        world.broker.stop(0)
    finally:
        shutil.rmtree(world.root, ignore_errors=True)


@cache
def world() -> World:
    """The broker under test, built once per process on a fresh dev environment."""
    logging.disable(logging.CRITICAL)  # denials and alerts by the thousand; statuses are the oracle
    root = Path(tempfile.mkdtemp(prefix="kb-fuzz-rpc-"))
    env = provision(root / "state", listen="127.0.0.1:0")
    settings = settings_mod.load(
        env.config,
        environ={
            "KEYBROKER_SERVER_LISTEN": "127.0.0.1:0",
            "KEYBROKER_AUDIT_FSYNC": "false",  # a journal on a scratch folder: speed over crashes
            "KEYBROKER_TELEMETRY_SPAN_FILE": "",
            "KEYBROKER_TELEMETRY_LOG_LEVEL": "CRITICAL",
        },
    )
    broker = create_server(settings)
    assert isinstance(broker.server, loop.LoopServer)  # settings above: the default engine
    registry: server_handlers.HandlerRegistry = broker.server._handlers
    handlers = {m: h for m in METHODS if (h := registry.lookup(m)) is not None}
    missing = set(METHODS) - set(handlers)
    if missing:
        raise RuntimeError(f"no handler for {sorted(missing)}")
    full = mint_token(env, scopes=ALL_SCOPES, purposes=PURPOSES, amr=["mfa", "pwd"], lifetime=86400)
    data = mint_token(env, scopes=ALL_SCOPES[:3], purposes=PURPOSES[:1], lifetime=86400)
    malformed = full[: len(full) // 2] + "A" + full[len(full) // 2 + 1 :]
    cert = env.cert("client").read_bytes()
    auth = {
        "x509_pem_cert": [cert],
        "x509_common_name": [b"dev-storage"],
        "ssl_tls_version": [b"TLSv1.3"],
    }
    w = World(root, env, broker, handlers, (full, data, "", malformed), auth, [])
    atexit.register(_close, w)
    for i, subjects in enumerate((["subject-1"], ["subject-1", "subject-2"], [])):
        request = keybroker_pb2.GenerateDataKeyRequest(
            recording_id=f"rec-fuzz-{i + 1}",
            purposes=list(PURPOSES[: i + 1]),
            subject_ids=subjects,
            context={"site": "fuzz"} if i else {},
        )
        code, details, response = loop._run_unary(
            handlers[METHODS[1]],  # GenerateWrappedDataKey
            request.SerializeToString(),
            FuzzContext([("authorization", f"Bearer {full}")], auth),
        )
        if code is not grpc.StatusCode.OK or response is None:
            raise RuntimeError(f"cannot make a seed wrapped key: {code} {details}")
        w.wrapped.append(
            keybroker_pb2.GenerateWrappedDataKeyResponse.FromString(response).wrapped_key
        )
    # A key with an older, no longer current version: the one admin calls may act on.
    for method, prepare in (
        ("CreateKey", admin_pb2.CreateKeyRequest(name=SPARE_KEY).SerializeToString()),
        ("RotateKey", admin_pb2.RotateKeyRequest(name=SPARE_KEY).SerializeToString()),
    ):
        code, details = w.call(f"/{SERVICES[1].full_name}/{method}", prepare, 0)
        if code is not grpc.StatusCode.OK:
            raise RuntimeError(f"cannot prepare {SPARE_KEY}: {code} {details}")
    return w


# -- structure-aware requests ------------------------------------------------------------------

_INT_RANGES = {
    pb_descriptor.FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    pb_descriptor.FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    pb_descriptor.FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    pb_descriptor.FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    pb_descriptor.FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1),
    pb_descriptor.FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    pb_descriptor.FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    pb_descriptor.FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    pb_descriptor.FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    pb_descriptor.FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}


def _int(fdp: Provider, low: int, high: int) -> int:
    choice = fdp.ConsumeIntInRange(0, 5)
    if choice == 0:
        return int(fdp.PickValueInList([low, high, 0, 1, -1 if low < 0 else 2]))
    if choice == 1:  # around now, for timestamps and retention dates
        return max(low, min(high, int(time.time()) + fdp.ConsumeIntInRange(-(10**9), 10**10)))
    if choice == 2:
        return fdp.ConsumeIntInRange(max(low, -100), min(high, 100))
    return fdp.ConsumeIntInRange(low, high)


def _text(fdp: Provider) -> str:
    if fdp.ConsumeBool():
        return str(fdp.PickValueInList(list(KNOWN_TEXT)))
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80)))


def _bytes(fdp: Provider, wrapped: Sequence[bytes]) -> bytes:
    choice = fdp.ConsumeIntInRange(0, 3)
    if choice == 3 or not wrapped:
        return bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)))
    blob = bytearray(wrapped[fdp.ConsumeIntInRange(0, len(wrapped) - 1)])
    if choice == 2:  # one byte changed: must read as an invalid wrapped key
        blob[fdp.ConsumeIntInRange(0, len(blob) - 1)] ^= 1 << fdp.ConsumeIntInRange(0, 7)
    return bytes(blob)


def _scalar(fdp: Provider, field: Any, wrapped: Sequence[bytes]) -> Any:
    """A value for a scalar ``field`` (a protobuf FieldDescriptor, C or Python)."""
    t = field.type
    if t == field.TYPE_STRING:
        return _text(fdp)
    if t == field.TYPE_BYTES:
        return _bytes(fdp, wrapped)
    if t == field.TYPE_BOOL:
        return fdp.ConsumeBool()
    if t == field.TYPE_ENUM:
        return fdp.ConsumeIntInRange(-1, len(field.enum_type.values) + 1)
    if t in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        return fdp.ConsumeRegularFloat()
    return _int(fdp, *_INT_RANGES[t])


def fill(  # noqa: PLR0912 - one branch per kind of field
    msg: pb_message.Message,
    fdp: Provider,
    wrapped: Sequence[bytes],
    depth: int = 0,
) -> None:
    """Set a fuzzed subset of ``msg``'s fields, recursively (maps, repeated, oneofs, messages)."""
    fields: Any = msg.DESCRIPTOR.fields
    for field in fields:
        if fdp.remaining_bytes() == 0 or not fdp.ConsumeIntInRange(0, 3):
            continue
        value_field = field
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if is_map:
            container = getattr(msg, field.name)
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            for _ in range(fdp.ConsumeIntInRange(0, 4)):
                key = _scalar(fdp, key_field, wrapped)
                if value_field.message_type is not None:
                    fill(container[key], fdp, wrapped, depth + 1)
                else:
                    container[key] = _scalar(fdp, value_field, wrapped)
        elif field.is_repeated:
            container = getattr(msg, field.name)
            for _ in range(fdp.ConsumeIntInRange(0, 5 if depth else 20)):
                if field.message_type is not None:
                    if depth < 3:
                        fill(container.add(), fdp, wrapped, depth + 1)
                else:
                    container.append(_scalar(fdp, field, wrapped))
        elif field.message_type is not None:
            if depth < 3:
                fill(getattr(msg, field.name), fdp, wrapped, depth + 1)
                getattr(msg, field.name).SetInParent()
        else:
            setattr(msg, field.name, _scalar(fdp, field, wrapped))


def build_request(method: str, fdp: Provider, wrapped: Sequence[bytes]) -> bytes:
    msg = message_factory.GetMessageClass(INPUT_TYPES[method])()
    fill(msg, fdp, wrapped)
    return bytes(msg.SerializeToString())


def check(method: str, request: bytes, token: int) -> tuple[grpc.StatusCode, str]:
    try:
        code, details = world().call(method, request, token)
    except Exception as exc:
        raise FuzzFailure(f"{method} raised {type(exc).__name__} past the call edge") from exc
    if code in FORBIDDEN:
        raise FuzzFailure(f"{method} answered {code.name} ({details!r}) to {request.hex()}")
    return code, details


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    method = METHODS[data[0] % len(METHODS)]
    token = (0, 0, 0, 0, 0, 1, 2, 3)[data[1] & 7]
    if data[1] & 8:
        request = build_request(method, provider(data[2:]), world().wrapped)
    else:
        request = data[2:]
    check(method, request, token)


def seeds() -> list[bytes]:
    """Seed inputs: for every method, one structured input and one valid serialised request."""
    out = []
    for i, method in enumerate(METHODS):
        out.append(bytes([i, 8]) + bytes(range(1, 200, 3)))
        out.append(bytes([i, 0]) + _example(method))
    return out


def _example(method: str) -> bytes:
    name = method.rsplit("/", 1)[1]
    examples: dict[str, Callable[[], pb_message.Message]] = {
        "GenerateDataKey": lambda: keybroker_pb2.GenerateDataKeyRequest(
            recording_id="rec-seed", purposes=["support"], subject_ids=["subject-1"]
        ),
        "GenerateWrappedDataKey": lambda: keybroker_pb2.GenerateDataKeyRequest(
            recording_id="rec-seed-2", purposes=["support", "quality"], context={"a": "b"}
        ),
        "UnwrapDataKey": lambda: keybroker_pb2.UnwrapDataKeyRequest(
            recording_id="rec-fuzz-1", purpose="support", wrapped_key=b"KBW\x01"
        ),
        "RewrapDataKey": lambda: keybroker_pb2.RewrapDataKeyRequest(recording_id="rec-fuzz-1"),
        "RewrapDataKeys": lambda: keybroker_pb2.RewrapDataKeysRequest(
            items=[keybroker_pb2.RewrapDataKeyRequest(recording_id="rec-fuzz-1")]
        ),
        "CreateKey": lambda: admin_pb2.CreateKeyRequest(name="fuzz-key"),
        "GetKey": lambda: admin_pb2.GetKeyRequest(name="recordings"),
        "ListKeys": admin_pb2.ListKeysRequest,
        "RotateKey": lambda: admin_pb2.RotateKeyRequest(name="fuzz-key"),
        "SetRotationPolicy": lambda: admin_pb2.SetRotationPolicyRequest(
            name="recordings", rotate_after_wraps=1000
        ),
        "DisableKeyVersion": lambda: admin_pb2.DisableKeyVersionRequest(name="fuzz-key", version=1),
        "EnableKeyVersion": lambda: admin_pb2.KeyVersionRequest(name="fuzz-key", version=1),
        "ScheduleKeyVersionDestruction": lambda: admin_pb2.ScheduleKeyVersionDestructionRequest(
            name="fuzz-key", version=1, window_seconds=86400
        ),
        "CancelKeyVersionDestruction": lambda: admin_pb2.KeyVersionRequest(
            name="fuzz-key", version=1
        ),
        "EraseRecording": lambda: privacy_pb2.EraseRecordingRequest(
            recording_id="rec-fuzz-2", reason="fuzz"
        ),
        "EraseSubject": lambda: privacy_pb2.EraseSubjectRequest(subject_id="subject-2", reason="x"),
        "PlaceLegalHold": lambda: privacy_pb2.LegalHoldRequest(
            recording_id="rec-fuzz-1", reason="case 1"
        ),
        "ReleaseLegalHold": lambda: privacy_pb2.LegalHoldRequest(subject_id="subject-1"),
        "AmendPurposes": lambda: privacy_pb2.AmendPurposesRequest(
            recording_id="rec-fuzz-1", add_purposes=["quality"], reason="consent"
        ),
        "SubjectAccessReport": lambda: privacy_pb2.SubjectAccessReportRequest(
            subject_id="subject-1"
        ),
    }
    return bytes(examples[name]().SerializeToString())
