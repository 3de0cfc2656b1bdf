"""gRPC clients for the tests: real mTLS channels to a real broker."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import grpc

from keybroker.devenv import DevEnv
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc


def channel(
    env: DevEnv, port: int, *, cert: str = "client", own_connection: bool = False
) -> grpc.Channel:
    """An mTLS channel presenting ``pki/<cert>.pem``."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=env.ca_cert.read_bytes(),
        private_key=env.key(cert).read_bytes(),
        certificate_chain=env.cert(cert).read_bytes(),
    )
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options)


def stub(ch: grpc.Channel) -> pb_grpc.KeyBrokerStub:
    return pb_grpc.KeyBrokerStub(ch)  # type: ignore[no-untyped-call]


def auth(token: str, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}"), *extra]


def new_recording_id(prefix: str = "rec") -> str:
    """A recording id nobody registered yet (the broker registers each id once)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def generate_request(
    recording_id: str | None = None,
    purposes: Sequence[str] = ("support",),
    subject_ids: Sequence[str] = ("subj-1",),
    context: dict[str, str] | None = None,
    key_name: str = "",
) -> pb.GenerateDataKeyRequest:
    """A GenerateDataKey request; without ``recording_id``, for a new recording."""
    return pb.GenerateDataKeyRequest(
        recording_id=new_recording_id() if recording_id is None else recording_id,
        purposes=list(purposes),
        subject_ids=list(subject_ids),
        context=context or {},
        key_name=key_name,
    )
