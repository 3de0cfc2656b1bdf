"""The blocking client."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

import grpc

from keybroker.client import _calls, recording
from keybroker.client._calls import DataKey, TlsFiles, WrappedDataKey
from keybroker.client.retry import RetryPolicy
from keybroker.client.tokens import TokenProvider, as_provider
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import KeybrokerError
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

T = TypeVar("T")


class KeyBrokerClient:
    """Calls ``keybroker.v1.KeyBroker`` over mTLS with a bearer token.

    Failed calls raise the domain errors of :mod:`keybroker.errors` (AuthenticationError,
    PermissionDeniedError, InvalidWrappedKeyError, RetentionExpiredError, UnavailableError, …).
    Only UNAVAILABLE is retried, with exponential backoff and full jitter.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: TlsFiles,
        token: str | TokenProvider,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self._channel = grpc.secure_channel(target, tls.credentials(), options=list(options))
        self._stub = pb_grpc.KeyBrokerStub(self._channel)  # type: ignore[no-untyped-call]
        self._token = as_provider(token)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_files(
        cls,
        target: str,
        *,
        ca_file: str | Path,
        cert_file: str | Path,
        key_file: str | Path,
        token: str | TokenProvider,
        **kwargs: Any,
    ) -> KeyBrokerClient:
        tls = TlsFiles(Path(ca_file), Path(cert_file), Path(key_file))
        return cls(target, tls=tls, token=token, **kwargs)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KeyBrokerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, op: _calls.Op[T]) -> T:
        method = getattr(self._stub, op.method)
        backoffs = self._retry.backoffs()
        while True:
            try:
                response = method(
                    op.request, metadata=_calls.metadata(self._token()), timeout=self._timeout
                )
                return op.result(response)
            except grpc.RpcError as exc:
                wait = next(backoffs, None) if _calls.is_retryable(exc) else None
                if wait is None:
                    raise _calls.translate(exc) from None
                self._sleep(wait)

    def generate_data_key(
        self,
        recording_id: str,
        *,
        purposes: Iterable[str],
        subject_ids: Iterable[str] = (),
        retain_until: dt.datetime | None = None,
        key_name: str = "",
        context: Mapping[str, str] | None = None,
    ) -> DataKey:
        """A new data key for a recording: plaintext (use, then forget) and wrapped (store)."""
        op = _calls.generate(
            recording_id, purposes=purposes, subject_ids=subject_ids,
            retain_until=retain_until, key_name=key_name, context=context,
        )  # fmt: skip
        result: DataKey = self._run(op)
        return result

    def generate_wrapped_data_key(
        self,
        recording_id: str,
        *,
        purposes: Iterable[str],
        subject_ids: Iterable[str] = (),
        retain_until: dt.datetime | None = None,
        key_name: str = "",
        context: Mapping[str, str] | None = None,
    ) -> WrappedDataKey:
        """A new data key, wrapped only (for a recording to be encrypted elsewhere later)."""
        op = _calls.generate(
            recording_id, purposes=purposes, subject_ids=subject_ids,
            retain_until=retain_until, key_name=key_name, context=context, wrapped_only=True,
        )  # fmt: skip
        result: WrappedDataKey = self._run(op)
        return result

    def unwrap_data_key(
        self,
        recording_id: str,
        wrapped_key: bytes,
        *,
        purpose: str,
        context: Mapping[str, str] | None = None,
    ) -> DataKey:
        """The plaintext data key, for one purpose the token grants and the recording allows."""
        return self._run(_calls.unwrap(recording_id, wrapped_key, purpose, context))

    def rewrap_data_key(self, recording_id: str, wrapped_key: bytes) -> WrappedDataKey:
        """The same data key under the key's current version, every binding kept."""
        return self._run(_calls.rewrap(recording_id, wrapped_key))

    def rewrap_data_keys(
        self, items: Iterable[tuple[str, bytes]]
    ) -> list[WrappedDataKey | KeybrokerError]:
        """RewrapDataKey for up to 256 ``(recording_id, wrapped_key)`` pairs in one call: one
        result per item, in order: the rewrapped key, or the domain error of that item."""
        return self._run(_calls.rewrap_many(items))

    def encrypt_recording(
        self,
        src: BinaryIO,
        dst: BinaryIO,
        *,
        recording_id: str,
        purposes: Iterable[str],
        subject_ids: Iterable[str] = (),
        retain_until: dt.datetime | None = None,
        context: Mapping[str, str] | None = None,
        segment_size: int = recording.DEFAULT_SEGMENT_SIZE,
        progress: recording.Progress | None = None,
    ) -> KeyRef:
        """Encrypt a recording stream under a fresh data key; the wrapped key goes in the header."""
        key = self.generate_data_key(
            recording_id,
            purposes=purposes,
            subject_ids=subject_ids,
            retain_until=retain_until,
            context=context,
        )
        header = recording.new_header(recording_id, key.wrapped, segment_size)
        recording.encrypt_stream(src, dst, header, key.plaintext, progress=progress)
        return key.key_ref

    def decrypt_recording(
        self,
        src: BinaryIO,
        dst: BinaryIO,
        *,
        purpose: str,
        context: Mapping[str, str] | None = None,
        progress: recording.Progress | None = None,
    ) -> recording.RecordingHeader:
        """Decrypt a recording for one purpose; the broker decides whether that use is allowed.

        Raises RecordingIntegrityError (after writing what authenticated) if the stream is
        damaged: treat ``dst`` as invalid unless this returns.
        """

        seen: list[recording.RecordingHeader] = []

        def data_key_for(header: recording.RecordingHeader) -> bytes:
            seen.append(header)
            key = self.unwrap_data_key(
                header.recording_id, header.wrapped_key, purpose=purpose, context=context
            )
            return key.plaintext

        recording.decrypt_stream(src, dst, data_key_for, progress=progress)
        return seen[0]
