"""``keybroker.v1.KeyBroker``: translates proto <-> core; no rules live here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc

from keybroker.core.broker import GeneratedKey, GenerateRequest, KeyBroker
from keybroker.core.decision import Decision
from keybroker.core.identity import Principal
from keybroker.core.wrapped_key import KeyRef
from keybroker.server.guard import CallGuard, ItemError
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

SERVICE_NAME = "keybroker.v1.KeyBroker"

R = TypeVar("R")


def _key_ref(ref: KeyRef) -> pb.KeyRef:
    return pb.KeyRef(key_name=ref.name, version=ref.version)


def _generate_request(request: pb.GenerateDataKeyRequest) -> GenerateRequest:
    retain_until = request.retain_until.seconds if request.HasField("retain_until") else None
    return GenerateRequest(
        recording_id=request.recording_id,
        purposes=list(request.purposes),
        subject_ids=list(request.subject_ids),
        retain_until=retain_until,
        key_name=request.key_name,
        context=dict(request.context),
    )


class KeyBrokerServicer(pb_grpc.KeyBrokerServicer):
    def __init__(self, broker: KeyBroker, guard: CallGuard) -> None:
        self._broker = broker
        self._guard = guard

    def _generate(
        self,
        request: pb.GenerateDataKeyRequest,
        context: grpc.ServicerContext,
        operation: str,
        respond: Callable[[GeneratedKey], R],
    ) -> R:
        """GenerateDataKey and GenerateWrappedDataKey: one use case, two replies."""

        def action(principal: Principal, decision: Decision) -> R:
            return respond(self._broker.generate(principal, _generate_request(request), decision))

        return self._guard.run(
            context, operation, action, recording_id=request.recording_id, key_name=request.key_name
        )

    def _on_blob(
        self,
        request: pb.UnwrapDataKeyRequest | pb.RewrapDataKeyRequest,
        context: grpc.ServicerContext,
        operation: str,
        action: Callable[[Principal, Decision], R],
    ) -> R:
        """Unwrap and rewrap: a refusal names the recording and the key the blob names."""
        return self._guard.run(
            context,
            operation,
            action,
            recording_id=request.recording_id,
            wrapped_key=request.wrapped_key,
        )

    def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateDataKeyResponse:
        return self._generate(
            request,
            context,
            "GenerateDataKey",
            lambda out: pb.GenerateDataKeyResponse(
                data_key=out.data_key.reveal(),
                wrapped_key=out.wrapped_key,
                key_ref=_key_ref(out.key),
            ),
        )

    def GenerateWrappedDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateWrappedDataKeyResponse:
        return self._generate(
            request,
            context,
            "GenerateWrappedDataKey",
            lambda out: pb.GenerateWrappedDataKeyResponse(
                wrapped_key=out.wrapped_key, key_ref=_key_ref(out.key)
            ),
        )

    def UnwrapDataKey(
        self, request: pb.UnwrapDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.UnwrapDataKeyResponse:
        def action(principal: Principal, decision: Decision) -> pb.UnwrapDataKeyResponse:
            out = self._broker.unwrap(
                principal,
                recording_id=request.recording_id,
                wrapped_key=request.wrapped_key,
                purpose=request.purpose,
                context=dict(request.context),
                decision=decision,
            )
            return pb.UnwrapDataKeyResponse(
                data_key=out.data_key.reveal(), key_ref=_key_ref(out.key)
            )

        return self._on_blob(request, context, "UnwrapDataKey", action)

    def RewrapDataKey(
        self, request: pb.RewrapDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.RewrapDataKeyResponse:
        def action(principal: Principal, decision: Decision) -> pb.RewrapDataKeyResponse:
            out = self._broker.rewrap(
                principal,
                recording_id=request.recording_id,
                wrapped_key=request.wrapped_key,
                decision=decision,
            )
            return pb.RewrapDataKeyResponse(wrapped_key=out.wrapped_key, key_ref=_key_ref(out.key))

        return self._on_blob(request, context, "RewrapDataKey", action)

    def RewrapDataKeys(
        self, request: pb.RewrapDataKeysRequest, context: grpc.ServicerContext
    ) -> pb.RewrapDataKeysResponse:
        items = list(request.items)

        def action(item: pb.RewrapDataKeyRequest, decision: Decision) -> pb.RewrapResult:
            out = self._broker.rewrap_item(
                recording_id=item.recording_id, wrapped_key=item.wrapped_key, decision=decision
            )
            return pb.RewrapResult(wrapped_key=out.wrapped_key, key_ref=_key_ref(out.key))

        results = self._guard.run_batch(
            context,
            "RewrapDataKeys",
            items,
            lambda principal: self._broker.authorize_rewrap_batch(principal, len(items)),
            action,
        )
        return pb.RewrapDataKeysResponse(
            results=[
                pb.RewrapResult(code=r.code.value[0], message=r.message, reason=r.reason)
                if isinstance(r, ItemError)
                else r
                for r in results
            ]
        )
