"""What the sync and asyncio clients share: request building, metadata, results, error mapping.

An operation is a *plan*: a generator that yields the steps it needs (an :class:`Op` on the
broker, or blocking local :class:`Work` such as file I/O and AES-GCM) and returns the result.
Each client runs plans its own way; nothing here does I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

import grpc
from opentelemetry import propagate

from keybroker.client import recording
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import KeybrokerError
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.wire import REASON_METADATA, error_from_status, status_code

R = TypeVar("R")


@dataclass(frozen=True)
class DataKey:
    """A data key from GenerateDataKey/UnwrapDataKey. ``plaintext`` never shows in a repr."""

    plaintext: bytes = field(repr=False)
    wrapped: bytes = field(repr=False)
    key_ref: KeyRef


@dataclass(frozen=True)
class WrappedDataKey:
    """A wrapped key only (GenerateWrappedDataKey, RewrapDataKey)."""

    wrapped: bytes = field(repr=False)
    key_ref: KeyRef


@dataclass(frozen=True)
class TlsFiles:
    """The client's mTLS material, as PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes(),
            certificate_chain=self.cert_file.read_bytes(),
        )


def metadata(token: str) -> list[tuple[str, str]]:
    """Bearer token plus W3C trace context of the current span, if any."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [("authorization", f"Bearer {token}"), *carrier.items()]


@dataclass(frozen=True)
class Op(Generic[R]):
    """One RPC: the stub method's name, its request, and how to turn the response into a result."""

    method: str
    request: Any
    result: Callable[[Any], R]


@dataclass(frozen=True)
class Work(Generic[R]):
    """Blocking local work of a plan: run inline by the blocking client, in a worker thread by the
    asyncio one (so the event loop keeps serving while a recording is encrypted)."""

    fn: Callable[[], R]


#: An operation: yields steps, is sent each step's result, returns the operation's result.
Plan = Generator[Op[Any] | Work[Any], Any, R]


class Steps(Generic[R]):
    """Iterates a plan's steps; :meth:`reply` hands each step's result back; ``value`` is the
    plan's result once the iteration ends. (Both clients' runners are this loop.)"""

    def __init__(self, plan: Plan[R]) -> None:
        self._plan = plan
        self._reply: Any = None
        self.value: R

    def __iter__(self) -> Steps[R]:
        return self

    def __next__(self) -> Op[Any] | Work[Any]:
        try:
            return self._plan.send(self._reply)
        except StopIteration as done:
            self.value = done.value
            raise StopIteration from None

    def reply(self, result: Any) -> None:
        self._reply = result

    def close(self) -> None:
        self._plan.close()


def single(op: Op[R]) -> Plan[R]:
    """The plan of one RPC."""
    result: R = yield op
    return result


def generate_request(  # noqa: PLR0917 - mirrors the request message
    recording_id: str,
    purposes: Iterable[str],
    subject_ids: Iterable[str],
    retain_until: dt.datetime | None,
    key_name: str,
    context: Mapping[str, str] | None,
) -> pb.GenerateDataKeyRequest:
    req = pb.GenerateDataKeyRequest(
        recording_id=recording_id,
        purposes=list(purposes),
        subject_ids=list(subject_ids),
        key_name=key_name,
        context=dict(context or {}),
    )
    if retain_until is not None:
        if retain_until.tzinfo is None:
            raise ValueError("retain_until must be timezone-aware")
        req.retain_until.seconds = int(retain_until.timestamp())
    return req


def _key_ref(ref: pb.KeyRef) -> KeyRef:
    return KeyRef(ref.key_name, ref.version)


def generate(req: pb.GenerateDataKeyRequest) -> Op[DataKey]:
    """GenerateDataKey for a request from :func:`generate_request`."""
    return Op(
        "GenerateDataKey", req, lambda r: DataKey(r.data_key, r.wrapped_key, _key_ref(r.key_ref))
    )


def generate_wrapped(req: pb.GenerateDataKeyRequest) -> Op[WrappedDataKey]:
    """GenerateWrappedDataKey for a request from :func:`generate_request`."""
    return Op(
        "GenerateWrappedDataKey", req, lambda r: WrappedDataKey(r.wrapped_key, _key_ref(r.key_ref))
    )


