"""A blocking gRPC client base for the admin and privacy planes: one channel, a token, no retry."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import grpc

from keybroker.client import _calls
from keybroker.client._calls import TlsFiles
from keybroker.client.tokens import TokenProvider, as_provider


class UnaryClient:
    """Subclasses set ``stub_class``; :meth:`_call` maps failures to the domain errors."""

    stub_class: Any = None

    def __init__(
        self, target: str, *, tls: TlsFiles, token: str | TokenProvider, timeout: float = 10.0
    ) -> None:
        self._channel = grpc.secure_channel(target, tls.credentials())
        self._stub = self.stub_class(self._channel)
        self._token = as_provider(token)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(
                request, metadata=_calls.metadata(self._token()), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise _calls.translate(exc) from None
