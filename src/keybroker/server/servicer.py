"""``keybroker.v1.KeyBroker``: translates proto <-> core; no rules live here."""

from __future__ import annotations

import grpc

from keybroker.core.broker import GenerateRequest, KeyBroker
from keybroker.core.decision import Decision
from keybroker.core.identity import Principal
from keybroker.core.wrapped_key import KeyRef
from keybroker.server.guard import CallGuard, ItemError
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

SERVICE_NAME = "keybroker.v1.KeyBroker"


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

    def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateDataKeyResponse:
        def action(principal: Principal, decision: Decision) -> pb.GenerateDataKeyResponse:
            out = self._broker.generate(principal, _generate_request(request), decision)
            return pb.GenerateDataKeyResponse(
                data_key=out.data_key.reveal(),
                wrapped_key=out.wrapped_key,
                key_ref=_key_ref(out.key),
            )

        return self._guard.run(
            context,
            "GenerateDataKey",
            action,
            recording_id=request.recording_id,
            key_name=request.key_name,
        )

    def GenerateWrappedDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateWrappedDataKeyResponse:
        def action(principal: Principal, decision: Decision) -> pb.GenerateWrappedDataKeyResponse:
            out = self._broker.generate(principal, _generate_request(request), decision)
            return pb.GenerateWrappedDataKeyResponse(
                wrapped_key=out.wrapped_key, key_ref=_key_ref(out.key)
            )

        return self._guard.run(
            context,
            "GenerateWrappedDataKey",
            action,
            recording_id=request.recording_id,
            key_name=request.key_name,
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

        return self._guard.run(
            context,
            "UnwrapDataKey",
            action,
            recording_id=request.recording_id,
            wrapped_key=request.wrapped_key,
        )

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

        return self._guard.run(
            context,
            "RewrapDataKey",
            action,
            recording_id=request.recording_id,
            wrapped_key=request.wrapped_key,
        )

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
