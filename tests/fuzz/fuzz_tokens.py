"""Fuzz JWT verification (keybroker.adapters.tokens) with a real key set, around valid tokens.

The verifier gets a real JWKS file (one ES256 and one EdDSA signing key) and a pinned clock. The
first byte chooses how the token is made from the rest of the input:

0. raw: the rest is the token text.
1. fuzzed header: the rest is the header's JSON bytes; valid claims; signed with a real key.
2. fuzzed claims: valid header; the rest is the claims' JSON bytes; signed with a real key.
3. structured claims: valid header; each standard claim gets a fuzzed JSON value of a fuzzed type
   (or is left out); signed with a real key.
4. damaged: a valid token with bytes of one segment flipped, cut or inserted.

``TokenVerifier.verify`` must return a Principal or raise AuthenticationError; any other exception
is a failure. An accepted token is checked again, independently of PyJWT (cryptography for the
signature, plain comparisons for the claims): accepting a token that fails that check is a failure.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keybroker.adapters.tokens import JwksKeys, TokenVerifier
from keybroker.core.identity import Principal
from keybroker.errors import AuthenticationError
from keybroker.settings import AuthSettings
from tests.fuzz._common import FuzzFailure, Provider, provider

#: PyJWT checks exp, nbf and iat against the wall clock (the verifier's clock only bounds its
#: cache), so tokens are made around the time the harness starts.
NOW = int(time.time())
ISSUER = "https://issuer.example"
AUDIENCE = "keybroker"
SETTINGS = AuthSettings(issuer=ISSUER, audience=AUDIENCE, max_token_lifetime=3600, leeway=30)
# Fixed keys, so a run is reproducible from its seed.
EC_KEY = ec.derive_private_key(0x6B657962726F6B65722066757A7A, ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KIDS = {"ES256": "fuzz-ec", "EdDSA": "fuzz-ed"}
CLAIM_NAMES = ("iss", "aud", "sub", "jti", "iat", "exp", "nbf", "scope", "purpose", "amr",
               "client_id", "cnf")  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(segment: str) -> bytes:
    """Decode as PyJWT does (base64url, padding added, other characters ignored)."""
    raw = segment.encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))


@cache
def verifier() -> TokenVerifier:
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key())),
             "kid": KIDS["ES256"], "alg": "ES256", "use": "sig"},
            {**json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(ED_KEY.public_key())),
             "kid": KIDS["EdDSA"], "alg": "EdDSA", "use": "sig"},
        ]
    }  # fmt: skip
    path = Path(tempfile.mkdtemp(prefix="kb-fuzz-jwks-")) / "jwks.json"
    path.write_text(json.dumps(jwks))
    keys = JwksKeys(file=path, min_interval=1e12)  # never re-read: every run sees the same keys
    return TokenVerifier(SETTINGS, keys, clock=lambda: float(NOW))


def valid_header(alg: str = "ES256") -> dict[str, Any]:
    return {"alg": alg, "typ": "at+jwt", "kid": KIDS[alg]}


def valid_claims() -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "storage-1",
        "jti": "jti-1",
        "iat": NOW - 60,
        "exp": NOW + 600,
        "scope": "keys:generate keys:unwrap",
        "purpose": ["support"],
        "client_id": "storage",
    }


def sign(header: bytes, claims: bytes, alg: str) -> str:
    signing_input = f"{_b64(header)}.{_b64(claims)}"
    algorithm = jwt.get_algorithm_by_name(alg)
    key = EC_KEY if alg == "ES256" else ED_KEY
    return f"{signing_input}.{_b64(algorithm.sign(signing_input.encode(), key))}"


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _genuine_signature(token: str, header: dict[str, Any]) -> bool:
    head, payload, signature = token.split(".")
    message = f"{head}.{payload}".encode("utf-8", "surrogatepass")
    raw = _unb64(signature)
    try:
        if header.get("alg") == "ES256" and header.get("kid") == KIDS["ES256"] and len(raw) == 64:
            der = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
            EC_KEY.public_key().verify(der, message, ec.ECDSA(hashes.SHA256()))
            return True
        if header.get("alg") == "EdDSA" and header.get("kid") == KIDS["EdDSA"]:
            ED_KEY.public_key().verify(raw, message)
            return True
    except InvalidSignature:
        return False
    return False


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def acceptable(token: str) -> bool:
    """Whether ``token`` deserves to be accepted, decided without PyJWT."""
    try:
        header = json.loads(_unb64(token.split(".", maxsplit=1)[0]))
        claims = json.loads(_unb64(token.split(".")[1]))
    except (ValueError, IndexError, binascii.Error):
        return False
    if not isinstance(header, dict) or not isinstance(claims, dict) or token.count(".") != 2:
        return False
    typ = str(header.get("typ", "")).lower().removeprefix("application/")
    if typ != "at+jwt" or not _genuine_signature(token, header):
        return False
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    exp: Any = claims.get("exp")
    iat: Any = claims.get("iat")
    nbf: Any = claims.get("nbf", NOW)
    return (
        claims.get("iss") == ISSUER
        and AUDIENCE in audiences
        and _number(exp) and _number(iat)
        and (_number(nbf) or isinstance(nbf, bool))  # PyJWT reads true as 1: harmless
        and exp > NOW - SETTINGS.leeway
        and nbf <= time.time() + SETTINGS.leeway
        and exp - iat <= SETTINGS.max_token_lifetime
        and isinstance(claims.get("sub"), str)
        and isinstance(claims.get("jti"), str)
    )  # fmt: skip


def check(token: str) -> Principal | None:
    try:
        principal = verifier().verify(token)
    except AuthenticationError:
        return None
    if not acceptable(token):
        raise FuzzFailure(f"accepted a token that must be refused: {token!r}")
    return principal


def _value(fdp: Provider, depth: int = 0) -> Any:  # noqa: PLR0911 - a JSON type each
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-(1 << 70), 1 << 70)
    if kind == 3:
        return NOW + fdp.ConsumeIntInRange(-100_000, 100_000)
    if kind == 4:
        return fdp.ConsumeFloat()  # also inf and nan: json.dumps writes Infinity/NaN
    if kind == 5:
        return str(fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40)))
    if kind == 6:
        return fdp.PickValueInList([ISSUER, AUDIENCE, "keys:unwrap", "mfa", "support", ""])
    if kind in (7, 8):
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {
        str(fdp.ConsumeUnicode(8)) if fdp.ConsumeBool() else "x5t#S256": _value(fdp, depth + 1)
        for _ in range(fdp.ConsumeIntInRange(0, 3))
    }


def _damaged(fdp: Provider) -> str:
    alg = fdp.PickValueInList(list(KIDS))
    token = bytearray(sign(_json(valid_header(alg)), _json(valid_claims()), alg).encode())
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        at = fdp.ConsumeIntInRange(0, len(token))
        kind = fdp.ConsumeIntInRange(0, 2)
        if kind == 0 and at < len(token):
            token[at] = fdp.ConsumeIntInRange(0, 255)
        elif kind == 1:
            del token[at : at + fdp.ConsumeIntInRange(1, 8)]
        else:
            token[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
    return token.decode("latin-1")


def make_token(data: bytes) -> str:
    mode, rest = data[0] % 5, data[1:]
    if mode == 0:
        return rest.decode("latin-1")
    fdp = provider(rest)
    alg = "EdDSA" if data[0] & 0x80 else "ES256"
    if mode == 1:
        return sign(rest, _json(valid_claims()), alg)
    if mode == 2:
        return sign(_json(valid_header(alg)), rest, alg)
    if mode == 3:
        claims = {
            name: valid if fdp.ConsumeBool() else _value(fdp)
            for name, valid in {**valid_claims(), "nbf": NOW, "amr": ["mfa"]}.items()
            if fdp.ConsumeIntInRange(0, 7)
        }
        return sign(_json(valid_header(alg)), _json(claims), alg)
    return _damaged(fdp)


def test_one_input(data: bytes) -> None:
    if data:
        check(make_token(data))
