"""Who is calling: the verified token (Principal) and the TLS peer (Peer)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    """Claims of a verified access token that the broker acts on. Holds no token material."""

    subject: str
    token_id: str
    expires_at: int
    scopes: frozenset[str]
    purposes: frozenset[str]
    client_id: str | None = None
    cnf_thumbprint: str | None = None
    """RFC 8705 ``cnf.x5t#S256``: base64url SHA-256 of the certificate the token is bound to."""
    amr: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Peer:
    """The mTLS peer of a call, from the TLS handshake."""

    address: str
    identity: str
    """SPIFFE ID when the certificate has one, else its common name."""
    thumbprint: str
    """base64url (no padding) SHA-256 of the certificate's DER, the ``x5t#S256`` form."""
    tls_version: str
