"""``keybroker.v1.KeyAdmin``: translates proto <-> core; no rules live here."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from keybroker.core.admin import KeyAdmin
from keybroker.core.decision import Decision
from keybroker.core.identity import Principal
from keybroker.core.keys import KeyInfo, VersionInfo, VersionState
from keybroker.server.guard import CallGuard
from keybroker.v1 import admin_pb2 as pb
from keybroker.v1 import admin_pb2_grpc as pb_grpc

SERVICE_NAME = "keybroker.v1.KeyAdmin"

_STATES: dict[VersionState, pb.KeyVersionState] = {
    VersionState.ENABLED: pb.KEY_VERSION_STATE_ENABLED,
    VersionState.DECRYPT_ONLY: pb.KEY_VERSION_STATE_DECRYPT_ONLY,
    VersionState.DISABLED: pb.KEY_VERSION_STATE_DISABLED,
    VersionState.SCHEDULED_FOR_DESTRUCTION: pb.KEY_VERSION_STATE_SCHEDULED_FOR_DESTRUCTION,
    VersionState.DESTROYED: pb.KEY_VERSION_STATE_DESTROYED,
    VersionState.PENDING: pb.KEY_VERSION_STATE_PENDING,
    VersionState.DESTROYING: pb.KEY_VERSION_STATE_DESTROYING,
}
STATE_NAMES = {v: k for k, v in _STATES.items()}
R = TypeVar("R")


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _version(v: VersionInfo, current: int) -> pb.KeyVersion:
    return pb.KeyVersion(
        version=v.version,
        state=_STATES[v.state],
        current=v.version == current,
        created_at=timestamp(v.created_at),
        destroy_after=timestamp(v.destroy_after),
        destroyed_at=timestamp(v.destroyed_at),
        wraps=v.wraps,
        unwraps=v.unwraps,
        last_used_at=timestamp(v.last_used_at),
    )


def key_message(key: KeyInfo) -> pb.Key:
    return pb.Key(
        name=key.name,
        current_version=key.current_version,
        min_decryption_version=key.min_decryption_version,
        rotation_period_seconds=key.rotation_period or 0,
        rotate_after_wraps=key.rotate_after_wraps,
        created_at=timestamp(key.created_at),
        versions=[_version(v, key.current_version) for v in key.versions],
    )


class KeyAdminServicer(pb_grpc.KeyAdminServicer):
    def __init__(self, admin: KeyAdmin, guard: CallGuard) -> None:
        self._admin = admin
        self._guard = guard

    def _key(
        self,
        context: grpc.ServicerContext,
        operation: str,
        action: Callable[[Principal, Decision], KeyInfo],
    ) -> pb.Key:
        return self._guard.run(context, operation, lambda p, d: key_message(action(p, d)))

    def CreateKey(self, request: pb.CreateKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        return self._key(
            context,
            "CreateKey",
            lambda p, d: self._admin.create_key(
                p,
                d,
                request.name,
                rotation_period=request.rotation_period_seconds or None,
                rotate_after_wraps=request.rotate_after_wraps or None,
            ),
        )

    def GetKey(self, request: pb.GetKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        return self._key(context, "GetKey", lambda p, d: self._admin.get_key(p, d, request.name))

    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext
    ) -> pb.ListKeysResponse:
        return self._guard.run(
            context,
            "ListKeys",
            lambda p, d: pb.ListKeysResponse(
                keys=[key_message(k) for k in self._admin.list_keys(p, d)]
            ),
        )

    def RotateKey(self, request: pb.RotateKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        return self._key(
            context, "RotateKey", lambda p, d: self._admin.rotate_key(p, d, request.name)
        )

    def SetRotationPolicy(
        self, request: pb.SetRotationPolicyRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        def optional(field: str) -> int | None:
            return int(getattr(request, field)) if request.HasField(field) else None

        return self._key(
            context,
            "SetRotationPolicy",
            lambda p, d: self._admin.set_rotation_policy(
                p,
                d,
                request.name,
                rotation_period=optional("rotation_period_seconds"),
                rotate_after_wraps=optional("rotate_after_wraps"),
                min_decryption_version=optional("min_decryption_version"),
            ),
        )

    def DisableKeyVersion(
        self, request: pb.DisableKeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        state = VersionState.DECRYPT_ONLY if request.decrypt_only else VersionState.DISABLED
        return self._key(
            context,
            "DisableKeyVersion",
            lambda p, d: self._admin.set_version_state(p, d, request.name, request.version, state),
        )

    def EnableKeyVersion(
        self, request: pb.KeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        if request.make_current:
            return self._key(
                context,
                "EnableKeyVersion",
                lambda p, d: self._admin.make_current(p, d, request.name, request.version),
            )
        return self._key(
            context,
            "EnableKeyVersion",
            lambda p, d: self._admin.set_version_state(
                p, d, request.name, request.version, VersionState.ENABLED
            ),
        )

    def ScheduleKeyVersionDestruction(
        self, request: pb.ScheduleKeyVersionDestructionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        return self._key(
            context,
            "ScheduleKeyVersionDestruction",
            lambda p, d: self._admin.schedule_destruction(
                p, d, request.name, request.version, request.window_seconds or None
            ),
        )

    def CancelKeyVersionDestruction(
        self, request: pb.KeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        return self._key(
            context,
            "CancelKeyVersionDestruction",
            lambda p, d: self._admin.cancel_destruction(p, d, request.name, request.version),
        )
