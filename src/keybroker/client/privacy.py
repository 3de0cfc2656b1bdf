"""The blocking client of ``keybroker.v1.Privacy`` (what ``keybroker privacy`` uses).

Results are the protobuf messages of ``proto/keybroker/v1/privacy.proto``; failures raise the
domain errors of :mod:`keybroker.errors`. Nothing is retried: erasures and holds are decisions a
person makes, and the caller decides whether to repeat them (erasing twice is harmless).
"""

from __future__ import annotations

from collections.abc import Sequence

from keybroker.client._unary import UnaryClient
from keybroker.v1 import privacy_pb2 as pb


class PrivacyClient(UnaryClient):
    service = pb.DESCRIPTOR.services_by_name["Privacy"]

    default_timeout = 30.0

    def erase_recording(self, recording_id: str, *, reason: str) -> pb.ErasureReceipt:
        request = pb.EraseRecordingRequest(recording_id=recording_id, reason=reason)
        receipt: pb.ErasureReceipt = self._call_method("EraseRecording", request)
        return receipt

    def erase_subject(self, subject_id: str, *, reason: str) -> pb.ErasureReceipt:
        request = pb.EraseSubjectRequest(subject_id=subject_id, reason=reason)
        receipt: pb.ErasureReceipt = self._call_method("EraseSubject", request)
        return receipt

    @staticmethod
    def _hold_request(
        recording_id: str | None, subject_id: str | None, reason: str
    ) -> pb.LegalHoldRequest:
        if (recording_id is None) == (subject_id is None):
            raise ValueError("give exactly one of recording_id or subject_id")
        if recording_id is not None:
            return pb.LegalHoldRequest(recording_id=recording_id, reason=reason)
        return pb.LegalHoldRequest(subject_id=subject_id, reason=reason)

    def place_hold(
        self, *, recording_id: str | None = None, subject_id: str | None = None, reason: str
    ) -> pb.LegalHold:
        hold: pb.LegalHold = self._call_method(
            "PlaceLegalHold", self._hold_request(recording_id, subject_id, reason)
        )
        return hold

    def release_hold(
        self, *, recording_id: str | None = None, subject_id: str | None = None
    ) -> pb.LegalHold:
        hold: pb.LegalHold = self._call_method(
            "ReleaseLegalHold", self._hold_request(recording_id, subject_id, "")
        )
        return hold

    def amend_purposes(
        self,
        recording_id: str,
        wrapped_key: bytes,
        *,
        add: Sequence[str] = (),
        remove: Sequence[str] = (),
        reason: str,
    ) -> pb.AmendPurposesResponse:
        request = pb.AmendPurposesRequest(
            recording_id=recording_id,
            wrapped_key=wrapped_key,
            add_purposes=list(add),
            remove_purposes=list(remove),
            reason=reason,
        )
        response: pb.AmendPurposesResponse = self._call_method("AmendPurposes", request)
        return response

    def subject_access_report(self, subject_id: str) -> pb.SubjectAccessReportResponse:
        request = pb.SubjectAccessReportRequest(subject_id=subject_id)
        report: pb.SubjectAccessReportResponse = self._call_method("SubjectAccessReport", request)
        return report
