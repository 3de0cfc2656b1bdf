"""What the sync and asyncio clients share: request building, metadata, results, error mapping."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from opentelemetry import propagate

from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import KeybrokerError
from keybroker.server.status import REASON_METADATA, error_from_status
from keybroker.v1 import keybroker_pb2 as pb

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


def _generate_request(  # noqa: PLR0917 - mirrors the request message
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


def generate(
    recording_id: str,
    *,
    purposes: Iterable[str],
    subject_ids: Iterable[str] = (),
    retain_until: dt.datetime | None = None,
    key_name: str = "",
    context: Mapping[str, str] | None = None,
    wrapped_only: bool = False,
) -> Op[Any]:
    req = _generate_request(recording_id, purposes, subject_ids, retain_until, key_name, context)
    if wrapped_only:
        return Op(
            "GenerateWrappedDataKey",
            req,
            lambda r: WrappedDataKey(r.wrapped_key, _key_ref(r.key_ref)),
        )
    return Op(
        "GenerateDataKey", req, lambda r: DataKey(r.data_key, r.wrapped_key, _key_ref(r.key_ref))
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
                code = next(c for c in grpc.StatusCode if c.value[0] == item.code)
                out.append(error_from_status(code, item.message, item.reason or None))
        return out

    return Op("RewrapDataKeys", req, result)


def translate(exc: grpc.RpcError) -> KeybrokerError:
    """Map a failed call to the domain error hierarchy (one table: keybroker.server.status)."""
    call: Any = exc
    reason = None
    for key, value in call.trailing_metadata() or ():
        if key == REASON_METADATA:
            reason = value
    return error_from_status(call.code(), call.details() or "", reason)


def is_retryable(exc: grpc.RpcError) -> bool:
    code: grpc.StatusCode = exc.code()
    return code is grpc.StatusCode.UNAVAILABLE
