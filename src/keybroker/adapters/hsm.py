"""PKCS#11 key-encryption keys (python-pkcs11), safe under concurrency and self-healing.

Concurrency (:mod:`keybroker.adapters.hsm_sessions`): the module is initialised with OS locking
(``CKF_OS_LOCKING_OK``) where it allows it, and calls run on a small pool of sessions
(``[hsm] sessions``), one thread per session at a time. A module that cannot lock, or
``[hsm] locking = "global"``, gets the old arrangement: every PKCS#11 call in the process runs
under one lock (python-pkcs11's ``C_Initialize(NULL)`` lets SoftHSM crash under concurrent calls).

KEKs are token objects labelled ``kek:<name>:v<version>`` (AES-256, private, sensitive, never
extractable, not modifiable, AES-GCM only where the module allows; see
:mod:`keybroker.adapters.kek_objects`). An object under such a label that was not generated in
the HSM as a never-extractable AES-256 key is reported and never used. Where the module supports
``C_CopyObject`` (probed at start), each version used is copied once per session into an
in-memory session object (``CKA_TOKEN=false``; it stays sensitive and non-extractable) for speed;
elsewhere the token object's handle is used directly. Handles are cached either way.

GCM IVs: :func:`~keybroker.adapters.kek_objects.probe_module` finds at start whether the module
keeps a caller's IV, overwrites it or refuses it (``[hsm] iv_source`` overrides), and every
encryption reads back the IV the module actually used. Every KEK version is checked with a
wrap -> unwrap self-test before it is used for new wraps (:meth:`Pkcs11Keks.self_test`).

Errors: every PKCS#11 exception goes through one table,
:mod:`keybroker.adapters.pkcs11_errors`, which says what it means (token lost, stale handle,
busy, refused, ...) and which domain error the caller gets.

Failure and recovery: a background probe (:meth:`Pkcs11Keks.check`) looks the default key up on the
token; if the token, session or login is gone, the store drops every session and calls fail with
HsmUnavailableError until a reconnect succeeds. Every reconnect attempt after a failure
re-initialises the module (finalize + initialize): only that makes a module see a token that came
back (e.g. SoftHSM after its token directory was emptied and refilled). A failed GCM tag check
raises the same PKCS#11 error class as a broken token (SoftHSM), so a decrypt failure is
classified by retrying once and probing the token: the token fine and the failure repeated means
the wrapped key is bad; anything else is the HSM's (UNAVAILABLE, retried by clients).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import NoSuchKey, PKCS11Error

from keybroker.adapters import hsm_sessions
from keybroker.adapters.hsm_sessions import Locking, SessionPool
from keybroker.adapters.kek_objects import (
    ModuleCapabilities,
    gcm_encrypt,
    generate_kek,
    is_session_copy,
    probe_module,
    rejection,
    session_copy,
)
from keybroker.adapters.pkcs11_errors import Fault, domain_error, fault_of
from keybroker.core.wrapped_key import DATA_KEY_SIZE, NONCE_SIZE, KeyRef, validate_key_name
from keybroker.errors import (
    ConfigurationError,
    FailedPreconditionError,
    HsmUnavailableError,
    InvalidWrappedKeyError,
    KeybrokerError,
    KeyStateStaleError,
    NotFoundError,
)

log = logging.getLogger(__name__)

_LABEL_RE = re.compile(r"kek:(?P<name>[a-z0-9][a-z0-9._-]{0,63}):v(?P<version>[1-9][0-9]{0,9})")
_RECONNECT_BACKOFF = 0.5
#: GCM IVs drawn from the HSM's generator with one C_GenerateRandom (modules that keep the
#: caller's IV): one PKCS#11 call per this many encryptions instead of one each.
IV_RESERVE = 64
T = TypeVar("T")


#: Attempts at creating a KEK version when the module fails ambiguously or refuses the template
#: and made nothing.
CREATE_ATTEMPTS = 3
#: Looks at a KEK object just made before it is called unusable (see create_version).
SETTLE_LOOKS = 5
#: Attempts at destroying a KEK version when a call fails and the token stays reachable.
DESTROY_ATTEMPTS = 3
#: Times a listing of token objects is started again when an object vanishes while it is read.
SCAN_ATTEMPTS = 5


def token_objects(
    session: Any, attrs: dict[Attribute, Any], keep: Callable[[Any], T | None]
) -> list[T]:
    """``keep(obj)`` of every object matching ``attrs``, leaving out None. Another process (a
    replica destroying a version, an administrator) may destroy an object between the search
    finding it and its attributes being read: the module then answers ObjectHandleInvalid
    (SoftHSM did in about one listing in ten while another process created and destroyed keys).
    That is no fault of the token: the listing starts again, up to :data:`SCAN_ATTEMPTS` times.
    The search is closed on every path, so the session is free for the next one."""
    for attempt in range(1, SCAN_ATTEMPTS + 1):
        try:
            with closing(session.get_objects(attrs)) as found:
                return [item for obj in found if (item := keep(obj)) is not None]
        except PKCS11Error as exc:
            if fault_of(exc) is not Fault.STALE_HANDLE or attempt == SCAN_ATTEMPTS:
                raise
            log.debug("hsm: an object vanished while the token was listed; listing again")
    raise AssertionError("unreachable")  # pragma: no cover


def _labelled(key: KeyRef) -> dict[Attribute, Any]:
    """The search template of the token objects labelled as ``key``."""
    return {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.TOKEN: True,
        Attribute.LABEL: kek_label(key),
    }


def _destroy_each(objects: list[Any]) -> None:
    """Destroy each of ``objects``; one gone already (destroyed by another process, or the same
    object listed twice, see Pkcs11Keks._one_key, and destroyed through its first handle) is
    no failure."""
    for obj in objects:
        try:
            obj.destroy()
        except PKCS11Error as exc:
            if fault_of(exc) is not Fault.STALE_HANDLE:
                raise


def kek_label(key: KeyRef) -> str:
    return f"kek:{key.name}:v{key.version}"


def parse_kek_label(label: str) -> KeyRef | None:
    m = _LABEL_RE.fullmatch(label)
    return KeyRef(m["name"], int(m["version"])) if m else None


# Module loading and re-initialisation are process-wide (hsm_sessions.Module): its generation
# counter lets every store in the process notice that its sessions died with a re-initialise.
_locking: dict[str, Locking] = {}


def _module(module: str) -> hsm_sessions.Module:
    try:
        return hsm_sessions.load(module, _locking.get(module, "os"))
    except PKCS11Error as exc:
        raise ConfigurationError(
            f"[hsm] module: cannot load PKCS#11 module {module} ({type(exc).__name__}); "
            "install it (e.g. apt-get install softhsm2) or fix the path"
        ) from None


def _load(module: str) -> Any:
    """The python-pkcs11 ``lib`` of ``module`` (tests wrap this to inject faults)."""
    return _module(module).lib


@dataclass(frozen=True, slots=True)
class HsmConfig:
    module: str
    token_label: str
    pin: str
    iv_source: str = "auto"
    """``auto`` (probe the module), ``caller`` or ``hsm`` (see kek_objects)."""
    sessions: int = 4
    """Sessions in the pool (one when the module is serialised)."""
    locking: Locking = "os"

    def __repr__(self) -> str:
        return (
            f"HsmConfig(module={self.module!r}, token_label={self.token_label!r}, pin=***, "
            f"sessions={self.sessions}, locking={self.locking!r}, iv_source={self.iv_source!r})"
        )


class Pkcs11Keks:
    """KEKs on a PKCS#11 token; implements :class:`keybroker.core.ports.KeyEncryptionKeys`."""

    def __init__(self, config: HsmConfig, *, probe_key: str | None = None) -> None:
        self._config = config
        self._probe_key = probe_key
        _locking.setdefault(config.module, config.locking)
        self._pool: SessionPool | None = None
        self._login: Any = None
        self._mod: hsm_sessions.Module | None = None
        self._generation = -1
        self._handles: dict[tuple[int, KeyRef], Any] = {}
        self._ivs: dict[int, bytearray] = {}
        """Per session: random bytes from the HSM not yet used as IVs (see :meth:`_fresh_iv`)."""
        self._current: dict[str, KeyRef] = {}
        self._next_attempt = 0.0
        self._listeners: list[Callable[[bool], None]] = []
        self._observer: Callable[[float, str], None] | None = None
        self._caps: ModuleCapabilities | None = None
        self._rejected: dict[str, str] = {}
        self._rejected_lock = threading.Lock()
        self._conflicts: dict[str, str] = {}
        """Labels under which the token holds several different keys (never used)."""
        self._tested: dict[KeyRef, str | None] = {}
        """Self-test results: None passed, else why it failed (never used for wraps)."""
        self._test_listeners: list[Callable[[bool], None]] = []
        self._test_lock = threading.Lock()

    def observe(self, observer: Callable[[float, str], None]) -> None:
        """Call ``observer(seconds, operation)`` after every encrypt and decrypt (metrics)."""
        self._observer = observer

    # -- lifecycle -------------------------------------------------------------------------

    def _module(self) -> hsm_sessions.Module:
        mod = self._mod
        if mod is None:
            mod = self._mod = _module(self._config.module)
        return mod

    @property
    def os_locking(self) -> bool:
        """True when the module runs with OS locking and calls share a pool of sessions."""
        return self._module().os_locking

    def connect(self, attempts: int = 5) -> None:
        """Log in and scan the token. Raises ConfigurationError for a wrong PIN or unknown token
        (start-up should fail fast) and HsmUnavailableError for anything else.

        An unknown token, or a module error while looking it up, opening the session, logging in
        or scanning the keys, is retried a few times (re-initialising the module each time):
        several worker processes starting at once on one SoftHSM token were seen to miss the
        token now and then, or to get CKR_GENERAL_ERROR from C_GetTokenInfo and from
        C_OpenSession/C_Login (each once in a clean-clone test run).
        """
        module = self._module()
        for attempt in range(1, attempts + 1):
            with module.gate.exclusive():
                try:
                    self._connect(starting=True)
                except (ConfigurationError, HsmUnavailableError) as exc:
                    transient = isinstance(exc, HsmUnavailableError) or (
                        exc.reason == "token_not_found"
                    )
                    if not transient or attempt == attempts:
                        raise
                    why = exc.reason
                else:
                    return
            log.warning("hsm: %s, retrying (%d/%d)", why, attempt, attempts)
            time.sleep(0.2 * attempt)

    def require_mechanisms(self) -> None:
        """Fail the start if the token lacks a mechanism the broker needs (CKM_AES_GCM for both
        encrypt and decrypt): ConfigurationError naming it, before health says SERVING.
        (openCryptoki 3.8's software token, for one, has no AES-GCM.)"""
        with self._calls() as session:
            mechanisms = set(session.token.slot.get_mechanisms())
            if Mechanism.AES_GCM in mechanisms:
                info = session.token.slot.get_mechanism_info(Mechanism.AES_GCM)
                if MechanismFlag.ENCRYPT in info.flags and MechanismFlag.DECRYPT in info.flags:
                    return
        raise ConfigurationError(
            f"[hsm] module: token {self._config.token_label!r} does not offer CKM_AES_GCM "
            "encrypt/decrypt, which every wrapped key needs; use a module and token that do "
            "(see docs/HSM.md)",
            reason="hsm_mechanism_missing",
        )

    def on_health_change(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    @property
    def healthy(self) -> bool:
        return (
            self._pool is not None
            and self._mod is not None
            and self._generation == self._mod.generation
        )

    def _connect(self, *, starting: bool = False) -> None:
        """Open the pool and scan the token. Hold the module's gate exclusively."""
        module = self._module()
        lib = _load(self._config.module)
        if self._generation == module.generation:
            # We were connected in this generation and broke, or an attempt in it failed: only a
            # re-initialise of the whole library recovers (a vanished token directory; a token
            # that came back, which SoftHSM only sees after C_Initialize). Every other store in
            # the process sees the generation move on and reconnects by itself.
            try:
                lib.reinitialize()
            except PKCS11Error as exc:  # e.g. SoftHSM while its token directory is missing
                log.warning("hsm: re-initialising the module failed: %s", type(exc).__name__)
                raise domain_error(exc, reason="module_init_failed") from None
            finally:
                module.generation += 1  # every session of the process is gone either way
                self._generation = module.generation
        self._drop()
        # From here this generation is ours: if anything below fails, the next attempt
        # re-initialises again (it once did not, and a token that came back was never seen).
        self._generation = module.generation
        label = self._config.token_label if starting else None
        try:
            token = lib.get_token(token_label=self._config.token_label)
        except PKCS11Error as exc:
            log.warning("hsm: looking up the token failed: %s", type(exc).__name__)
            raise domain_error(exc, starting_label=label, reason="token_lookup_failed") from None
        size = self._config.sessions if module.os_locking else 1
        sessions: list[Any] = []
        try:
            try:
                login = token.open(rw=True, user_pin=self._config.pin)
            except PKCS11Error as exc:
                if fault_of(exc) is not Fault.LOGGED_IN:
                    raise
                # Login is per process; another store in this process already logged in.
                login = token.open(rw=True)
            while len(sessions) < size:
                sessions.append(token.open(rw=True))
        except PKCS11Error as exc:
            log.warning("hsm: opening a session failed: %s", type(exc).__name__)
            raise domain_error(exc, starting_label=label, reason="session_open_failed") from None
        # The session that logged in is kept out of the pool: closing it logs every session out.
        self._login = login
        self._pool = SessionPool(
            sessions,
            opener=lambda: token.open(rw=True),
            on_empty=lambda: self._mark_broken("no session left"),
        )
        try:
            self._scan(login)
            if self._caps is None:
                self._caps = probe_module(login, self._config.iv_source)
                log.info("hsm module: %s", self._caps.describe())
        except PKCS11Error as exc:
            self._drop()
            log.warning("hsm: listing the token's keys failed: %s", type(exc).__name__)
            raise domain_error(exc, reason="token_scan_failed") from None
        log.info(
            "hsm connected",
            extra={
                "token_label": self._config.token_label,
                "sessions": len(sessions),
                "os_locking": module.os_locking,
            },
        )
        self._notify(True)

    def _drop(self) -> None:
        self._pool = None
        self._login = None
        self._handles.clear()
        self._ivs.clear()
        self._current.clear()

    def _notify(self, healthy: bool) -> None:
        for listener in self._listeners:
            listener(healthy)

    def _mark_broken(self, why: str) -> None:
        if self._pool is not None:
            log.warning("hsm unavailable: %s", why)
            self._pool = None
            self._handles.clear()
            self._ivs.clear()
            self._next_attempt = 0.0
            self._notify(False)

    def _reconnect(self) -> None:
        """Reconnect (rate-limited) unless another thread already did."""
        module = self._module()
        with module.gate.exclusive():
            if self.healthy:
                return
            now = time.monotonic()
            if now < self._next_attempt:
                raise HsmUnavailableError
            self._next_attempt = now + _RECONNECT_BACKOFF
            try:
                self._connect()
            except KeybrokerError as exc:
                self._pool = None
                log.warning("hsm reconnect failed: %s (%s)", type(exc).__name__, exc.reason)
                raise HsmUnavailableError from None

    @contextmanager
    def _ready(self) -> Iterator[Any]:
        """A usable session, lent to this thread, with the module's gate held shared;
        reconnects (rate-limited) first if needed."""
        module = self._mod
        if module is None or self._pool is None or self._generation != module.generation:
            module = self._module()
            if not module.gate.holds_shared():
                self._reconnect()
        with module.gate.shared():
            pool = self._pool
            if pool is None or self._generation != module.generation:
                raise HsmUnavailableError
            with pool.borrow() as session:
                yield session

    @contextmanager
    def _calls(self) -> Iterator[Any]:
        """:meth:`_ready`, and every PKCS#11 error inside goes through :meth:`_failure`."""
        with self._ready() as session:
            try:
                yield session
            except PKCS11Error as exc:
                raise self._failure(session, exc) from None

    def _failure(self, session: Any, exc: PKCS11Error) -> KeybrokerError:
        """Act on ``exc`` as the error table says and return the caller's domain error."""
        fault = fault_of(exc)
        if fault is Fault.LOST:
            self._mark_broken(type(exc).__name__)
        elif fault in (Fault.AMBIGUOUS, Fault.BAD_DATA, Fault.MODULE):
            if self._probe_or_mark_broken(session, exc):
                self._retire(session)
        elif fault in (Fault.BUSY, Fault.REFUSED):
            if fault is Fault.REFUSED:
                log.error("hsm: the module refused a call: %s", type(exc).__name__)
            self._retire(session)
        return domain_error(exc)

    def _retire(self, session: Any) -> None:
        """A call failed mid-operation: the module may keep the operation active on this
        session (the next C_*Init would answer CKR_OPERATION_ACTIVE), so replace it."""
        pool = self._pool
        if pool is not None:
            pool.retire(session)
        for cached in [k for k in self._handles if k[0] == id(session)]:
            self._handles.pop(cached, None)
        self._ivs.pop(id(session), None)

    def _probe_or_mark_broken(self, session: Any, exc: PKCS11Error) -> bool:
        """Probe the token after ``exc``; False (and marked broken) if the probe fails too."""
        try:
            self._probe(session)
        except PKCS11Error:
            self._mark_broken(type(exc).__name__)
            return False
        return True

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
        if not token_objects(session, attrs, lambda obj: obj):
            raise NoSuchKey

    # -- key inventory ----------------------------------------------------------------------

    def _token_keys(self, session: Any) -> list[tuple[KeyRef, Any]]:
        """Every usable KEK object on the token (see :meth:`_note_rejections`)."""
        rejected: dict[str, str] = {}

        def kek(obj: Any) -> tuple[KeyRef, Any] | None:
            label = obj.label or ""
            ref = parse_kek_label(label)
            if ref is None:
                if label.startswith("kek:"):
                    rejected[label] = "label is not kek:<name>:v<version>"
                return None
            why = rejection(obj)
            if why is not None:
                rejected[label] = why
                return None
            return ref, obj

        attrs = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}
        found = token_objects(session, attrs, kek)
        self._note_rejections(rejected)
        return found

    def _note_rejections(self, seen: dict[str, str], label: str | None = None) -> None:
        """Record the objects under KEK labels that a listing found failing the checks of
        :func:`~keybroker.adapters.kek_objects.rejection` (never used): those of the whole token
        (``label`` None) or of one label. The latest listing decides. A planted object fails
        every listing and stays reported; an object another process was creating at that moment
        passes the next one and is no longer reported (module quirk, SoftHSM's file store: an
        object is written attribute by attribute, and another process may read it half-written,
        without CKA_LOCAL yet)."""
        with self._rejected_lock:
            before = self._rejected
            if label is None:
                now = dict(seen)
            else:
                now = {k: v for k, v in before.items() if k != label} | seen
            self._rejected = now
        for each, why in sorted(seen.items()):
            if before.get(each) != why:
                log.error("hsm: object %r on the token is not used: %s", each, why)

    def rejected_objects(self) -> dict[str, str]:
        """Objects under ``kek:`` labels that are never used, and why (found by the scans), and
        labels under which the token holds several different keys (see :meth:`_one_key`)."""
        return self._rejected | self._conflicts

    @property
    def capabilities(self) -> ModuleCapabilities | None:
        """What the start-up probe found (None before the first connection)."""
        return self._caps

    def _scan(self, session: Any) -> None:
        current: dict[str, KeyRef] = {}
        for ref, _ in self._token_keys(session):
            if ref.version > current.get(ref.name, KeyRef(ref.name, 0)).version:
                current[ref.name] = ref
        self._current = current

    def versions(self, name: str) -> list[KeyRef]:
        with self._calls() as session:
            return sorted(ref for ref, _ in self._token_keys(session) if ref.name == name)

    def current(self, name: str) -> KeyRef:
        with self._ready():
            ref = self._current.get(name)
        if ref is None:
            raise NotFoundError(f"no key named {name!r}", reason="key_not_found")
        return ref

    def _handle(self, session: Any, key: KeyRef) -> Any:
        """The cached handle of ``key`` for ``session`` (a key object belongs to one session)."""
        handle = self._handles.get((id(session), key))
        if handle is None:
            found = self._find(session, key)
            if not found:
                return None
            try:
                handle = found[0] if len(found) == 1 else self._one_key(session, key, found)
            except PKCS11Error as exc:  # the check's own failure: the HSM's, never the blob's
                raise self._failure(session, exc) from None
            if handle is None:
                return None
            if self._caps is not None and self._caps.session_copies:
                handle = session_copy(handle) or handle
            self._handles[(id(session), key)] = handle
        return handle

    def _one_key(self, session: Any, key: KeyRef, found: list[Any]) -> Any | None:
        """The first of ``found`` (several usable objects under ``key``'s label) if they are
        all one key; None if they are different keys, which are then never used (which one
        would the other replicas use?) and are reported like a rejected object.

        Module quirk (SoftHSM's file store): an object one thread creates while another thread
        of the process re-reads the token directory (because another process wrote to it) is
        listed twice from then on, under two handles of one key, until the process ends. Seen in
        about one creation in fifty with two processes creating keys. They are one key when a
        random key wrapped under the first unwraps under each of the others (the same check as
        :meth:`self_test`; an object's value can never be read)."""
        label = kek_label(key)
        iv_source = self._caps.iv_source if self._caps is not None else self._config.iv_source
        plaintext = session.generate_random(DATA_KEY_SIZE * 8)
        aad = b"keybroker same-key check " + label.encode()
        nonce, sealed = gcm_encrypt(
            found[0], plaintext, aad, iv_source, lambda: self._fresh_iv(session)
        )
        params = pkcs11.GCMParams(nonce, aad, 128)
        same = True
        for other in found[1:]:
            try:
                opened = other.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            except PKCS11Error as exc:
                if fault_of(exc) not in (Fault.AMBIGUOUS, Fault.BAD_DATA):
                    raise
                opened = None
            same = same and opened == plaintext
        with self._rejected_lock:
            was = self._conflicts.pop(label, None)
            if not same:
                self._conflicts[label] = f"{len(found)} different keys under one label"
        if not same:
            if was is None:
                log.error("hsm: %d different keys labelled %r: none is used", len(found), label)
            return None
        log.debug("hsm: the module lists %s %d times; it is one key", label, len(found))
        return found[0]

    # -- crypto -----------------------------------------------------------------------------

    def random(self, size: int) -> bytes:
        with self._ready() as session:
            try:
                data: bytes = session.generate_random(size * 8)
            except PKCS11Error as exc:
                raise self._failure(session, exc) from None
            return data

    def _fresh_iv(self, session: Any) -> bytes:
        """A GCM IV from the HSM's generator, never handed out before.

        IVs are drawn :data:`IV_RESERVE` at a time on ``session`` and kept per session; a
        session is lent to one thread at a time (hsm_sessions), so its reserve is too, and each
        12-byte slice is removed as it is handed out. Random bytes are not secret, and a slice is
        as random as a 12-byte draw; the reserve only saves PKCS#11 calls (and the GIL hand-offs
        around them). It is dropped with the session (retired, reconnected)."""
        reserve = self._ivs.get(id(session))
        if not reserve:
            reserve = bytearray(session.generate_random(NONCE_SIZE * IV_RESERVE * 8))
            self._ivs[id(session)] = reserve
        iv = bytes(reserve[-NONCE_SIZE:])
        del reserve[-NONCE_SIZE:]
        return iv

    def encrypt(self, key: KeyRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM under ``key``: (the IV the module used, ciphertext || tag). A version
        that failed its self-test is never used."""
        failed_test = self._tested.get(key)
        if failed_test is not None:
            raise HsmUnavailableError(reason="kek_self_test_failed")
        caps = self._caps
        iv_source = caps.iv_source if caps is not None else self._config.iv_source

        def op(handle: Any) -> tuple[bytes, bytes]:
            session = handle.session
            return gcm_encrypt(handle, plaintext, aad, iv_source, lambda: self._fresh_iv(session))

        def failed(session: Any, _handle: Any, exc: PKCS11Error) -> tuple[bytes, bytes]:
            raise self._failure(session, exc)

        return self._timed(
            "encrypt", key, op, lambda: NotFoundError(reason="key_not_found"), failed
        )

    def decrypt(self, key: KeyRef, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        params = pkcs11.GCMParams(nonce, aad, 128)

        def op(handle: Any) -> bytes:
            out: bytes = handle.decrypt(
                ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params
            )
            return out

        def failed(session: Any, handle: Any, exc: PKCS11Error) -> bytes:
            return self._decrypt_failed(session, exc, None if handle is None else (op, handle))

        # No object for a version the catalog has let through: the token and the catalog
        # disagree for now (made or destroyed a moment ago elsewhere). Never the blob's fault.
        return self._timed("decrypt", key, op, KeyStateStaleError, failed)

    def _decrypt_failed(
        self, session: Any, exc: PKCS11Error, again: tuple[Callable[[Any], bytes], Any] | None
    ) -> bytes:
        """Tell a wrapped key that fails its tag check from an HSM that failed.

        Only a BAD_DATA or AMBIGUOUS fault can be the wrapped key's. ``CKR_GENERAL_ERROR`` is
        also what a hiccup of the module looks like, so that one is retried once: a tag failure
        fails again. Then the token is probed: broken means UNAVAILABLE; healthy means the
        wrapped key is invalid. Every other fault is the HSM's (UNAVAILABLE, never blamed on
        the blob, never counted as tampering).
        """
        fault = fault_of(exc)
        # Module quirk (SoftHSM): a failed tag check is CKR_GENERAL_ERROR, like a hiccup.
        if fault is Fault.AMBIGUOUS and again is not None:
            op, handle = again
            try:
                return op(handle)
            except PKCS11Error as second:
                exc, fault = second, fault_of(second)
        if fault not in (Fault.AMBIGUOUS, Fault.BAD_DATA):
            raise self._failure(session, exc)
        if not self._probe_or_mark_broken(session, exc):
            raise HsmUnavailableError
        raise domain_error(exc, tag_failure=True)

    def _timed(
        self,
        name: str,
        key: KeyRef,
        op: Callable[[Any], T],
        missing: Callable[[], Exception],
        failed: Callable[[Any, Any, PKCS11Error], T],
    ) -> T:
        if self._observer is None:
            return self._with_key(key, op, missing, failed)
        started = time.perf_counter()
        try:
            return self._with_key(key, op, missing, failed)
        finally:
            self._observer(time.perf_counter() - started, name)

    def _with_key(
        self,
        key: KeyRef,
        op: Callable[[Any], T],
        missing: Callable[[], Exception],
        failed: Callable[[Any, Any, PKCS11Error], T],
    ) -> T:
        """``op(handle)`` on a session; a stale handle is looked up once more, any other
        PKCS#11 error goes to ``failed(session, handle or None, exc)``."""
        with self._ready() as session:
            handle = None
            for attempt in range(2):
                try:
                    handle = self._handle(session, key)
                    if handle is None:
                        raise missing()
                    return op(handle)
                except PKCS11Error as exc:
                    if fault_of(exc) is Fault.STALE_HANDLE and attempt == 0:
                        # destroyed or re-created: look it up again
                        self._handles.pop((id(session), key), None)
                        continue
                    return failed(session, handle, exc)
            raise AssertionError("unreachable")  # pragma: no cover

    # -- administration (implements keybroker.core.ports.KekAdministration) -----------------

    def versions_on_token(self) -> set[KeyRef]:
        with self._calls() as session:
            return {ref for ref, _ in self._token_keys(session)}

    def create_version(self, key: KeyRef) -> bool:
        """Generate ``key`` as a token object; False if an object with its label exists.

        The caller has claimed the version (PENDING in the key store): no other process makes
        or uses an object under its label until it is activated, so whatever is under the label
        is ours to destroy when it cannot be used.

        Module quirk (SoftHSM's file store, two replicas rotating at once): now and then the
        process that had just made a key read it back half-written (no CKA_LOCAL yet, so it
        failed the adoption checks), and the rotation failed with UNAVAILABLE. A fresh key is
        looked at again for a moment (:meth:`_usable_soon`); if it still cannot be used, it is
        destroyed and made again, up to :data:`CREATE_ATTEMPTS` times."""
        with self._calls() as session:
            if self._find(session, key):
                return False
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            with self._calls() as session:
                limited = self._generate(session, key)
                self._scan(session)
            log.info("hsm: created %s%s", kek_label(key), "" if limited else " (all mechanisms)")
            if self._usable_soon(key):
                break
            self._purge(key)
            if attempt == CREATE_ATTEMPTS:
                raise HsmUnavailableError(reason="kek_self_test_failed")
            log.warning("hsm: %s read back unusable; destroyed, making it again", kek_label(key))
        if self.self_test(key) is not None:
            self._purge(key)  # ours, just made, never used: it must not linger
            raise HsmUnavailableError(reason="kek_self_test_failed")
        return True

    def _usable_soon(self, key: KeyRef) -> bool:
        """Whether a usable object of ``key`` is on the token, looking up to
        :data:`SETTLE_LOOKS` times over about a quarter of a second."""
        for look in range(1, SETTLE_LOOKS + 1):
            with self._calls() as session:
                if self._find(session, key):
                    return True
            if look < SETTLE_LOOKS:
                time.sleep(0.025 * look)
        return False

    def _purge(self, key: KeyRef) -> None:
        """Destroy every object labelled as ``key``, usable or not: only for a version this
        process has just made (see :meth:`create_version`)."""
        self.forget(key)
        with self._calls() as session:
            found = token_objects(session, _labelled(key), lambda obj: obj)
            _destroy_each(found)
            self._note_rejections({}, kek_label(key))
            self._scan(session)
        if found:
            log.info("hsm: destroyed every object labelled %s", kek_label(key))

    def _generate(self, session: Any, key: KeyRef) -> bool:
        """:func:`generate_kek`, started again when the module fails ambiguously or refuses the
        template and made nothing: SoftHSM answered CKR_GENERAL_ERROR to about one C_GenerateKey
        in a hundred, and now and then CKR_TEMPLATE_INCONSISTENT, while another process created
        objects on the same token (two replicas rotating at once). The template is the broker's
        own and fixed: a module that really refuses it refuses every attempt."""
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            try:
                return generate_kek(session, kek_label(key))
            except PKCS11Error as exc:
                if (
                    fault_of(exc) not in (Fault.AMBIGUOUS, Fault.REFUSED)
                    or attempt == CREATE_ATTEMPTS
                    or self._find(session, key)  # it was made after all: not ours to repeat
                ):
                    raise
                log.warning(
                    "hsm: creating %s failed (%s), nothing was made; trying again",
                    kek_label(key),
                    type(exc).__name__,
                )
                time.sleep(0.05 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

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
        """Destroy the token object of ``key`` and this process's session copies."""
        self.forget(key)
        destroyed = False
        for attempt in range(1, DESTROY_ATTEMPTS + 1):
            try:
                with self._calls() as session:
                    found = self._find(session, key)
                    _destroy_each(found)
                    destroyed = destroyed or bool(found)
                    self._scan(session)
                break
            except HsmUnavailableError:
                # Module quirk (SoftHSM's file store): a call failed while another process
                # wrote to the token (seen once in a clean-clone suite run). Destroying is
                # idempotent: look again, unless the token itself is gone.
                if attempt == DESTROY_ATTEMPTS or not self.healthy:
                    raise
                log.warning("hsm: destroying %s failed; trying again", kek_label(key))
                time.sleep(0.05 * attempt)
        if destroyed:
            log.info("hsm: destroyed %s", kek_label(key))
        return destroyed

    def forget(self, key: KeyRef) -> None:
        """Drop this process's cached handles of ``key`` (e.g. once it is destroyed), destroying
        only in-memory session copies: without C_CopyObject a cached handle is the token object
        itself, which must survive. Takes the module's gate exclusively: a copy belongs to a
        session another thread may be using."""
        with self._module().gate.exclusive():
            for cached in [k for k in self._handles if k[1] == key]:
                handle = self._handles.pop(cached, None)
                if handle is not None and self.healthy and is_session_copy(handle):
                    try:
                        handle.destroy()
                    except PKCS11Error:
                        log.debug("hsm: session copy of %s already gone", kek_label(key))

    def _find(self, session: Any, key: KeyRef) -> list[Any]:
        """The usable token objects labelled as ``key`` (rejected ones are left out)."""
        label = kek_label(key)
        rejected: dict[str, str] = {}

        def usable(obj: Any) -> Any | None:
            why = rejection(obj)
            if why is not None:
                rejected[label] = why
                return None
            return obj

        found = token_objects(session, _labelled(key), usable)
        self._note_rejections(rejected, label)
        return found

    def create(self, name: str) -> KeyRef:
        """Create version 1 of KEK ``name`` directly on the token (offline bootstrap)."""
        validate_key_name(name)
        with self._calls() as session:
            if any(ref.name == name for ref, _ in self._token_keys(session)):
                raise FailedPreconditionError(f"key {name!r} already exists", reason="key_exists")
            ref = KeyRef(name, 1)
            self.create_version(ref)
            return ref
