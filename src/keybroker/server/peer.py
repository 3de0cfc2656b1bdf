"""The mTLS peer of a call, from gRPC's auth context."""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Mapping
from typing import Any

import grpc

from keybroker.core.identity import Peer
from keybroker.errors import PermissionDeniedError


@functools.lru_cache(maxsize=1024)
def certificate_thumbprint(pem: bytes) -> str:
    """RFC 8705 ``x5t#S256``: base64url (no padding) SHA-256 of the certificate's DER."""
    body = b"".join(
        line for line in pem.strip().splitlines() if line and not line.startswith(b"-----")
    )
    der = base64.b64decode(body, validate=True)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def _first(auth: Mapping[str, Any], key: str) -> bytes | None:
    """First value of an auth-context property (grpc gives lists of bytes; its stubs say bytes)."""
    values = auth.get(key)
    return bytes(values[0]) if values else None


def peer_from_context(context: grpc.ServicerContext) -> Peer:
    """Identity of the client certificate on this call's connection. Raises if there is none."""
    auth = context.auth_context()
    pem = _first(auth, "x509_pem_cert")
    if pem is None:
        raise PermissionDeniedError("a client certificate is required", reason="no_client_cert")
    spiffe = _first(auth, "peer_spiffe_id")
    cn = _first(auth, "x509_common_name")
    identity = (spiffe or cn or b"").decode("utf-8", "replace")
    tls = (_first(auth, "ssl_tls_version") or b"").decode("ascii", "replace")
    return Peer(
        address=context.peer(),
        identity=identity,
        thumbprint=certificate_thumbprint(pem),
        tls_version=tls,
    )


def peer_ip(peer: str) -> str:
    """The IP of a gRPC peer string (``ipv4:10.0.0.5:4711``, ``ipv6:[::1]:4711``); other forms
    (``unix:…``) unchanged."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")] if "]" in rest else rest
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return peer
