"""PKCS#11 modules initialised for threads, the gate around them, and a pool of sessions.

Locking. python-pkcs11 initialises a module with ``C_Initialize(NULL)``, which tells the module
that the application will not call it from several threads at once; SoftHSM then turns its mutexes
into no-ops and concurrent calls crash the process (SIGSEGV, heap corruption), and vendors may
assume the same. :func:`load` initialises the module itself with ``CKF_OS_LOCKING_OK`` (the module
may use the operating system's locks) through a small override of python-pkcs11's initialise step.
A module that answers ``CKR_CANT_LOCK`` is initialised with ``NULL`` instead and every call in the
process is serialised (``[hsm] locking = "global"`` forces that for any module).

The :class:`Gate` of a module: calls hold it shared, a re-initialise (finalize + initialize, which
invalidates every session of the process) holds it exclusively. For a module without OS locking
shared is exclusive: one PKCS#11 call at a time in the process, as before.

The :class:`SessionPool`: ``[hsm] sessions`` sessions of one token, logged in once (login is per
process), each lent to one thread at a time; a thread that already holds one gets the same one
again (nested calls never wait for themselves).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from pkcs11 import _pkcs11
from pkcs11 import exceptions as p11
from pkcs11.exceptions import PKCS11Error

from keybroker.errors import HsmUnavailableError

log = logging.getLogger(__name__)

Locking = Literal["os", "global"]

CKF_OS_LOCKING_OK = 0x2
_CKR_OK = 0x0
_CKR_CANT_LOCK = 0xA
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191


class _InitArgs(ctypes.Structure):
    """CK_C_INITIALIZE_ARGS: no mutex callbacks, flags, reserved."""

    _fields_ = [
        ("create_mutex", ctypes.c_void_p),
        ("destroy_mutex", ctypes.c_void_p),
        ("lock_mutex", ctypes.c_void_p),
        ("unlock_mutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("reserved", ctypes.c_void_p),
    ]


_CkFunction = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _FunctionListHead(ctypes.Structure):
    """The first members of CK_FUNCTION_LIST: version, C_Initialize, C_Finalize."""

    _fields_ = [
        ("version", ctypes.c_ubyte * 2),
        ("initialize", _CkFunction),
        ("finalize", _CkFunction),
    ]


_INIT_ERRORS: dict[int, type[PKCS11Error]] = {
    0x2: p11.HostMemory,
    0x5: p11.GeneralError,
    0x6: p11.FunctionFailed,
    0x7: p11.ArgumentsBad,
    0x30: p11.DeviceError,
    0x31: p11.DeviceMemory,
    0x32: p11.DeviceRemoved,
}


def _error(rv: int) -> PKCS11Error:
    """The python-pkcs11 exception for a C_Initialize/C_Finalize return value."""
    cls = _INIT_ERRORS.get(rv)
    return cls() if cls is not None else PKCS11Error(f"Unmapped error code {rv:#x}")


class _ThreadedLib(_pkcs11.lib):
    """python-pkcs11's ``lib`` with an initialise step that passes ``CKF_OS_LOCKING_OK``.

    ``lib.initialize`` is a Cython ``cpdef`` method, so this Python override is what the
    library's own constructor calls. python-pkcs11's ``initialized`` flag stays False (it is
    read-only from Python), so its own finalize is a no-op: this class calls C_Finalize itself.
    """

    want_os_locking: bool = True

    def _functions(self) -> _FunctionListHead:
        heads: _FunctionListHead | None = self.__dict__.get("_heads")
        if heads is None:
            dl = ctypes.CDLL(self.so)  # the module python-pkcs11 has already dlopen()ed
            pointer = ctypes.POINTER(_FunctionListHead)()
            rv = dl.C_GetFunctionList(ctypes.byref(pointer))
            if rv != _CKR_OK:
                raise _error(rv)
            heads = pointer.contents
            self.__dict__["_heads"] = heads
            self.__dict__["_dl"] = dl
        return heads

    @property
    def up(self) -> bool:
        return bool(self.__dict__.get("_up", False))

    @property
    def os_locking(self) -> bool:
        return bool(self.__dict__.get("_os_locking", False))

    def initialize(self) -> None:
        if self.up:
            return
        heads = self._functions()
        rv = _CKR_CANT_LOCK
        if type(self).want_os_locking and self.__dict__.get("_try_os", True):
            args = _InitArgs(flags=CKF_OS_LOCKING_OK)
            rv = heads.initialize(ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
            self.__dict__["_os_locking"] = rv == _CKR_OK
        if rv == _CKR_CANT_LOCK:
            # Module quirk: no OS locking here; every call in the process is serialised.
            self.__dict__["_try_os"] = False
            rv = heads.initialize(None)
            self.__dict__["_os_locking"] = False
        if rv not in (_CKR_OK, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise _error(rv)
        self.__dict__["_up"] = True

    def finalize(self) -> None:
        if self.up:
            self.__dict__["_up"] = False
            self._functions().finalize(None)

    def reinitialize(self) -> None:
        self.finalize()
        self.initialize()


class _GlobalLib(_ThreadedLib):
    want_os_locking = False


class _Reader:
    """One thread's hold on a gate (``depth`` > 0 while it is inside a call)."""

    __slots__ = ("__weakref__", "depth")

    def __init__(self) -> None:
        self.depth = 0


