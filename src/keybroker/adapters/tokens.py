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


def cache_lifetime(headers: Mapping[str, str]) -> float | None:
    """Seconds a JWKS response may be cached by its ``Cache-Control`` (``max-age`` less the
    ``Age`` it already has; ``no-cache``/``no-store``: 0), or None when it does not say."""
    lifetime: float | None = None
    for directive in (headers.get("cache-control") or "").split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in {"no-cache", "no-store"}:
            return 0.0
        if name == "max-age" and lifetime is None:
            try:
                lifetime = float(int(value.strip().strip('"')))
            except ValueError:
                return None  # malformed: as if not given
    if lifetime is None:
        return None
    try:
        age = int(headers.get("age") or 0)
    except ValueError:
        age = 0
    return max(0.0, lifetime - max(0, age))


#: Seconds between looks at a JWKS file's stat (it is re-read when that changes).
FILE_CHECK_SECONDS = 1.0
#: The background refresh never fetches a URL more often than this, whatever the settings.
MIN_PERIOD_SECONDS = 1.0

_FileStamp = tuple[int, int, int, int] | None


def _file_stamp(path: Path) -> _FileStamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class JwksKeys:
    """Signing keys by ``kid`` from a JWKS file or https URL, kept current.

    Once :meth:`start` ed, a background thread refreshes the set: a URL every ``max_interval``
    seconds, or sooner when its ``Cache-Control: max-age`` says so, but never more often than
    every ``min_interval``; a file whenever its stat changes (looked at every
    :data:`FILE_CHECK_SECONDS`). A ``kid`` missing from the new set is refused from then on
    (:meth:`current` no longer returns it, so the verifier's cache drops the tokens it signed).

    A failed fetch keeps the last good set, logs a warning and is retried after
    ``min_interval``; after ``max_stale`` seconds without a successful fetch no key is returned
    (every token is refused: fail closed) until a fetch succeeds again.

    An unknown ``kid`` also triggers a refresh, at most once per ``min_interval`` seconds. A
    file is re-read inline (local and fast); a URL is refetched on a background thread so a
    slow issuer never blocks calls: the call that saw the unknown ``kid`` is refused and later
    ones succeed.
    """

    def __init__(
        self,
        *,
        file: Path | None = None,
        url: str = "",
        min_interval: float = 30.0,
        max_interval: float = 300.0,
        max_stale: float = 86400.0,
        ca_file: Path | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        fetch_timeout: float = 5.0,
    ) -> None:
        if (file is None) == (not url):
            raise ConfigurationError("[auth] give exactly one of jwks_file or jwks_url")
        self._file = file
        self._url = url
        self._min_interval = min_interval
        self._max_interval = max(max_interval, min_interval)
        self._max_stale = max_stale
        self._monotonic = monotonic
        self._timeout = fetch_timeout
        self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self._tls), _SameOriginRedirects()
        )
        self._keys: dict[str, PyJWK] = {}
        self._jwks: dict[str, str] = {}  # kid -> the JWK as canonical JSON (to keep unchanged keys)
        self._last_refresh = float("-inf")  # last attempt an unknown kid may cause
        self._fetched_at = float("-inf")  # last success
        self._next_due = float("-inf")
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()  # one fetch at a time: none overtakes a newer one
        self._refreshing = False
        self._stale_logged = False
        self._failure: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_demand: threading.Thread | None = None  # the fetch an unknown kid started
        self._file_stamp = _file_stamp(file) if file is not None else None
        self._load(*self._read())

    # -- background refresh -----------------------------------------------------------------

    def start(self) -> None:
        """Start the background refresh (idempotent); :meth:`stop` ends it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jwks-refresh", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the background refresh and wait for any fetch in flight (also one an unknown
        ``kid`` started): none is left running against an issuer that may be gone."""
        with self._lock:
            self._stop.set()
            on_demand = self._on_demand
        for thread in (self._thread, on_demand):
            if thread is not None:
                thread.join(timeout=self._timeout + 1)

    def _run(self) -> None:
        while not self._stop.wait(max(0.0, self._next_due - self._monotonic())):
            try:
                self.refresh_if_due()
            except Exception:  # a refresher must never die silently
                log.exception("jwks refresh failed unexpectedly")
                self._next_due = self._monotonic() + self._period(self._min_interval)

    def refresh_if_due(self) -> None:
        """One step of the background refresh: fetch the URL (or re-read a changed file) if
        its time has come."""
        now = self._monotonic()
        if now < self._next_due:
            return
        if self._file is not None:
            self._next_due = now + FILE_CHECK_SECONDS
            stamp = _file_stamp(self._file)
            if stamp == self._file_stamp:
                return
            self._file_stamp = stamp
        self._refresh_quietly()
        if self.stale() and not self._stale_logged:
            self._stale_logged = True
            log.error(
                "jwks: no successful fetch from %s for over %.0f s: every token is refused "
                "until the issuer's JWKS can be fetched again",
                self._url,
                self._max_stale,
            )

    def _period(self, wait: float) -> float:
        """``wait`` (a max-age, or a retry delay) within the bounds of the settings."""
        return max(min(max(wait, self._min_interval), self._max_interval), MIN_PERIOD_SECONDS)

    def stale(self) -> bool:
        """True when a URL's keys are older than ``max_stale`` (they are then not used)."""
        return bool(self._url) and self._monotonic() - self._fetched_at > self._max_stale

    # -- reading and loading ----------------------------------------------------------------

    def _read(self) -> tuple[Mapping[str, Any], float | None]:
        """The JWKS document and, for a URL, how long its response says it may be cached."""
        lifetime: float | None = None
        try:
            if self._file is not None:
                data = json.loads(self._file.read_text())
            else:
                request = urllib.request.Request(  # noqa: S310 - https only (settings check)
                    self._url, headers={"accept": "application/json"}
                )
                with self._opener.open(request, timeout=self._timeout) as resp:
                    data = json.loads(resp.read(MAX_JWKS_BYTES))
                    lifetime = cache_lifetime(resp.headers)
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
        return data, lifetime

    def _load(self, data: Mapping[str, Any], lifetime: float | None = None) -> None:
        try:
            jwks = PyJWKSet.from_dict(dict(data))
        except jwt.PyJWTError as exc:
            raise ConfigurationError(f"[auth] JWKS is invalid: {exc}") from None
        raw = {
            item["kid"]: json.dumps(item, sort_keys=True)
            for item in data.get("keys", [])
            if isinstance(item, dict) and isinstance(item.get("kid"), str)
        }
        now = self._monotonic()
        with self._lock:
            old_keys, old_raw = self._keys, self._jwks
            keys = {}
            for k in jwks.keys:
                if not k.key_id or k.public_key_use not in (None, "sig"):
                    continue
                same = k.key_id in old_keys and old_raw.get(k.key_id) == raw.get(k.key_id)
                keys[k.key_id] = old_keys[k.key_id] if same else k  # unchanged: the same object
            self._keys, self._jwks = keys, {kid: raw.get(kid, "") for kid in keys}
            self._last_refresh = self._fetched_at = now
            self._stale_logged = False
            if self._url:
                wait = self._max_interval if lifetime is None else lifetime
                self._next_due = now + self._period(wait)
        if old_keys and set(old_keys) != set(keys):
            log.info(
                "jwks: signing keys now %s (removed: %s)",
                ", ".join(sorted(keys)) or "none",
                ", ".join(sorted(set(old_keys) - set(keys))) or "none",
            )

    # -- lookups ----------------------------------------------------------------------------

    def current(self, kid: str) -> PyJWK | None:
        """The key ``kid`` names now, without triggering a refresh (None if unknown, or if the
        set is stale)."""
        if self._url and self.stale():
            return None
        return self._keys.get(kid)

    def get(self, kid: str) -> PyJWK | None:
        key = self.current(kid)
        if key is not None:
            return key
        with self._lock:
            due = self._monotonic() - self._last_refresh >= self._min_interval
            if not due or self._refreshing:
                return None  # refreshed recently or already refreshing: refuse, never wait
            self._last_refresh = self._monotonic()
            if self._url:
                if self._stop.is_set():
                    return None  # stopped: no fetch outlives stop()
                self._refreshing = True
                self._on_demand = threading.Thread(
                    target=self._refresh_in_background, name="jwks-fetch", daemon=True
                )
                self._on_demand.start()
                return None
        self._refresh_quietly()
        return self.current(kid)

    def _refresh_quietly(self) -> None:
        with self._fetch_lock:
            try:
                self._load(*self._read())
            except ConfigurationError as exc:
                if self._url:
                    self._next_due = self._monotonic() + self._period(self._min_interval)
                if exc.message != self._failure:
                    log.warning("jwks refresh failed (the last good keys stay): %s", exc.message)
                self._failure = exc.message
            else:
                if self._failure is not None:
                    log.info("jwks refresh succeeded again")
                self._failure = None

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
        # token hash -> (principal, kid, key): a hit counts only while the key is still current
        self._cache: OrderedDict[bytes, tuple[Principal, str, PyJWK]] = OrderedDict()
        self._cache_lock = threading.Lock()

    def verify(self, token: str) -> Principal:
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError("access token malformed", reason="token_malformed")
        digest = token_hash(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None:
            principal, kid, key = cached
            if now < principal.expires_at and self._keys.current(kid) is key:
                return principal
        principal, kid, key = self._verify(token)
        if self._s.token_cache_size:
            with self._cache_lock:
                self._cache[digest] = (principal, kid, key)
                while len(self._cache) > self._s.token_cache_size:
                    self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, str, PyJWK]:
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
            return self._principal(claims), kid, key
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
