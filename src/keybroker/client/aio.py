"""The asyncio client: every method of :class:`keybroker.client.KeyBrokerClient`, awaitable."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from keybroker.client._api import KeyBrokerApi
from keybroker.client._base import _Async
from keybroker.client._calls import DataKey, WrappedDataKey
from keybroker.client.recording import RecordingHeader
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import KeybrokerError


class AsyncKeyBrokerClient(
    _Async,
    KeyBrokerApi[
        Coroutine[Any, Any, DataKey],
        Coroutine[Any, Any, WrappedDataKey],
        Coroutine[Any, Any, list[WrappedDataKey | KeybrokerError]],
        Coroutine[Any, Any, KeyRef],
        Coroutine[Any, Any, RecordingHeader],
    ],
):
    """asyncio flavour of :class:`keybroker.client.KeyBrokerClient`: the same methods, arguments
    and errors; each returns a coroutine. Recording encryption and decryption read, transform and
    write in a worker thread, so the event loop keeps serving."""