class Gate:
    """Shared for PKCS#11 calls, exclusive for re-initialising the module (see module docstring).

    Re-entrant in both modes for the thread that holds it; a thread holding it shared must not
    ask for it exclusively (it would wait for itself): callers check first.

    With OS locking, entering shared takes no lock (it runs on every PKCS#11 call): each thread
    marks its own :class:`_Reader` and then looks for a writer; a writer announces itself and
    then waits until no reader is marked. Under the GIL those steps are sequentially consistent,
    so either the reader sees the writer (and steps back) or the writer sees the reader (and
    waits); writers are rare (a re-initialise after an outage), so they poll.
    """

    def __init__(self, *, serial: bool) -> None:
        self.serial = serial
        self._cond = threading.Condition(threading.Lock())
        self._serial_lock = threading.RLock()
        self._writer_lock = threading.Lock()
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._writer: int | None = None
        self._writer_depth = 0
        self._writer_pending = False
        self._local = threading.local()
        self._shared = _Shared(self)

    def holds_shared(self) -> bool:
        reader: _Reader | None = getattr(self._local, "reader", None)
        return reader is not None and reader.depth > 0 and self._writer != threading.get_ident()

    def shared(self) -> AbstractContextManager[Any]:
        """Hold the gate shared (serial modules: the one process-wide lock)."""
        return self._serial_lock if self.serial else self._shared

    def _reader(self) -> _Reader:
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = _Reader()
            with self._cond:
                self._readers.add(reader)
        return reader

    def _enter_shared(self) -> None:
        reader = self._reader()
        if reader.depth or self._writer == threading.get_ident():
            reader.depth += 1
            return
        while True:
            reader.depth = 1
            if not self._writer_pending:
                return
            reader.depth = 0
            with self._cond:
                while self._writer_pending:
                    self._cond.wait()

    def _exit_shared(self) -> None:
        self._local.reader.depth -= 1

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if self.serial:
            with self._serial_lock:
                yield
            return
        me = threading.get_ident()
        if self._writer == me:
            self._writer_depth += 1
            try:
                yield
            finally:
                self._writer_depth -= 1
            return
        if self.holds_shared():
            raise RuntimeError("PKCS#11 gate: exclusive asked while holding it shared")
        with self._writer_lock:
            self._writer_pending = True
            try:
                while True:
                    with self._cond:
                        readers = list(self._readers)
                    if not any(r.depth for r in readers):
                        break
                    time.sleep(0.0005)
                self._writer, self._writer_depth = me, 1
                try:
                    yield
                finally:
                    self._writer, self._writer_depth = None, 0
            finally:
                with self._cond:
                    self._writer_pending = False
                    self._cond.notify_all()


class _Shared:
    """Gate.shared() for a module with OS locking (a class: cheaper than a generator)."""

    __slots__ = ("_gate",)

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        self._gate._enter_shared()

    def __exit__(self, *exc: object) -> None:
        self._gate._exit_shared()


@dataclass
class Module:
    """One loaded PKCS#11 module: the python-pkcs11 ``lib``, its gate and its generation (how
    many times it was re-initialised: a session opened in an older generation is dead)."""

    path: str
    lib: Any
    gate: Gate
    generation: int = 0
    os_locking: bool = False

    def reinitialize(self) -> None:
        """Finalize and initialize again (every session of the process dies). Hold ``gate``
        exclusively around this."""
        self.lib.reinitialize()
        self.generation += 1


