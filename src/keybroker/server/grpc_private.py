"""The one door to grpcio's private layer.

keybroker's server loop (:mod:`keybroker.server.loop`) drives gRPC core through grpcio's Cython
layer, ``grpc._cython.cygrpc``, with the calls grpcio's own server makes. That layer is not
public API: pyproject.toml pins grpcio to the minor version this was written for, and this
module is the only place that imports it. Every private name the server uses is bound here once;
``tests/server/test_grpc_private.py`` checks each of them (and the attributes the loop reads on
the objects they return, listed in :data:`ATTRIBUTES`) against the installed grpcio, so an
upgrade that moves one fails in that test, by name, instead of in a running broker.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc._cython import cygrpc  # type: ignore[attr-defined]

# -- gRPC core objects the loop creates or compares against ------------------------------------
CompletionQueue: Any = cygrpc.CompletionQueue
Server: Any = cygrpc.Server
CompletionType: Any = cygrpc.CompletionType

# -- batch operations --------------------------------------------------------------------------
SendInitialMetadataOperation: Any = cygrpc.SendInitialMetadataOperation
SendMessageOperation: Any = cygrpc.SendMessageOperation
SendStatusFromServerOperation: Any = cygrpc.SendStatusFromServerOperation
ReceiveMessageOperation: Any = cygrpc.ReceiveMessageOperation
ReceiveCloseOnServerOperation: Any = cygrpc.ReceiveCloseOnServerOperation

# -- the peer's TLS identity -------------------------------------------------------------------
auth_context: Any = cygrpc.auth_context
peer_identities: Any = cygrpc.peer_identities
peer_identity_key: Any = cygrpc.peer_identity_key

NAMES = (
    "CompletionQueue",
    "Server",
    "CompletionType",
    "SendInitialMetadataOperation",
    "SendMessageOperation",
    "SendStatusFromServerOperation",
    "ReceiveMessageOperation",
    "ReceiveCloseOnServerOperation",
    "auth_context",
    "peer_identities",
    "peer_identity_key",
)
"""The ``cygrpc`` names this module binds (each bound under the same name)."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "Server": (
        "register_completion_queue",
        "add_http2_port",
        "start",
        "request_call",
        "shutdown",
        "cancel_all_calls",
        "destroy",
    ),
    "CompletionQueue": ("poll",),
    "CompletionType": ("queue_timeout",),
    "RequestCallEvent": (
        "call",
        "call_details",
        "invocation_metadata",
        "tag",
        "success",
        "completion_type",
    ),
    "BatchOperationEvent": ("batch_operations", "tag", "success", "completion_type"),
    "CallDetails": ("method", "deadline"),
    "Call": ("start_server_batch", "peer", "cancel"),
    "ReceiveMessageOperation": ("message",),
}
"""What the loop reads on the objects gRPC core hands it, by ``cygrpc`` class."""


def core_credentials(credentials: grpc.ServerCredentials) -> Any:
    """The gRPC core credentials (``cygrpc.ServerCredentials``) a public
    :class:`grpc.ServerCredentials` wraps, for ``Server.add_http2_port``."""
    return credentials._credentials  # type: ignore[attr-defined]
