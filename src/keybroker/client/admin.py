"""The blocking client of ``keybroker.v1.KeyAdmin`` (what ``keybroker kek`` uses).

Results are the protobuf ``Key`` messages (see ``proto/keybroker/v1/admin.proto``); failures
raise the domain errors of :mod:`keybroker.errors`. The token must carry scope ``keys:admin``
and, unless the broker turned it off, ``amr`` with ``mfa``. Nothing is retried: an
administrative change is not assumed idempotent.
"""

from __future__ import annotations

from keybroker.client._unary import UnaryClient
from keybroker.v1 import admin_pb2 as pb


class KeyAdminClient(UnaryClient):
    service = pb.DESCRIPTOR.services_by_name["KeyAdmin"]

    def create_key(
        self, name: str, *, rotation_period: int = 0, rotate_after_wraps: int = 0
    ) -> pb.Key:
        request = pb.CreateKeyRequest(
            name=name,
            rotation_period_seconds=rotation_period,
            rotate_after_wraps=rotate_after_wraps,
        )
        key: pb.Key = self._call_method("CreateKey", request)
        return key

    def get_key(self, name: str) -> pb.Key:
        key: pb.Key = self._call_method("GetKey", pb.GetKeyRequest(name=name))
        return key

    def list_keys(self) -> list[pb.Key]:
        response: pb.ListKeysResponse = self._call_method("ListKeys", pb.ListKeysRequest())
        return list(response.keys)

    def rotate_key(self, name: str) -> pb.Key:
        key: pb.Key = self._call_method("RotateKey", pb.RotateKeyRequest(name=name))
        return key

    def set_rotation_policy(
        self,
        name: str,
        *,
        rotation_period: int | None = None,
        rotate_after_wraps: int | None = None,
        min_decryption_version: int | None = None,
    ) -> pb.Key:
        request = pb.SetRotationPolicyRequest(name=name)
        if rotation_period is not None:
            request.rotation_period_seconds = rotation_period
        if rotate_after_wraps is not None:
            request.rotate_after_wraps = rotate_after_wraps
        if min_decryption_version is not None:
            request.min_decryption_version = min_decryption_version
        key: pb.Key = self._call_method("SetRotationPolicy", request)
        return key

    def disable_version(self, name: str, version: int, *, decrypt_only: bool = False) -> pb.Key:
        request = pb.DisableKeyVersionRequest(name=name, version=version, decrypt_only=decrypt_only)
        key: pb.Key = self._call_method("DisableKeyVersion", request)
        return key

    def enable_version(self, name: str, version: int, *, make_current: bool = False) -> pb.Key:
        """Enable a version; ``make_current`` also makes it current (a newer version, e.g. one
        found on the HSM token: the only way such a version becomes current)."""
        request = pb.KeyVersionRequest(name=name, version=version, make_current=make_current)
        key: pb.Key = self._call_method("EnableKeyVersion", request)
        return key

    def schedule_destruction(self, name: str, version: int, *, window: int = 0) -> pb.Key:
        request = pb.ScheduleKeyVersionDestructionRequest(
            name=name, version=version, window_seconds=window
        )
        key: pb.Key = self._call_method("ScheduleKeyVersionDestruction", request)
        return key

    def cancel_destruction(self, name: str, version: int) -> pb.Key:
        key: pb.Key = self._call_method(
            "CancelKeyVersionDestruction", pb.KeyVersionRequest(name=name, version=version)
        )
        return key
