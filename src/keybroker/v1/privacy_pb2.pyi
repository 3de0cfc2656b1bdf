import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from keybroker.v1 import keybroker_pb2 as _keybroker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EraseRecordingRequest(_message.Message):
    __slots__ = ("recording_id", "reason")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    reason: str
    def __init__(self, recording_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class EraseSubjectRequest(_message.Message):
    __slots__ = ("subject_id", "reason")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    reason: str
    def __init__(self, subject_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ErasureReceipt(_message.Message):
    __slots__ = ("kind", "target", "recordings", "erased_at", "erased_by", "audit_reference", "already_erased", "reason")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RECORDINGS_FIELD_NUMBER: _ClassVar[int]
    ERASED_AT_FIELD_NUMBER: _ClassVar[int]
    ERASED_BY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_ERASED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    target: str
    recordings: int
    erased_at: _timestamp_pb2.Timestamp
    erased_by: str
    audit_reference: str
    already_erased: bool
    reason: str
    def __init__(self, kind: _Optional[str] = ..., target: _Optional[str] = ..., recordings: _Optional[int] = ..., erased_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., erased_by: _Optional[str] = ..., audit_reference: _Optional[str] = ..., already_erased: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class LegalHoldRequest(_message.Message):
    __slots__ = ("recording_id", "subject_id", "reason")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    subject_id: str
    reason: str
    def __init__(self, recording_id: _Optional[str] = ..., subject_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LegalHold(_message.Message):
    __slots__ = ("kind", "target", "reason", "placed_by", "placed_at")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PLACED_BY_FIELD_NUMBER: _ClassVar[int]
    PLACED_AT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    target: str
    reason: str
    placed_by: str
    placed_at: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[str] = ..., target: _Optional[str] = ..., reason: _Optional[str] = ..., placed_by: _Optional[str] = ..., placed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AmendPurposesRequest(_message.Message):
    __slots__ = ("recording_id", "wrapped_key", "add_purposes", "remove_purposes", "reason")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    ADD_PURPOSES_FIELD_NUMBER: _ClassVar[int]
    REMOVE_PURPOSES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    wrapped_key: bytes
    add_purposes: _containers.RepeatedScalarFieldContainer[str]
    remove_purposes: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, recording_id: _Optional[str] = ..., wrapped_key: _Optional[bytes] = ..., add_purposes: _Optional[_Iterable[str]] = ..., remove_purposes: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class AmendPurposesResponse(_message.Message):
    __slots__ = ("wrapped_key", "key_ref", "purposes")
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_REF_FIELD_NUMBER: _ClassVar[int]
    PURPOSES_FIELD_NUMBER: _ClassVar[int]
    wrapped_key: bytes
    key_ref: _keybroker_pb2.KeyRef
    purposes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, wrapped_key: _Optional[bytes] = ..., key_ref: _Optional[_Union[_keybroker_pb2.KeyRef, _Mapping]] = ..., purposes: _Optional[_Iterable[str]] = ...) -> None: ...

class SubjectAccessReportRequest(_message.Message):
    __slots__ = ("subject_id",)
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    def __init__(self, subject_id: _Optional[str] = ...) -> None: ...

class RecordingSummary(_message.Message):
    __slots__ = ("recording_id", "purposes", "retain_until", "key_ref", "created_at", "erased_at")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSES_FIELD_NUMBER: _ClassVar[int]
    RETAIN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    KEY_REF_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERASED_AT_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    purposes: _containers.RepeatedScalarFieldContainer[str]
    retain_until: _timestamp_pb2.Timestamp
    key_ref: _keybroker_pb2.KeyRef
    created_at: _timestamp_pb2.Timestamp
    erased_at: _timestamp_pb2.Timestamp
    def __init__(self, recording_id: _Optional[str] = ..., purposes: _Optional[_Iterable[str]] = ..., retain_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_ref: _Optional[_Union[_keybroker_pb2.KeyRef, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., erased_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DecisionSummary(_message.Message):
    __slots__ = ("time", "operation", "outcome", "reason", "principal", "client_identity", "recording_id", "purposes")
    TIME_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSES_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    operation: str
    outcome: str
    reason: str
    principal: str
    client_identity: str
    recording_id: str
    purposes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., operation: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., principal: _Optional[str] = ..., client_identity: _Optional[str] = ..., recording_id: _Optional[str] = ..., purposes: _Optional[_Iterable[str]] = ...) -> None: ...

class SubjectAccessReportResponse(_message.Message):
    __slots__ = ("subject_id", "recordings", "decisions")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDINGS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    recordings: _containers.RepeatedCompositeFieldContainer[RecordingSummary]
    decisions: _containers.RepeatedCompositeFieldContainer[DecisionSummary]
    def __init__(self, subject_id: _Optional[str] = ..., recordings: _Optional[_Iterable[_Union[RecordingSummary, _Mapping]]] = ..., decisions: _Optional[_Iterable[_Union[DecisionSummary, _Mapping]]] = ...) -> None: ...
