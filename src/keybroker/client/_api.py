"""``keybroker.v1.KeyBroker`` for storage services, declared once for both clients.

Each method builds its plan (``keybroker.client._calls``) and hands it to ``self._run``: the
blocking client runs it and returns the result, the asyncio client returns a coroutine. The type
parameters are the methods' return types as each client sees them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO, Generic, TypeVar

from keybroker.client import _calls, recording
from keybroker.client._base import ClientBase
from keybroker.client._calls import Plan
from keybroker.v1 import keybroker_pb2 as pb

_DataKey = TypeVar("_DataKey")
_Wrapped = TypeVar("_Wrapped")
_Batch = TypeVar("_Batch")
_KeyRef = TypeVar("_KeyRef")
_Header = TypeVar("_Header")


class KeyBrokerApi(ClientBase, Generic[_DataKey, _Wrapped, _Batch, _KeyRef, _Header]):
    """Calls ``keybroker.v1.KeyBroker`` over mTLS with a bearer token.

    Failed calls raise the domain errors of :mod:`keybroker.errors` (AuthenticationError,
    PermissionDeniedError, InvalidWrappedKeyError, RetentionExpiredError, UnavailableError, …).
    Only UNAVAILABLE is retried (by gRPC, per :class:`~keybroker.client.RetryPolicy`), within the
    client's ``timeout`` per operation.
    """

    service = pb.DESCRIPTOR.services_by_name["KeyBroker"]

    def _run(self, plan: Plan[Any]) -> Any:
        raise NotImplementedError  # the one thing the blocking and asyncio clients do differently

    def generate_data_key(
        self,
        recording_id: str,
        *,
        purposes: Iterable[str],
        subject_ids: Iterable[str] = (),
        retain_until: dt.datetime | None = None,
        key_name: str = "",
        context: Mapping[str, str] | None = None,
    ) -> _DataKey:
        """A new data key for a recording: plaintext (use, then forget) and wrapped (store)."""
        req = _calls.generate_request(
            recording_id, purposes, subject_ids, retain_until, key_name, context
        )
        result: _DataKey = self._run(_calls.single(_calls.generate(req)))
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
    ) -> _Wrapped:
        """A new data key, wrapped only (for a recording to be encrypted elsewhere later)."""
        req = _calls.generate_request(
            recording_id, purposes, subject_ids, retain_until, key_name, context
        )
        result: _Wrapped = self._run(_calls.single(_calls.generate_wrapped(req)))
        return result

    def unwrap_data_key(
        self,
        recording_id: str,
        wrapped_key: bytes,
        *,
        purpose: str,
        context: Mapping[str, str] | None = None,
    ) -> _DataKey:
        """The plaintext data key, for one purpose the token grants and the recording allows."""
        op = _calls.unwrap(recording_id, wrapped_key, purpose, context)
        result: _DataKey = self._run(_calls.single(op))
        return result

    def rewrap_data_key(self, recording_id: str, wrapped_key: bytes) -> _Wrapped:
        """The same data key under the key's current version, every binding kept."""
        result: _Wrapped = self._run(_calls.single(_calls.rewrap(recording_id, wrapped_key)))
        return result

    def rewrap_data_keys(self, items: Iterable[tuple[str, bytes]]) -> _Batch:
        """RewrapDataKey for up to 256 ``(recording_id, wrapped_key)`` pairs in one call: one
        result per item, in order: the rewrapped key, or the domain error of that item."""
        result: _Batch = self._run(_calls.single(_calls.rewrap_many(items)))
        return result

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
    ) -> _KeyRef:
        """Encrypt a recording stream under a fresh data key; the wrapped key goes in the header.

        Memory stays at two segments whatever the size. The asyncio client reads, encrypts and
        writes in a worker thread (``progress`` is called there)."""
        req = _calls.generate_request(
            recording_id, purposes, subject_ids, retain_until, "", context
        )
        plan = _calls.encrypt_recording(
            src, dst, _calls.generate(req), recording_id, segment_size, progress
        )
        result: _KeyRef = self._run(plan)
        return result

    def decrypt_recording(
        self,
        src: BinaryIO,
        dst: BinaryIO,
        *,
        purpose: str,
        context: Mapping[str, str] | None = None,
        progress: recording.Progress | None = None,
        wrapped_key: bytes | None = None,
    ) -> _Header:
        """Decrypt a recording for one purpose; the broker decides whether that use is allowed.

        The data key is unwrapped from the header's wrapped key, or from ``wrapped_key`` if given:
        the current copy your database keeps after a rewrap job (the same data key under a newer
        key version; the file itself is never rewritten). Raises RecordingIntegrityError (after
        writing what authenticated) if the stream is damaged: treat ``dst`` as invalid unless
        this returns. The asyncio client reads, decrypts and writes in a worker thread.
        """
        plan = _calls.decrypt_recording(src, dst, purpose, context, progress, wrapped_key)
        result: _Header = self._run(plan)
        return result
