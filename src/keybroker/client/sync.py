"""The blocking client."""

from __future__ import annotations

from keybroker.client._api import KeyBrokerApi
from keybroker.client._base import _Blocking
from keybroker.client._calls import DataKey, WrappedDataKey
from keybroker.client.recording import RecordingHeader
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import KeybrokerError


class KeyBrokerClient(
    _Blocking,
    KeyBrokerApi[
        DataKey, WrappedDataKey, list[WrappedDataKey | KeybrokerError], KeyRef, RecordingHeader
    ],
):
    """Calls ``keybroker.v1.KeyBroker`` over mTLS with a bearer token; every call blocks.

    Failed calls raise the domain errors of :mod:`keybroker.errors` (AuthenticationError,
    PermissionDeniedError, InvalidWrappedKeyError, RetentionExpiredError, UnavailableError, …).
    Only UNAVAILABLE is retried, by gRPC's retry policy (:class:`~keybroker.client.RetryPolicy`),
    within ``timeout`` per operation. ``target`` may list several replicas (round robin).
    """