_modules: dict[str, Module] = {}
_modules_lock = threading.Lock()


def load(path: str, locking: Locking = "os") -> Module:
    """The process's :class:`Module` for ``path``, loaded and initialised on first use.

    The locking mode is fixed by the first caller for the life of the process (a module is
    initialised once per process). Raises PKCS11Error if the module cannot be loaded.
    """
    with _modules_lock:
        module = _modules.get(path)
        if module is None:
            lib_class = _ThreadedLib if locking == "os" else _GlobalLib
            lib = lib_class(path)
            os_locking = bool(lib.os_locking)
            module = Module(path, lib, Gate(serial=not os_locking), os_locking=os_locking)
            _modules[path] = module
            # python-pkcs11's own loader must find this instance, never initialise a second one.
            import pkcs11

            pkcs11._loaded[path] = lib
            # Loaded for the life of the process: never deallocated, so never dlclose()d while a
            # daemon thread may still be inside it, and no failing __dealloc__ at interpreter
            # exit (python-pkcs11's calls a method the half-torn-down subclass no longer finds).
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(lib))
            log.info(
                "hsm: module loaded",
                extra={"pkcs11_module": path, "os_locking": os_locking},
            )
        return module


class SessionPool:
    """Sessions of one token, each lent to one thread at a time (see module docstring).

    The session that logged in is not among them (closing it would log every session out);
    :meth:`retire` replaces a lent session whose state is in doubt (e.g. a call failed between
    C_DecryptInit and C_Decrypt and the module may keep the operation active) with a new one
    from ``opener`` when it comes back; ``on_empty`` is called if none can be opened any more.
    """

    def __init__(
        self,
        sessions: list[Any],
        opener: Callable[[], Any],
        on_empty: Callable[[], None],
        wait: float = 10.0,
    ) -> None:
        self.size = len(sessions)
        self._free: deque[Any] = deque(sessions)
        self._opener = opener
        self._on_empty = on_empty
        self._wait = wait
        self._retired: set[int] = set()
        self._waiters = 0
        self._cond = threading.Condition(threading.Lock())
        self.local = threading.local()

    def borrow(self) -> _Borrow:
        """A session for this thread (the one it already holds, if any) for a ``with`` block."""
        return _Borrow(self)

    def _wait_for_session(self) -> Any:
        deadline = time.monotonic() + self._wait
        with self._cond:
            self._waiters += 1
            try:
                while True:
                    try:
                        return self._free.pop()
                    except IndexError:
                        pass
                    left = deadline - time.monotonic()
                    if not self.size or left <= 0:
                        raise HsmUnavailableError(reason="hsm_busy")
                    self._cond.wait(min(left, 0.05))  # a wake-up may race the check: poll too
            finally:
                self._waiters -= 1

    def _give_back(self, session: Any) -> None:
        if self._retired and id(session) in self._retired:
            self._retired.discard(id(session))
            session = self._renew(session)
        if session is not None:
            self._free.append(session)
        if self._waiters:
            with self._cond:
                self._cond.notify()

    def retire(self, session: Any) -> None:
        """Replace ``session`` (lent to this thread) when it is returned."""
        self._retired.add(id(session))

    def _renew(self, old: Any) -> Any:
        with contextlib.suppress(PKCS11Error):
            old.close()
        try:
            return self._opener()
        except PKCS11Error as exc:
            log.warning("hsm: opening a replacement session failed: %s", type(exc).__name__)
        with self._cond:
            self.size -= 1
            empty = not self.size
        if empty:
            self._on_empty()
        return None


class _Borrow:
    """SessionPool.borrow(): lends a free session (no lock on the fast path: deque.pop and
    append are atomic), or the one this thread already holds."""

    __slots__ = ("_pool", "_session")

    def __init__(self, pool: SessionPool) -> None:
        self._pool = pool
        self._session: Any = None

    def __enter__(self) -> Any:
        pool = self._pool
        held = getattr(pool.local, "session", None)
        if held is not None:
            return held
        try:
            session = pool._free.pop()
        except IndexError:
            session = pool._wait_for_session()
        pool.local.session = self._session = session
        return session

    def __exit__(self, *exc: object) -> None:
        session = self._session
        if session is not None:
            self._pool.local.session = None
            self._pool._give_back(session)
