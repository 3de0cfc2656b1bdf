"""Helpers of the security regression tests: mTLS stubs with tokens for each role, and a way to
read the answer of a refused call."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from keybroker.devenv import DevEnv, mint_token
from keybroker.v1 import admin_pb2_grpc as apb_grpc
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import privacy_pb2_grpc as ppb_grpc
from tests.support.clients import auth, channel, generate_request, stub

DATA_SCOPES = ("keys:generate", "keys:unwrap", "keys:rewrap")
PRIVACY_SCOPES = ("privacy:erase", "privacy:hold", "privacy:amend", "audit:read")


def new_id(prefix: str = "rec") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def refused(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str, str]:
    """Run a call that must fail; its status code, message and ``keybroker-reason``."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    reason = dict(err.trailing_metadata() or ()).get("keybroker-reason", "")
    return err.code(), err.details(), reason


class Caller:
    """One mTLS connection to a broker with the KeyBroker, Privacy and KeyAdmin stubs, and
    tokens minted per role (data plane; DPO and admin with MFA)."""

    def __init__(self, devenv: DevEnv, port: int, *, cert: str = "client") -> None:
        self.devenv = devenv
        self.channel = channel(devenv, port, cert=cert, own_connection=True)
        self.kb = stub(self.channel)
        self.privacy = ppb_grpc.PrivacyStub(self.channel)  # type: ignore[no-untyped-call]
        self.admin = apb_grpc.KeyAdminStub(self.channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.channel.close()

    def token(
        self, scopes: Sequence[str] = DATA_SCOPES, purposes: Sequence[str] = ("support",), **kw: Any
    ) -> str:
        return mint_token(self.devenv, scopes=scopes, purposes=purposes, **kw)

    def dpo(self, **kw: Any) -> str:
        return self.token(PRIVACY_SCOPES, ("support", "qa"), amr=["mfa"], subject="dpo-1", **kw)

    def generate(
        self,
        recording: str | None = None,
        *,
        purposes: Sequence[str] = ("support",),
        subjects: Sequence[str] = ("subj-1",),
        key_name: str = "",
        retain_until: float | None = None,
        token: str | None = None,
    ) -> Any:
        """GenerateWrappedDataKey; the response (``wrapped_key``, ``key_ref``)."""
        request = generate_request(
            recording, purposes=purposes, subject_ids=subjects, key_name=key_name
        )
        if retain_until is not None:
            request.retain_until.CopyFrom(Timestamp(seconds=int(retain_until)))
        bearer = token or self.token(purposes=tuple(purposes))
        return self.kb.GenerateWrappedDataKey(request, metadata=auth(bearer))

    def unwrap(
        self, recording: str, blob: bytes, purpose: str = "support", token: str | None = None
    ) -> Any:
        request = pb.UnwrapDataKeyRequest(recording_id=recording, wrapped_key=blob, purpose=purpose)
        bearer = token or self.token(purposes=(purpose,))
        return self.kb.UnwrapDataKey(request, metadata=auth(bearer))

    def privacy_call(self, method: str, request: Any, token: str | None = None) -> Any:
        return getattr(self.privacy, method)(request, metadata=auth(token or self.dpo()))

    def admin_call(self, method: str, request: Any, token: str | None = None) -> Any:
        bearer = token or self.token(["keys:admin"], (), amr=["mfa"])
        return getattr(self.admin, method)(request, metadata=auth(bearer))


def days_ahead(clock: Callable[[], float], days: float) -> float:
    return clock() + days * 86400
