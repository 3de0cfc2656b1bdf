"""JWT access-token verification (PyJWT) into a Principal.

Rules (RFC 9068 / RFC 8725 / RFC 8705): algorithm allowlist from settings (never ``none``, never
HMAC beside public-key algorithms: settings refuse it); header ``typ`` must be ``at+jwt``
(configurable); ``iss``, ``aud``, ``exp``, ``iat``, ``sub`` and ``jti`` required; ``nbf`` honoured;
leeway bounded; lifetime ``exp - iat`` bounded; keys from a JWKS selected by ``kid``. Every PyJWT
failure maps to an
AuthenticationError in one table, with a catch-all.

Verified tokens are cached by SHA-256 of the token, bounded in size and never past ``exp``. The
certificate binding (``cnf``) is checked per call by the caller, so a cached token bound to one
certificate is still refused over another.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import jwt
from jwt import PyJWK, PyJWKSet

from keybroker.core.identity import Principal
from keybroker.core.ports import Clock
from keybroker.errors import AuthenticationError, ConfigurationError
from keybroker.settings import AuthSettings

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8192
MAX_JWKS_BYTES = 1 << 20
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "jti"]

#: PyJWT exception -> (reason, public message). Order matters: subclasses first.
_PYJWT_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired", "access token expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "access token not yet valid"),
    (jwt.InvalidAudienceError, "bad_audience", "access token audience not accepted"),
    (jwt.InvalidIssuerError, "bad_issuer", "access token issuer not accepted"),
    (jwt.MissingRequiredClaimError, "missing_claim", "access token lacks a required claim"),
    (jwt.InvalidSignatureError, "bad_signature", "access token signature invalid"),
    (jwt.InvalidAlgorithmError, "alg_not_allowed", "access token algorithm not allowed"),
    (jwt.DecodeError, "token_malformed", "access token malformed"),
    (jwt.InvalidTokenError, "token_invalid", "access token invalid"),
)


def map_pyjwt_error(exc: Exception) -> AuthenticationError:
    """The one PyJWT -> domain mapping; anything unknown is a plain invalid token."""
    for cls, reason, message in _PYJWT_ERRORS:
        if isinstance(exc, cls):
            return AuthenticationError(message, reason=reason)
    return AuthenticationError("access token invalid", reason="token_invalid")


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class RedirectRefusedError(urllib.error.URLError):
    """The JWKS server redirected to another origin (scheme, host or port)."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"https": 443, "http": 80}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the JWKS URL's own origin: never to ``http://`` (keys an
    on-path attacker could replace) nor to another host (keys the issuer did not publish)."""

    def redirect_request(  # noqa: PLR0917 - the signature urllib calls
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if _origin(newurl) != _origin(req.full_url):
            raise RedirectRefusedError(
                f"redirect {code} to another scheme, host or port refused: {newurl}"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class JwksKeys:
    """Signing keys by ``kid`` from a JWKS file or https URL.

    An unknown ``kid`` triggers a refresh at most once per ``min_interval`` seconds. A file is
    re-read inline (local and fast); a URL is refetched on a background thread so a slow issuer
    never blocks calls: the call that saw the unknown ``kid`` is refused and later ones succeed.
    """

    def __init__(
        self,
        *,
        file: Path | None = None,
        url: str = "",
        min_interval: float = 30.0,
        ca_file: Path | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        fetch_timeout: float = 5.0,
    ) -> None:
        if (file is None) == (not url):
            raise ConfigurationError("[auth] give exactly one of jwks_file or jwks_url")
        self._file = file
        self._url = url
        self._min_interval = min_interval
        self._monotonic = monotonic
        self._timeout = fetch_timeout
        self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self._tls), _SameOriginRedirects()
        )
        self._keys: dict[str, PyJWK] = {}
        self._last_refresh = float("-inf")
        self._lock = threading.Lock()
        self._refreshing = False
        self._load(self._read())

    def _read(self) -> Mapping[str, Any]:
        try:
            if self._file is not None:
                data = json.loads(self._file.read_text())
            else:
                request = urllib.request.Request(  # noqa: S310 - https only (settings check)
                    self._url, headers={"accept": "application/json"}
                )
                with self._opener.open(request, timeout=self._timeout) as resp:
                    data = json.loads(resp.read(MAX_JWKS_BYTES))
        except RedirectRefusedError as exc:
            raise ConfigurationError(
                f"[auth] cannot load JWKS from {self._url}: {exc.reason}"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"[auth] cannot load JWKS from {self._file or self._url}: {type(exc).__name__}"
            ) from None
        if not isinstance(data, dict):
            raise ConfigurationError("[auth] JWKS must be a JSON object with a 'keys' array")
        return data

    def _load(self, data: Mapping[str, Any]) -> None:
        try:
            jwks = PyJWKSet.from_dict(dict(data))
        except jwt.PyJWTError as exc:
            raise ConfigurationError(f"[auth] JWKS is invalid: {exc}") from None
        keys = {k.key_id: k for k in jwks.keys if k.key_id and k.public_key_use in (None, "sig")}
        with self._lock:
            self._keys = keys
            self._last_refresh = self._monotonic()

    def get(self, kid: str) -> PyJWK | None:
        key = self._keys.get(kid)
        if key is not None:
            return key
        with self._lock:
            due = self._monotonic() - self._last_refresh >= self._min_interval
            if not due or self._refreshing:
                return None  # refreshed recently or already refreshing: refuse, never wait
            self._last_refresh = self._monotonic()
            if self._url:
                self._refreshing = True
                threading.Thread(target=self._refresh_in_background, daemon=True).start()
                return None
        self._refresh_quietly()
        return self._keys.get(kid)

    def _refresh_quietly(self) -> None:
        try:
            self._load(self._read())
        except ConfigurationError as exc:
            log.warning("jwks refresh failed: %s", exc.message)

    def _refresh_in_background(self) -> None:
        try:
            self._refresh_quietly()
        finally:
            self._refreshing = False


class TokenVerifier:
    """Verifies bearer tokens and returns their :class:`Principal`."""

    def __init__(self, settings: AuthSettings, keys: JwksKeys, *, clock: Clock = time.time) -> None:
        self._s = settings
        self._keys = keys
        self._clock = clock
        self._algorithms = list(settings.algorithms)
        self._cache: OrderedDict[bytes, Principal] = OrderedDict()
        self._cache_lock = threading.Lock()

    def verify(self, token: str) -> Principal:
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError("access token malformed", reason="token_malformed")
        digest = token_hash(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and now < cached.expires_at:
            return cached
        principal = self._verify(token)
        if self._s.token_cache_size:
            with self._cache_lock:
                self._cache[digest] = principal
                while len(self._cache) > self._s.token_cache_size:
                    self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except Exception as exc:  # noqa: BLE001 - PyJWT may raise non-PyJWT errors on junk
            raise map_pyjwt_error(exc) from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise AuthenticationError(
                "access token algorithm not allowed", reason="alg_not_allowed"
            )
        if self._s.token_type:
            typ = str(header.get("typ", "")).lower().removeprefix("application/")
            if typ != self._s.token_type.lower():
                raise AuthenticationError("access token type not accepted", reason="bad_typ")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("access token has no key id (kid)", reason="unknown_kid")
        key = self._keys.get(kid)
        if key is None:
            raise AuthenticationError("access token signing key unknown", reason="unknown_kid")
        if key.algorithm_name and key.algorithm_name != alg:
            raise AuthenticationError(
                "access token algorithm not allowed", reason="alg_not_allowed"
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self._s.audience,
                issuer=self._s.issuer,
                leeway=self._s.leeway,
                options={"require": _REQUIRED_CLAIMS, "verify_sub": True, "verify_jti": True},
            )
        except _AFTER_SIGNATURE as exc:  # signature good, a claim check failed: say whose
            raise _naming(map_pyjwt_error(exc), _unverified_claims(token)) from None
        except Exception as exc:  # noqa: BLE001 - mapped in one table; never UNKNOWN
            raise map_pyjwt_error(exc) from None
        try:
            return self._principal(claims)
        except AuthenticationError as exc:
            raise _naming(exc, claims) from None

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf", 0)
        # NumericDates are JSON numbers (RFC 7519); PyJWT alone would read "nbf": "222" as 222.
        if not all(isinstance(t, int | float) for t in (exp, iat, nbf)):
            raise AuthenticationError("access token malformed", reason="token_malformed")
        if exp - iat > self._s.max_token_lifetime:
            raise AuthenticationError(
                "access token lifetime exceeds the maximum", reason="lifetime_exceeded"
            )
        scope = claims.get("scope", "")
        purpose = claims.get("purpose", [])
        if isinstance(purpose, str):
            purpose = [purpose]
        amr = claims.get("amr", [])
        client_id = claims.get("client_id")
        cnf = claims.get("cnf")
        thumbprint = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        if (
            not isinstance(scope, str)
            or not _strings(purpose)
            or not _strings(amr)
            or not (client_id is None or isinstance(client_id, str))
            or not (cnf is None or isinstance(thumbprint, str))
        ):
            raise AuthenticationError("access token claims malformed", reason="token_malformed")
        return Principal(
            subject=str(claims["sub"]),
            token_id=str(claims["jti"]),
            expires_at=int(exp),
            scopes=frozenset(scope.split()),
            purposes=frozenset(purpose),
            client_id=client_id,
            cnf_thumbprint=thumbprint,
            amr=frozenset(amr),
        )


#: PyJWT errors raised only after the signature verified (``decode`` checks it first).
_AFTER_SIGNATURE = (
    jwt.ExpiredSignatureError,
    jwt.ImmatureSignatureError,
    jwt.InvalidAudienceError,
    jwt.InvalidIssuerError,
    jwt.InvalidIssuedAtError,
    jwt.MissingRequiredClaimError,
)
_MAX_CLAIM = 256  # longest sub/jti/client_id copied into a denial record


def _unverified_claims(token: str) -> Mapping[str, Any]:
    """The payload of a token whose signature was just verified (so reading it is safe)."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except Exception:  # noqa: BLE001 - cannot happen after a verified decode; name nobody
        return {}
    return claims


def _naming(exc: AuthenticationError, claims: Mapping[str, Any]) -> AuthenticationError:
    """``exc`` carrying the refused token's sub, jti and client_id (bounded strings only)."""

    def text(name: str) -> str | None:
        value = claims.get(name)
        return value[:_MAX_CLAIM] if isinstance(value, str) else None

    exc.verified_claims = (text("sub"), text("jti"), text("client_id"))
    return exc


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
