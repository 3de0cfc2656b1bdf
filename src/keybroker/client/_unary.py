"""A blocking gRPC client base for the admin and privacy planes: one channel, a token, no retry."""

from __future__ import annotations

from typing import Any, ClassVar

from keybroker.client import _calls
from keybroker.client._base import _Blocking
from keybroker.client.retry import NO_RETRY, RetryPolicy


class UnaryClient(_Blocking):
    """Subclasses set ``service``; :meth:`_call_method` maps failures to the domain errors.

    Nothing is retried by default: an administrative change is not assumed idempotent."""

    default_timeout: ClassVar[float] = 10.0
    default_retry: ClassVar[RetryPolicy] = NO_RETRY

    def _call_method(self, method: str, request: Any) -> Any:
        return self._call(_calls.Op(method, request, lambda response: response))
