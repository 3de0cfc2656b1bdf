import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyRef(_message.Message):
    __slots__ = ("key_name", "version")
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key_name: str
    version: int
    def __init__(self, key_name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GenerateDataKeyRequest(_message.Message):
    __slots__ = ("recording_id", "purposes", "subject_ids", "retain_until", "key_name", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSES_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_IDS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    purposes: _containers.RepeatedScalarFieldContainer[str]
    subject_ids: _containers.RepeatedScalarFieldContainer[str]
    retain_until: _timestamp_pb2.Timestamp
    key_name: str
    context: _containers.ScalarMap[str, str]
    def __init__(self, recording_id: _Optional[str] = ..., purposes: _Optional[_Iterable[str]] = ..., subject_ids: _Optional[_Iterable[str]] = ..., retain_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_name: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GenerateDataKeyResponse(_message.Message):
    __slots__ = ("data_key", "wrapped_key", "key_ref")
    DATA_KEY_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_REF_FIELD_NUMBER: _ClassVar[int]
    data_key: bytes
    wrapped_key: bytes
    key_ref: KeyRef
    def __init__(self, data_key: _Optional[bytes] = ..., wrapped_key: _Optional[bytes] = ..., key_ref: _Optional[_Union[KeyRef, _Mapping]] = ...) -> None: ...

class GenerateWrappedDataKeyResponse(_message.Message):
    __slots__ = ("wrapped_key", "key_ref")
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_REF_FIELD_NUMBER: _ClassVar[int]
    wrapped_key: bytes
    key_ref: KeyRef
    def __init__(self, wrapped_key: _Optional[bytes] = ..., key_ref: _Optional[_Union[KeyRef, _Mapping]] = ...) -> None: ...

class UnwrapDataKeyRequest(_message.Message):
    __slots__ = ("recording_id", "wrapped_key", "purpose", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    wrapped_key: bytes
    purpose: str
    context: _containers.ScalarMap[str, str]
    def __init__(self, recording_id: _Optional[str] = ..., wrapped_key: _Optional[bytes] = ..., purpose: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UnwrapDataKeyResponse(_message.Message):
    __slots__ = ("data_key", "key_ref")
    DATA_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_REF_FIELD_NUMBER: _ClassVar[int]
    data_key: bytes
    key_ref: KeyRef
    def __init__(self, data_key: _Optional[bytes] = ..., key_ref: _Optional[_Union[KeyRef, _Mapping]] = ...) -> None: ...

class RewrapDataKeyRequest(_message.Message):
    __slots__ = ("recording_id", "wrapped_key")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    wrapped_key: bytes
    def __init__(self, recording_id: _Optional[str] = ..., wrapped_key: _Optional[bytes] = ...) -> None: ...

class RewrapDataKeyResponse(_message.Message):
    __slots__ = ("wrapped_key", "key_ref")
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_REF_FIELD_NUMBER: _ClassVar[int]
    wrapped_key: bytes
    key_ref: KeyRef
    def __init__(self, wrapped_key: _Optional[bytes] = ..., key_ref: _Optional[_Union[KeyRef, _Mapping]] = ...) -> None: ...

class RewrapDataKeysRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RewrapDataKeyRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[RewrapDataKeyRequest, _Mapping]]] = ...) -> None: ...

class RewrapDataKeysResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RewrapResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RewrapResult, _Mapping]]] = ...) -> None: ...

class RewrapResult(_message.Message):
    __slots__ = ("wrapped_key", "key_ref", "code", "message", "reason")
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_REF_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    wrapped_key: bytes
    key_ref: KeyRef
    code: int
    message: str
    reason: str
    def __init__(self, wrapped_key: _Optional[bytes] = ..., key_ref: _Optional[_Union[KeyRef, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
