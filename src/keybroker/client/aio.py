"""The asyncio client: the same API as :class:`keybroker.client.KeyBrokerClient`, awaitable."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from keybroker.client import _calls
from keybroker.client._calls import DataKey, TlsFiles, WrappedDataKey
from keybroker.client.retry import RetryPolicy
from keybroker.client.tokens import TokenProvider, as_provider
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncKeyBrokerClient:
    """asyncio flavour of the client; see :class:`keybroker.client.KeyBrokerClient`."""

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
        self._channel = grpc.aio.secure_channel(target, tls.credentials(), options=list(options))
        self._stub = pb_grpc.KeyBrokerStub(self._channel)  # type: ignore[no-untyped-call]
        self._token = as_provider(token)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()

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
    ) -> AsyncKeyBrokerClient:
        tls = TlsFiles(Path(ca_file), Path(cert_file), Path(key_file))
        return cls(target, tls=tls, token=token, **kwargs)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncKeyBrokerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, op: _calls.Op[T]) -> T:
        method = getattr(self._stub, op.method)
        backoffs = self._retry.backoffs()
        while True:
            try:
                response = await method(
                    op.request, metadata=_calls.metadata(self._token()), timeout=self._timeout
                )
                return op.result(response)
            except grpc.RpcError as exc:
                wait = next(backoffs, None) if _calls.is_retryable(exc) else None
                if wait is None:
                    raise _calls.translate(exc) from None
                await asyncio.sleep(wait)

    async def generate_data_key(
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
        result: DataKey = await self._run(op)
        return result

    async def generate_wrapped_data_key(
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
        result: WrappedDataKey = await self._run(op)
        return result

    async def unwrap_data_key(
        self,
        recording_id: str,
        wrapped_key: bytes,
        *,
        purpose: str,
        context: Mapping[str, str] | None = None,
    ) -> DataKey:
        """The plaintext data key, for one purpose the token grants and the recording allows."""
        return await self._run(_calls.unwrap(recording_id, wrapped_key, purpose, context))

    async def rewrap_data_key(self, recording_id: str, wrapped_key: bytes) -> WrappedDataKey:
        """The same data key under the key's current version, every binding kept."""
        return await self._run(_calls.rewrap(recording_id, wrapped_key))
