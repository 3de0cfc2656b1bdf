"""``keybroker.v1.Privacy``: translates proto <-> core; no rules live here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc

from keybroker.adapters.audit_reader import decisions_about
from keybroker.core.broker import KeyBroker
from keybroker.core.decision import Decision
from keybroker.core.identity import Principal
from keybroker.core.privacy import Erasure, Hold, PrivacyService, Target
from keybroker.server.admin_servicer import timestamp
from keybroker.server.guard import CallGuard
from keybroker.v1 import keybroker_pb2 as kpb
from keybroker.v1 import privacy_pb2 as pb
from keybroker.v1 import privacy_pb2_grpc as pb_grpc

SERVICE_NAME = "keybroker.v1.Privacy"


def _receipt(e: Erasure) -> pb.ErasureReceipt:
    return pb.ErasureReceipt(
        kind=e.kind.value,
        target=e.target,
        recordings=e.recordings,
        erased_at=timestamp(e.erased_at),
        erased_by=e.erased_by,
        audit_reference=e.reference,
        already_erased=e.already_erased,
        reason=e.reason,
    )


def _hold(h: Hold) -> pb.LegalHold:
    return pb.LegalHold(
        kind=h.kind.value,
        target=h.target,
        reason=h.reason,
        placed_by=h.placed_by,
        placed_at=timestamp(h.placed_at),
    )


def _target(request: pb.LegalHoldRequest) -> tuple[Target, str]:
    if request.WhichOneof("target") == "subject_id":
        return Target.SUBJECT, request.subject_id
    return Target.RECORDING, request.recording_id


class PrivacyServicer(pb_grpc.PrivacyServicer):
    def __init__(
        self,
        privacy: PrivacyService,
        broker: KeyBroker,
        guard: CallGuard,
        journal_root: Path | None,
    ) -> None:
        self._privacy = privacy
        self._broker = broker
        self._guard = guard
        self._journal_root = journal_root

    def _erase(
        self, context: grpc.ServicerContext, operation: str, kind: Target, target: str, reason: str
    ) -> pb.ErasureReceipt:
        return self._guard.run(
            context,
            operation,
            lambda p, d: _receipt(self._privacy.erase(p, d, kind, target, reason)),
        )

    def EraseRecording(
        self, request: pb.EraseRecordingRequest, context: grpc.ServicerContext
    ) -> pb.ErasureReceipt:
        return self._erase(
            context, "EraseRecording", Target.RECORDING, request.recording_id, request.reason
        )

    def EraseSubject(
        self, request: pb.EraseSubjectRequest, context: grpc.ServicerContext
    ) -> pb.ErasureReceipt:
        return self._erase(
            context, "EraseSubject", Target.SUBJECT, request.subject_id, request.reason
        )

    def _on_hold(
        self,
        request: pb.LegalHoldRequest,
        context: grpc.ServicerContext,
        operation: str,
        change: Callable[[Principal, Decision, Target, str], Hold],
    ) -> pb.LegalHold:
        """Place or release a hold on the recording or subject the request names."""
        kind, target = _target(request)
        return self._guard.run(context, operation, lambda p, d: _hold(change(p, d, kind, target)))

    def PlaceLegalHold(
        self, request: pb.LegalHoldRequest, context: grpc.ServicerContext
    ) -> pb.LegalHold:
        return self._on_hold(
            request,
            context,
            "PlaceLegalHold",
            lambda p, d, kind, target: self._privacy.place_hold(p, d, kind, target, request.reason),
        )

    def ReleaseLegalHold(
        self, request: pb.LegalHoldRequest, context: grpc.ServicerContext
    ) -> pb.LegalHold:
        return self._on_hold(request, context, "ReleaseLegalHold", self._privacy.release_hold)

    def AmendPurposes(
        self, request: pb.AmendPurposesRequest, context: grpc.ServicerContext
    ) -> pb.AmendPurposesResponse:
        add, remove = list(request.add_purposes), list(request.remove_purposes)

        def action(principal: Principal, decision: Decision) -> pb.AmendPurposesResponse:
            out = self._privacy.amend_purposes(
                principal,
                decision,
                recording_id=request.recording_id,
                add=add,
                remove=remove,
                reason=request.reason,
                apply=lambda: self._broker.amend_purposes(
                    principal,
                    recording_id=request.recording_id,
                    wrapped_key=request.wrapped_key,
                    add=add,
                    remove=remove,
                    reason=request.reason,
                    decision=decision,
                ),
            )
            return pb.AmendPurposesResponse(
                wrapped_key=out.wrapped_key,
                key_ref=kpb.KeyRef(key_name=out.key.name, version=out.key.version),
                purposes=list(decision.purposes),
            )

        return self._guard.run(context, "AmendPurposes", action)

    def SubjectAccessReport(
        self, request: pb.SubjectAccessReportRequest, context: grpc.ServicerContext
    ) -> pb.SubjectAccessReportResponse:
        def action(principal: Principal, decision: Decision) -> pb.SubjectAccessReportResponse:
            entries = self._privacy.recordings_of(principal, decision, request.subject_id)
            ids = {e.recording_id for e in entries}
            found = decisions_about(self._journal_root, ids, request.subject_id)
            return pb.SubjectAccessReportResponse(
                subject_id=request.subject_id,
                recordings=[
                    pb.RecordingSummary(
                        recording_id=e.recording_id,
                        purposes=list(e.purposes),
                        retain_until=timestamp(e.retain_until),
                        key_ref=kpb.KeyRef(key_name=e.key.name, version=e.key.version),
                        created_at=timestamp(e.created_at),
                        erased_at=timestamp(e.erased_at),
                    )
                    for e in entries
                ],
                decisions=[
                    pb.DecisionSummary(
                        time=timestamp(ts / 1e9),
                        operation=f"{d.service.rsplit('.', 1)[-1]}/{d.operation}",
                        outcome=d.outcome.value,
                        reason=d.reason,
                        principal=d.subject or "",
                        client_identity=d.cert_identity or "",
                        recording_id=d.recording_id or "",
                        purposes=list(d.purposes),
                    )
                    for ts, d in found
                ],
            )

        return self._guard.run(context, "SubjectAccessReport", action)