def unwrap(
    recording_id: str, wrapped_key: bytes, purpose: str, context: Mapping[str, str] | None
) -> Op[DataKey]:
    req = pb.UnwrapDataKeyRequest(
        recording_id=recording_id,
        wrapped_key=wrapped_key,
        purpose=purpose,
        context=dict(context or {}),
    )
    return Op("UnwrapDataKey", req, lambda r: DataKey(r.data_key, wrapped_key, _key_ref(r.key_ref)))


def rewrap(recording_id: str, wrapped_key: bytes) -> Op[WrappedDataKey]:
    req = pb.RewrapDataKeyRequest(recording_id=recording_id, wrapped_key=wrapped_key)
    return Op("RewrapDataKey", req, lambda r: WrappedDataKey(r.wrapped_key, _key_ref(r.key_ref)))


def rewrap_many(items: Iterable[tuple[str, bytes]]) -> Op[list[WrappedDataKey | KeybrokerError]]:
    req = pb.RewrapDataKeysRequest(
        items=[pb.RewrapDataKeyRequest(recording_id=r, wrapped_key=w) for r, w in items]
    )

    def result(response: pb.RewrapDataKeysResponse) -> list[WrappedDataKey | KeybrokerError]:
        out: list[WrappedDataKey | KeybrokerError] = []
        for item in response.results:
            if item.code == grpc.StatusCode.OK.value[0]:
                out.append(WrappedDataKey(item.wrapped_key, _key_ref(item.key_ref)))
            else:
                code = status_code(item.code)
                out.append(error_from_status(code, item.message, item.reason or None))
        return out

    return Op("RewrapDataKeys", req, result)


def translate(exc: grpc.RpcError) -> KeybrokerError:
    """Map a failed call to the domain error hierarchy (one table: keybroker.wire)."""
    call: Any = exc
    reason = None
    for key, value in call.trailing_metadata() or ():
        if key == REASON_METADATA:
            reason = value
    details = call.details() or ""
    if call.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        details = DEADLINE_MESSAGE
    return error_from_status(call.code(), details, reason)


#: What a deadline means to a caller waiting for a broker (gRPC says only "Deadline Exceeded").
DEADLINE_MESSAGE = (
    "deadline exceeded: no broker answered in time (unreachable, refusing the TLS handshake, "
    "or overloaded; retry=NO_RETRY shows the connection error at once)"
)


def encrypt_recording(  # noqa: PLR0917 - mirrors the client method
    src: BinaryIO,
    dst: BinaryIO,
    generate_op: Op[DataKey],
    recording_id: str,
    segment_size: int,
    progress: recording.Progress | None,
) -> Plan[KeyRef]:
    """A fresh data key from the broker, then the stream encrypted under it."""
    header_check = recording.new_header(recording_id, b"\x00", segment_size)
    header_check.encode()  # bad segment size or id: refused before the broker is asked
    key: DataKey = yield generate_op
    header = recording.new_header(recording_id, key.wrapped, segment_size)
    yield Work(lambda: recording.encrypt_stream(src, dst, header, key.plaintext, progress=progress))
    return key.key_ref


def decrypt_recording(  # noqa: PLR0917 - mirrors the client method
    src: BinaryIO,
    dst: BinaryIO,
    purpose: str,
    context: Mapping[str, str] | None,
    progress: recording.Progress | None,
    wrapped_key: bytes | None = None,
) -> Plan[recording.RecordingHeader]:
    """The header read, its key unwrapped by the broker for ``purpose`` (the header's wrapped key,
    or ``wrapped_key``: a rewrapped copy of the same data key), the segments decrypted."""
    header: recording.RecordingHeader = yield Work(lambda: recording.RecordingHeader.read(src))
    wrapped = header.wrapped_key if wrapped_key is None else wrapped_key
    key: DataKey = yield unwrap(header.recording_id, wrapped, purpose, context)
    yield Work(
        lambda: recording.decrypt_segments(src, dst, header, key.plaintext, progress=progress)
    )
    return header
