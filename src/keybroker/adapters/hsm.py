"""PKCS#11 key-encryption keys (python-pkcs11), safe under concurrency and self-healing.

Concurrency: python-pkcs11 initialises modules with ``C_Initialize(NULL)`` and releases the GIL
around every call; SoftHSM then runs without internal locking and concurrent calls crash the
process (see FACTS.md). Every PKCS#11 call in this process therefore runs under one process-wide
lock, :data:`PKCS11_LOCK`. Use processes, not threads, for HSM throughput.

KEKs are token objects labelled ``kek:<name>:v<version>`` (AES-256, private, sensitive, never
extractable, not modifiable, AES-GCM only where the module allows; see
:mod:`keybroker.adapters.kek_objects`). An object under such a label that was not generated in
the HSM as a never-extractable AES-256 key is reported and never used. Where the module supports
``C_CopyObject`` (probed at start), each version used is copied once into an in-memory session
object (``CKA_TOKEN=false``; it stays sensitive and non-extractable) for speed; elsewhere the
token object's handle is used directly. Handles are cached either way.

GCM IVs: :func:`~keybroker.adapters.kek_objects.probe_module` finds at start whether the module
keeps a caller's IV, overwrites it or refuses it (``[hsm] iv_source`` overrides), and every
encryption reads back the IV the module actually used. Every KEK version is checked with a
wrap -> unwrap self-test before it is used for new wraps (:meth:`Pkcs11Keks.self_test`).

Failure and recovery: a background probe (:meth:`Pkcs11Keks.check`) looks the default key up on the
token; if the token, session or login is gone, the store drops every handle and calls fail with
HsmUnavailableError until a reconnect (library re-initialise, login, rescan) succeeds. A failed GCM
tag check raises the same PKCS#11 error class as a broken token, so a decrypt failure is classified
by probing the token right after it: token fine means the wrapped key is bad.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11.exceptions import (
    NoSuchKey,
    NoSuchToken,
    ObjectHandleInvalid,
    PinIncorrect,
    PKCS11Error,
    UserAlreadyLoggedIn,
)

from keybroker.adapters.kek_objects import (
    ModuleCapabilities,
    gcm_encrypt,
    generate_kek,
    is_session_copy,
    probe_module,
    rejection,
    session_copy,
)
from keybroker.core.wrapped_key import DATA_KEY_SIZE, KeyRef, validate_key_name
from keybroker.errors import (
    ConfigurationError,
    FailedPreconditionError,
    HsmUnavailableError,
    InvalidWrappedKeyError,
    NotFoundError,
)

log = logging.getLogger(__name__)

#: Serialises every PKCS#11 call in this process (see module docstring).
PKCS11_LOCK = threading.RLock()

_LABEL_RE = re.compile(r"kek:(?P<name>[a-z0-9][a-z0-9._-]{0,63}):v(?P<version>[1-9][0-9]{0,9})")
_RECONNECT_BACKOFF = 0.5
T = TypeVar("T")


def kek_label(key: KeyRef) -> str:
    return f"kek:{key.name}:v{key.version}"


def parse_kek_label(label: str) -> KeyRef | None:
    m = _LABEL_RE.fullmatch(label)
    return KeyRef(m["name"], int(m["version"])) if m else None


# Module loading and re-initialisation are process-wide: one generation counter per module path
# lets every store in the process notice that its sessions died with a re-initialise.
_generations: dict[str, int] = {}


def _load(module: str) -> Any:
    try:
        return pkcs11.lib(module)
    except PKCS11Error as exc:
        raise ConfigurationError(
            f"[hsm] module: cannot load PKCS#11 module {module} ({type(exc).__name__}); "
            "install it (e.g. apt-get install softhsm2) or fix the path"
        ) from None


@dataclass(frozen=True, slots=True)
class HsmConfig:
    module: str
    token_label: str
    pin: str
    iv_source: str = "auto"
    """``auto`` (probe the module), ``caller`` or ``hsm`` (see kek_objects)."""

    def __repr__(self) -> str:
        return f"HsmConfig(module={self.module!r}, token_label={self.token_label!r}, pin=***)"


class Pkcs11Keks:
    """KEKs on a PKCS#11 token; implements :class:`keybroker.core.ports.KeyEncryptionKeys`."""

    def __init__(self, config: HsmConfig, *, probe_key: str | None = None) -> None:
        self._config = config
        self._probe_key = probe_key
        self._session: Any = None
        self._generation = -1
        self._handles: dict[KeyRef, Any] = {}
        self._current: dict[str, KeyRef] = {}
        self._next_attempt = 0.0
        self._listeners: list[Callable[[bool], None]] = []
        self._observer: Callable[[float, str], None] | None = None
        self._caps: ModuleCapabilities | None = None
        self._rejected: dict[str, str] = {}
        self._tested: dict[KeyRef, str | None] = {}
        """Self-test results: None passed, else why it failed (never used for wraps)."""
        self._test_listeners: list[Callable[[bool], None]] = []
        self._test_lock = threading.Lock()

    def observe(self, observer: Callable[[float, str], None]) -> None:
        """Call ``observer(seconds, operation)`` after every encrypt and decrypt (metrics)."""
        self._observer = observer

    # -- lifecycle -------------------------------------------------------------------------

    def connect(self, attempts: int = 5) -> None:
        """Log in and scan the token. Raises ConfigurationError for a wrong PIN or unknown token
        (start-up should fail fast) and HsmUnavailableError for anything else.

        An unknown token, or a module error while looking it up, opening the session, logging in
        or scanning the keys, is retried a few times (re-initialising the module each time):
        several worker processes starting at once on one SoftHSM token were seen to miss the
        token now and then, or to get CKR_GENERAL_ERROR from C_GetTokenInfo and from
        C_OpenSession/C_Login (each once in a clean-clone test run).
        """
        for attempt in range(1, attempts + 1):
            with PKCS11_LOCK:
                try:
                    self._connect()
                except (ConfigurationError, HsmUnavailableError) as exc:
                    transient = isinstance(exc, HsmUnavailableError) or (
                        exc.reason == "token_not_found"
                    )
                    if not transient or attempt == attempts:
                        raise
                    _load(self._config.module).reinitialize()
                    _generations[self._config.module] = _generations.get(self._config.module, 0) + 1
                    why = exc.reason
                else:
                    return
            log.warning("hsm: %s, retrying (%d/%d)", why, attempt, attempts)
            time.sleep(0.2 * attempt)

    def on_health_change(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    @property
    def healthy(self) -> bool:
        return self._session is not None and self._generation == _generations.get(
            self._config.module, 0
        )

    def _connect(self) -> None:
        module = self._config.module
        lib = _load(module)
        generation = _generations.setdefault(module, 0)
        if self._generation == generation:
            # We were connected in this generation and broke: only a re-initialise of the whole
            # library recovers (e.g. a vanished token directory). Every other store in the
            # process sees the generation move on and reconnects by itself.
            lib.reinitialize()
            generation = _generations[module] = generation + 1
        self._drop()
        try:
            token = lib.get_token(token_label=self._config.token_label)
        except NoSuchToken:
            raise ConfigurationError(
                f"[hsm] token_label: no token labelled {self._config.token_label!r}; "
                "initialise it (softhsm/init-token.sh) or fix the label",
                reason="token_not_found",
            ) from None
        except PKCS11Error as exc:
            log.warning("hsm: looking up the token failed: %s", type(exc).__name__)
            raise HsmUnavailableError(reason="token_lookup_failed") from None
        try:
            try:
                session = token.open(rw=True, user_pin=self._config.pin)
            except UserAlreadyLoggedIn:
                # Login is per process; another store in this process already logged in.
                session = token.open(rw=True)
        except PinIncorrect:
            raise ConfigurationError(
                "[hsm] pin_file: the PIN is incorrect for this token"
            ) from None
        except PKCS11Error as exc:
            log.warning("hsm: opening a session failed: %s", type(exc).__name__)
            raise HsmUnavailableError(reason="session_open_failed") from None
        self._session = session
        self._generation = generation
        try:
            self._scan()
            if self._caps is None:
                self._caps = probe_module(session, self._config.iv_source)
                log.info("hsm module: %s", self._caps.describe())
        except PKCS11Error as exc:
            self._drop()
            log.warning("hsm: listing the token's keys failed: %s", type(exc).__name__)
            raise HsmUnavailableError(reason="token_scan_failed") from None
        log.info("hsm connected", extra={"token_label": self._config.token_label})
        self._notify(True)

    def _drop(self) -> None:
        self._session = None
        self._handles.clear()
        self._current.clear()

    def _notify(self, healthy: bool) -> None:
        for listener in self._listeners:
            listener(healthy)

    def _mark_broken(self, why: str) -> None:
        if self._session is not None:
            log.warning("hsm unavailable: %s", why)
            self._session = None
            self._handles.clear()
            self._next_attempt = 0.0
            self._notify(False)

    @contextmanager
    def _ready(self) -> Iterator[Any]:
        """Hold the lock with a usable session, reconnecting (rate-limited) if needed."""
        with PKCS11_LOCK:
            if not self.healthy:
                now = time.monotonic()
                if now < self._next_attempt:
                    raise HsmUnavailableError
                self._next_attempt = now + _RECONNECT_BACKOFF
                try:
                    self._connect()
                except (PKCS11Error, ConfigurationError, HsmUnavailableError) as exc:
                    self._session = None
                    log.warning("hsm reconnect failed: %s", type(exc).__name__)
                    raise HsmUnavailableError from None
            yield self._session

    def check(self) -> None:
        """Probe the token (used by the health monitor). Raises HsmUnavailableError."""
        with self._ready() as session:
            try:
                self._probe(session)
            except PKCS11Error as exc:
                self._mark_broken(type(exc).__name__)
                raise HsmUnavailableError from None

    def _probe(self, session: Any) -> None:
        """Touch the token itself (not only the session): list the probe key's token objects."""
        attrs: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.TOKEN: True,
        }
        if self._probe_key is not None:
            ref = self._current.get(self._probe_key)
            if ref is None:
                raise NoSuchKey
            attrs[Attribute.LABEL] = kek_label(ref)
        found = list(session.get_objects(attrs))
        if not found:
            raise NoSuchKey

    # -- key inventory ----------------------------------------------------------------------

    def _token_keys(self, session: Any) -> Iterator[tuple[KeyRef, Any]]:
        """Every usable KEK object on the token (see :meth:`_usable`)."""
        attrs = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}
        for obj in session.get_objects(attrs):
            label = obj.label or ""
            ref = parse_kek_label(label)
            if ref is not None and self._usable(label, obj):
                yield ref, obj
            elif ref is None and label.startswith("kek:"):
                self._reject(label, "label is not kek:<name>:v<version>")

    def _usable(self, label: str, obj: Any) -> bool:
        """False (and reported once) for an object under a KEK label that fails the checks of
        :func:`~keybroker.adapters.kek_objects.rejection`: it is never used."""
        why = rejection(obj)
        if why is not None:
            self._reject(label, why)
        return why is None

    def _reject(self, label: str, why: str) -> None:
        if self._rejected.get(label) != why:
            self._rejected[label] = why
            log.error("hsm: object %r on the token is not used: %s", label, why)

    def rejected_objects(self) -> dict[str, str]:
        """Objects under ``kek:`` labels that are never used, and why (found by the scans)."""
        return dict(self._rejected)

    @property
    def capabilities(self) -> ModuleCapabilities | None:
        """What the start-up probe found (None before the first connection)."""
        return self._caps

    def _scan(self) -> None:
        current: dict[str, KeyRef] = {}
        for ref, _ in self._token_keys(self._session):
            if ref.version > current.get(ref.name, KeyRef(ref.name, 0)).version:
                current[ref.name] = ref
        self._current = current

    def versions(self, name: str) -> list[KeyRef]:
        with self._ready() as session:
            return sorted(ref for ref, _ in self._token_keys(session) if ref.name == name)

    def current(self, name: str) -> KeyRef:
        with self._ready():
            ref = self._current.get(name)
        if ref is None:
            raise NotFoundError(f"no key named {name!r}", reason="key_not_found")
        return ref

    def _handle(self, session: Any, key: KeyRef) -> Any:
        handle = self._handles.get(key)
        if handle is None:
            found = self._find(session, key)
            if len(found) != 1:
                return None
            handle = found[0]
            if self._caps is not None and self._caps.session_copies:
                handle = session_copy(handle) or handle
            self._handles[key] = handle
        return handle

    # -- crypto -----------------------------------------------------------------------------

    def random(self, size: int) -> bytes:
        with self._ready() as session:
            try:
                data: bytes = session.generate_random(size * 8)
            except PKCS11Error as exc:
                self._mark_broken(type(exc).__name__)
                raise HsmUnavailableError from None
            return data

    def encrypt(self, key: KeyRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM under ``key``: (the IV the module used, ciphertext || tag). A version
        that failed its self-test is never used."""
        failed = self._tested.get(key)
        if failed is not None:
            raise HsmUnavailableError(reason="kek_self_test_failed")
        caps = self._caps
        iv_source = caps.iv_source if caps is not None else self._config.iv_source

        def op(handle: Any) -> tuple[bytes, bytes]:
            return gcm_encrypt(handle, plaintext, aad, iv_source)

        result = self._timed("encrypt", key, op, lambda: NotFoundError(reason="key_not_found"))
        if isinstance(result, _Failed):
            self._classify_failure(result.exc)
            raise HsmUnavailableError
        return result

    def decrypt(self, key: KeyRef, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        params = pkcs11.GCMParams(nonce, aad, 128)

        def op(handle: Any) -> bytes:
            out: bytes = handle.decrypt(
                ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params
            )
            return out

        result = self._timed("decrypt", key, op, InvalidWrappedKeyError)
        if isinstance(result, _Failed):
            self._classify_failure(result.exc)
            raise InvalidWrappedKeyError from None
        return result

    def _timed(
        self, name: str, key: KeyRef, op: Callable[[Any], T], missing: Callable[[], Exception]
    ) -> T | _Failed:
        if self._observer is None:
            return self._with_key(key, op, missing=missing)
        started = time.perf_counter()
        try:
            return self._with_key(key, op, missing=missing)
        finally:
            self._observer(time.perf_counter() - started, name)

    def _with_key(
        self, key: KeyRef, op: Callable[[Any], T], *, missing: Callable[[], Exception]
    ) -> T | _Failed:
        with self._ready() as session:
            for _attempt in range(2):
                try:
                    handle = self._handle(session, key)
                    if handle is None:
                        raise missing()
                    return op(handle)
                except ObjectHandleInvalid:
                    self._handles.pop(key, None)  # destroyed or re-created: look it up again
                except PKCS11Error as exc:
                    return _Failed(exc)
            return _Failed(ObjectHandleInvalid())

    def _classify_failure(self, exc: PKCS11Error) -> None:
        """Raise HsmUnavailableError if the token is broken; return if it is healthy."""
        with PKCS11_LOCK:
            try:
                if self._session is None:
                    raise HsmUnavailableError
                self._probe(self._session)
            except PKCS11Error:
                self._mark_broken(type(exc).__name__)
                raise HsmUnavailableError from None

    # -- administration (implements keybroker.core.ports.KekAdministration) -----------------

    def versions_on_token(self) -> set[KeyRef]:
        with self._ready() as session:
            return {ref for ref, _ in self._token_keys(session)}

    def create_version(self, key: KeyRef) -> bool:
        """Generate ``key`` as a token object; False if an object with its label exists."""
        with self._ready() as session:
            if self._find(session, key):
                return False
            limited = generate_kek(session, kek_label(key))
            self._scan()
            log.info("hsm: created %s%s", kek_label(key), "" if limited else " (all mechanisms)")
        if self.self_test(key) is not None:
            self.destroy_version(key)  # ours, just made, never used: it must not linger
            raise HsmUnavailableError(reason="kek_self_test_failed")
        return True

    # -- self-test ----------------------------------------------------------------------------

    def on_self_test_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(all_passed)`` whenever a self-test result changes."""
        self._test_listeners.append(listener)

    @property
    def self_tests_passed(self) -> bool:
        return all(why is None for why in list(self._tested.values()))

    def self_test_failures(self) -> dict[KeyRef, str]:
        return {ref: why for ref, why in list(self._tested.items()) if why is not None}

    def self_test(self, key: KeyRef) -> str | None:
        """Wrap a random key under ``key`` and unwrap it again, as a real wrap would. Returns
        None if that worked, else why not (and ``key`` is never used for new wraps, and
        :attr:`self_tests_passed` is False). An unavailable HSM is not a verdict: it raises
        HsmUnavailableError and the version stays untested."""
        aad = b"keybroker self-test " + kek_label(key).encode()
        with self._test_lock:
            self._tested.pop(key, None)
        why: str | None = None
        try:
            plaintext = self.random(DATA_KEY_SIZE)
            nonce, sealed = self.encrypt(key, plaintext, aad)
            if self.decrypt(key, nonce, sealed, aad) != plaintext:
                why = "unwrap gave another key"
        except HsmUnavailableError as exc:
            if exc.reason != "hsm_no_iv":
                raise
            why = "the module returned no GCM IV"
        except InvalidWrappedKeyError:
            why = "unwrapping a fresh wrap failed (the module used another IV than it reported)"
        except NotFoundError:
            why = "no usable object on the token"
        with self._test_lock:
            was = self.self_tests_passed
            self._tested[key] = why
            now = self.self_tests_passed
        if why is not None:
            log.error(
                "hsm: KEK %s failed its self-test and is not used for new wraps: %s", key, why
            )
        if was != now:
            for listener in self._test_listeners:
                listener(now)
        return why

    def ensure_self_tested(self, keys: Iterable[KeyRef]) -> None:
        """Self-test each of ``keys`` (every version new wraps may use) not tested yet in this
        process: at start-up and after each rotation. Results for versions no longer among
        ``keys`` are dropped (they are not used for wraps any more)."""
        wanted = set(keys)
        with self._test_lock:
            was = self.self_tests_passed
            for gone in [ref for ref in self._tested if ref not in wanted]:
                del self._tested[gone]
            now = self.self_tests_passed
        if was != now:
            for listener in self._test_listeners:
                listener(now)
        for key in sorted(wanted):
            if key not in self._tested:
                try:
                    self.self_test(key)
                except HsmUnavailableError:
                    log.warning("hsm: self-test of %s postponed: HSM unavailable", key)

    def destroy_version(self, key: KeyRef) -> bool:
        """Destroy the token object of ``key`` and this process's session copy."""
        with self._ready() as session:
            self.forget(key)
            found = self._find(session, key)
            for obj in found:
                obj.destroy()
            self._scan()
            if found:
                log.info("hsm: destroyed %s", kek_label(key))
            return bool(found)

    def forget(self, key: KeyRef) -> None:
        """Drop this process's cached handle of ``key`` (e.g. once it is destroyed), destroying
        it only if it is an in-memory session copy: without C_CopyObject the cached handle is
        the token object itself, which must survive."""
        with PKCS11_LOCK:
            handle = self._handles.pop(key, None)
            if handle is not None and self.healthy and is_session_copy(handle):
                try:
                    handle.destroy()
                except PKCS11Error:
                    log.debug("hsm: session copy of %s already gone", kek_label(key))

    def _find(self, session: Any, key: KeyRef) -> list[Any]:
        """The usable token objects labelled as ``key`` (rejected ones are left out)."""
        label = kek_label(key)
        attrs = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.TOKEN: True,
            Attribute.LABEL: label,
        }
        return [obj for obj in session.get_objects(attrs) if self._usable(label, obj)]

    def create(self, name: str) -> KeyRef:
        """Create version 1 of KEK ``name`` directly on the token (offline bootstrap)."""
        validate_key_name(name)
        with self._ready() as session:
            if any(ref.name == name for ref, _ in self._token_keys(session)):
                raise FailedPreconditionError(f"key {name!r} already exists", reason="key_exists")
            ref = KeyRef(name, 1)
            self.create_version(ref)
            return ref


@dataclass(frozen=True, slots=True)
class _Failed:
    exc: PKCS11Error
