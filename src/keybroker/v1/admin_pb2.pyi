import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_VERSION_STATE_UNSPECIFIED: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_ENABLED: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_DECRYPT_ONLY: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_DISABLED: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_SCHEDULED_FOR_DESTRUCTION: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_DESTROYED: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_PENDING: _ClassVar[KeyVersionState]
    KEY_VERSION_STATE_DESTROYING: _ClassVar[KeyVersionState]
KEY_VERSION_STATE_UNSPECIFIED: KeyVersionState
KEY_VERSION_STATE_ENABLED: KeyVersionState
KEY_VERSION_STATE_DECRYPT_ONLY: KeyVersionState
KEY_VERSION_STATE_DISABLED: KeyVersionState
KEY_VERSION_STATE_SCHEDULED_FOR_DESTRUCTION: KeyVersionState
KEY_VERSION_STATE_DESTROYED: KeyVersionState
KEY_VERSION_STATE_PENDING: KeyVersionState
KEY_VERSION_STATE_DESTROYING: KeyVersionState

class KeyVersion(_message.Message):
    __slots__ = ("version", "state", "current", "created_at", "destroy_after", "destroyed_at", "wraps", "unwraps", "last_used_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DESTROY_AFTER_FIELD_NUMBER: _ClassVar[int]
    DESTROYED_AT_FIELD_NUMBER: _ClassVar[int]
    WRAPS_FIELD_NUMBER: _ClassVar[int]
    UNWRAPS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: KeyVersionState
    current: bool
    created_at: _timestamp_pb2.Timestamp
    destroy_after: _timestamp_pb2.Timestamp
    destroyed_at: _timestamp_pb2.Timestamp
    wraps: int
    unwraps: int
    last_used_at: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[KeyVersionState, str]] = ..., current: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., destroy_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., destroyed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., wraps: _Optional[int] = ..., unwraps: _Optional[int] = ..., last_used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("name", "current_version", "min_decryption_version", "rotation_period_seconds", "rotate_after_wraps", "created_at", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_DECRYPTION_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROTATE_AFTER_WRAPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    current_version: int
    min_decryption_version: int
    rotation_period_seconds: int
    rotate_after_wraps: int
    created_at: _timestamp_pb2.Timestamp
    versions: _containers.RepeatedCompositeFieldContainer[KeyVersion]
    def __init__(self, name: _Optional[str] = ..., current_version: _Optional[int] = ..., min_decryption_version: _Optional[int] = ..., rotation_period_seconds: _Optional[int] = ..., rotate_after_wraps: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[KeyVersion, _Mapping]]] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("name", "rotation_period_seconds", "rotate_after_wraps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROTATE_AFTER_WRAPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rotation_period_seconds: int
    rotate_after_wraps: int
    def __init__(self, name: _Optional[str] = ..., rotation_period_seconds: _Optional[int] = ..., rotate_after_wraps: _Optional[int] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SetRotationPolicyRequest(_message.Message):
    __slots__ = ("name", "rotation_period_seconds", "rotate_after_wraps", "min_decryption_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROTATE_AFTER_WRAPS_FIELD_NUMBER: _ClassVar[int]
    MIN_DECRYPTION_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    rotation_period_seconds: int
    rotate_after_wraps: int
    min_decryption_version: int
    def __init__(self, name: _Optional[str] = ..., rotation_period_seconds: _Optional[int] = ..., rotate_after_wraps: _Optional[int] = ..., min_decryption_version: _Optional[int] = ...) -> None: ...

class KeyVersionRequest(_message.Message):
    __slots__ = ("name", "version", "make_current")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAKE_CURRENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    make_current: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., make_current: _Optional[bool] = ...) -> None: ...

class DisableKeyVersionRequest(_message.Message):
    __slots__ = ("name", "version", "decrypt_only")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DECRYPT_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    decrypt_only: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., decrypt_only: _Optional[bool] = ...) -> None: ...

class ScheduleKeyVersionDestructionRequest(_message.Message):
    __slots__ = ("name", "version", "window_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    window_seconds: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., window_seconds: _Optional[int] = ...) -> None: ...
