"""The hot path's privacy state: erasure tombstones in memory, checked in O(1) on every unwrap.

Tombstones are kept as 64-bit keyed BLAKE2b digests (key random per process, so nobody can aim
identifiers at one hash bucket) in :class:`DigestSet`, an open-addressing table in one
``array('Q')`` at most 70 % full: 11 to 23 bytes per erased identifier (10 million:
134 MB), against ~80 bytes in a Python ``set``. A digest collision would refuse an innocent
key with probability about n / 2^64 (10 million erasures: ~5e-13 per unwrap); it can never let
an erased one through.

Freshness is fail-closed: every refresh (see :class:`~keybroker.adapters.catalog.CachedCatalog`)
loads the erasures committed since the last one, and acknowledges the generation it now enforces
in ``kb_replicas``. If a replica could not refresh for ``max_staleness`` seconds, it refuses
unwraps (UNAVAILABLE) rather than risk serving an erased key. An erasure call therefore returns
once every replica that may still be serving has acknowledged it: a replica that has not
acknowledged anything for longer than it may serve on stale state is refusing anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence

from keybroker.adapters.privacystore import SqlPrivacyStore
from keybroker.core.privacy import Erasure, RecordingEntry, Target
from keybroker.errors import AlreadyExistsError, UnavailableError

log = logging.getLogger(__name__)

_MAX_LOAD = 0.7
_LOAD_BATCH = 200_000
_MAX_BUFFER = 1_000_000
_GROW_AT = 0.5  # the refresh grows the registered-id table past this, off the data plane
_HEARTBEAT = 1.0  # seconds between acknowledgements when nothing changed (liveness)
_CLOCK_SKEW = 1.0  # margin for wall clocks of replicas on different hosts (their acks' times)


class DigestSet:
    """A set of non-zero 64-bit integers in one flat array (linear probing, no deletion)."""

    def __init__(self, capacity: int = 1024) -> None:
        size = 1024
        while size * _MAX_LOAD < capacity:
            size *= 2
        self._table = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, value: int) -> bool:
        table, mask = self._table, self._mask
        i = value & mask
        while True:
            found = table[i]
            if found == value:
                return True
            if found == 0:
                return False
            i = (i + 1) & mask

    def add(self, value: int) -> None:
        if (self._count + 1) > (self._mask + 1) * _MAX_LOAD:
            self._grow()
        table, mask = self._table, self._mask
        i = value & mask
        while True:
            found = table[i]
            if found == value:
                return
            if found == 0:
                table[i] = value
                self._count += 1
                return
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self._table
        size = len(old) * 2
        self._table = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._count = 0
        for value in old:
            if value:
                self.add(value)

    @property
    def memory_bytes(self) -> int:
        return self._table.itemsize * len(self._table)

    @property
    def load(self) -> float:
        """How full the table is (it doubles itself past ``_MAX_LOAD``)."""
        return self._count / len(self._table)

    def values(self) -> Iterator[int]:
        """The members (safe while another thread adds: a concurrent add may be missed)."""
        return (value for value in self._table if value)


class PrivacyCache:
    """Implements :class:`keybroker.core.privacy.PrivacyView`."""

    def __init__(
        self,
        store: SqlPrivacyStore,
        *,
        max_staleness: float = 5.0,
        refresh_interval: float = 0.5,
        clock: Callable[[], float] = time.time,
        on_conflict: Callable[[str], object] | None = None,
    ) -> None:
        """``on_conflict(recording_id)``: records a registration the registry refused because
        another replica registered the same id a moment before (the audit journal)."""
        self._on_conflict = on_conflict
        self._store = store
        self._max_staleness = max_staleness
        self._refresh_interval = refresh_interval
        self._clock = clock
        self._key = os.urandom(16)
        self._recordings = DigestSet()
        self._subjects = DigestSet()
        self._registered = DigestSet()
        self._registered_meanwhile: list[int] | None = None  # adds during a background regrow
        self._key_seq = -1  # registry keys loaded (kb_recording_keys.seq); -1: not yet
        self._held: frozenset[int] = frozenset()
        self._withdrawn: frozenset[int] = frozenset()
        # purpose changes this replica made, by the generation they committed: merged into any
        # reload that may have read the store before them (never a window of serving them)
        self._local_purpose_changes: list[tuple[int, frozenset[int], frozenset[int]]] = []
        self._last_seq = 0
        self._generation = -1
        self._last_ok = time.monotonic()
        self._last_ack = 0.0
        self._healthy = True
        self._listeners: list[Callable[[bool], None]] = []
        self._lock = threading.Lock()
        self._buffer: list[RecordingEntry] = []
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"

    @property
    def store(self) -> SqlPrivacyStore:
        return self._store

    # -- hot path ----------------------------------------------------------------------------

    def _digest(self, tag: bytes, identifier: str) -> int:
        raw = hashlib.blake2b(tag + identifier.encode(), digest_size=8, key=self._key).digest()
        return int.from_bytes(raw, "big") or 1

    @property
    def serving_window(self) -> float:
        """Seconds after its last acknowledgement during which a replica may still serve."""
        return self._max_staleness + _HEARTBEAT + _CLOCK_SKEW + self._refresh_interval

    def staleness(self) -> float:
        """Seconds since the erasure and hold state was last read successfully (a gauge)."""
        return time.monotonic() - self._last_ok

    def require_current(self) -> None:
        if self._max_staleness and time.monotonic() - self._last_ok > self._max_staleness:
            raise UnavailableError(
                "privacy state could not be refreshed; retry later", reason="privacy_state_stale"
            )

    # -- health ------------------------------------------------------------------------------

    def on_health_change(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    def _set_health(self, ok: bool) -> None:
        if ok != self._healthy:
            self._healthy = ok
            (log.info if ok else log.error)(
                "privacy state %s", "current again" if ok else "stale: refusing unwraps"
            )
            for listener in self._listeners:
                listener(ok)

    def check(self) -> None:
        """Health probe: NOT_SERVING while the erasure list is too old to trust."""
        try:
            self.require_current()
        except UnavailableError:
            self._set_health(False)
            raise
        self._set_health(True)

    def is_erased(self, recording_id: str, subject_ids: Sequence[str]) -> bool:
        if self._digest(b"r\0", recording_id) in self._recordings:
            return True
        return any(self._digest(b"s\0", s) in self._subjects for s in subject_ids)

    def is_held(self, recording_id: str, subject_ids: Sequence[str]) -> bool:
        held = self._held
        if not held:
            return False
        if self._digest(b"r\0", recording_id) in held:
            return True
        return any(self._digest(b"s\0", s) in held for s in subject_ids)

    def _purpose_digest(self, recording_id: str, purpose: str) -> int:
        return self._digest(b"p\0" + purpose.encode() + b"\0", recording_id)

    def is_withdrawn(self, recording_id: str, purpose: str) -> bool:
        withdrawn = self._withdrawn
        return bool(withdrawn) and self._purpose_digest(recording_id, purpose) in withdrawn

    def change_purposes(
        self,
        recording_id: str,
        *,
        withdrawn: Sequence[str],
        restored: Sequence[str],
        reason: str,
        by: str,
    ) -> None:
        self._store.change_purposes(
            recording_id,
            withdrawn=withdrawn,
            restored=restored,
            reason=reason,
            by=by,
            now=self._clock(),
        )
        generation = self._store.generation()
        change = (
            generation,
            frozenset(self._purpose_digest(recording_id, p) for p in withdrawn),
            frozenset(self._purpose_digest(recording_id, p) for p in restored),
        )
        with self._lock:
            self._local_purpose_changes.append(change)
            self._withdrawn = self._with_local_changes(self._withdrawn)
        self.wait_for_replicas(generation)

    def _with_local_changes(self, withdrawn: frozenset[int]) -> frozenset[int]:
        """``withdrawn`` with this replica's own recent changes applied in order (lock held)."""
        current = set(withdrawn)
        for _generation, added, lifted in self._local_purpose_changes:
            current -= lifted
            current |= added
        return frozenset(current)

    def hold_copies(self, recording_id: str) -> Sequence[bytes]:
        return self._store.hold_copies(recording_id)

    def issued(self, recording_id: str, wrapped_key: bytes) -> bool:
        return any(
            hmac.compare_digest(kept, wrapped_key)
            for kept in self._store.wrapped_keys(recording_id)
        )

    def require_unregistered(self, recording_id: str) -> None:
        if self._digest(b"g\0", recording_id) in self._registered:
            raise _already_registered()

    def register(self, entry: RecordingEntry) -> None:
        digest = self._digest(b"g\0", entry.recording_id)
        with self._lock:
            if not entry.amendment:
                if digest in self._registered:
                    raise _already_registered()
                self._registered.add(digest)
                if self._registered_meanwhile is not None:
                    self._registered_meanwhile.append(digest)
            if len(self._buffer) >= _MAX_BUFFER:
                log.error("recording registry buffer full: the store is unreachable")
                return
            self._buffer.append(entry)

    # -- erasure -----------------------------------------------------------------------------

    def _remember(self, kind: Target, target: str) -> None:
        if kind is Target.RECORDING:
            self._recordings.add(self._digest(b"r\0", target))
        else:
            self._subjects.add(self._digest(b"s\0", target))

    def erased_locally(self, erasure: Erasure) -> None:
        with self._lock:
            self._remember(erasure.kind, erasure.target)
        self.wait_for_replicas(self._store.generation())

    def wait_for_replicas(self, generation: int) -> bool:
        """Until every replica that may still be serving enforces ``generation`` (True).

        A replica may serve for ``max_staleness`` after its last successful refresh, and it
        acknowledges at least every ``_HEARTBEAT`` while it refreshes; so one whose last
        acknowledgement is older than :meth:`serving_window` (plus a margin for clock skew between
        hosts) is refusing unwraps by its own staleness rule, and is no longer waited for. A
        stalled replica (paused, partitioned from the store) therefore delays an erasure by at most
        that window, and never lets an erased key out after the call returns.
        """
        window = self.serving_window
        deadline = time.monotonic() + window
        while True:
            lagging = [
                r
                for r in self._store.lagging_replicas(generation, self._clock() - window)
                if r != self.replica_id
            ]
            if not lagging:
                return True
            if time.monotonic() >= deadline:
                log.warning(
                    "privacy change: replicas %s did not confirm in time", ", ".join(lagging)
                )
                return False
            time.sleep(0.02)

    # -- background --------------------------------------------------------------------------

    def refresh(self) -> None:
        """Load new erasures, flush the registry buffer, acknowledge (from the catalog's loop).

        The state is as current as the moment its read began, not the moment the refresh
        returned: a replica paused in the middle (SIGSTOP, a frozen VM) must not count state
        read before the pause as fresh when it resumes (it once served a key erased meanwhile)."""
        began = time.monotonic()
        generation = self._store.generation()
        if generation != self._generation:
            if self._generation < 0:  # first load: size the tables once
                counts = self._store.erasure_counts()
                self._recordings = DigestSet(counts.get(Target.RECORDING.value, 0))
                self._subjects = DigestSet(counts.get(Target.SUBJECT.value, 0))
            self._load_erasures()
            self._held = frozenset(
                self._digest(b"r\0" if h.kind is Target.RECORDING else b"s\0", h.target)
                for h in self._store.holds()
            )
            loaded = frozenset(
                self._purpose_digest(recording_id, purpose)
                for recording_id, purpose in self._store.purpose_withdrawals()
            )
            with self._lock:
                self._local_purpose_changes = [
                    c for c in self._local_purpose_changes if c[0] > generation
                ]
                self._withdrawn = self._with_local_changes(loaded)
        self._load_registrations()
        self.flush_registry()
        now = time.monotonic()
        if generation != self._generation or now - self._last_ack >= _HEARTBEAT:
            self._store.acknowledge(self.replica_id, generation, self._clock())
            self._last_ack = now
        self._generation = generation
        self._last_ok = began
        self._set_health(True)

    def _load_erasures(self) -> None:
        digest, key = hashlib.blake2b, self._key
        recordings, subjects = self._recordings, self._subjects
        while True:
            batch = self._store.erasure_targets_since(self._last_seq, _LOAD_BATCH)
            with self._lock:
                for seq, kind, target in batch:
                    if kind == Target.RECORDING.value:
                        raw = digest(b"r\0" + target.encode(), digest_size=8, key=key).digest()
                        recordings.add(int.from_bytes(raw, "big") or 1)
                    else:
                        raw = digest(b"s\0" + target.encode(), digest_size=8, key=key).digest()
                        subjects.add(int.from_bytes(raw, "big") or 1)
                    self._last_seq = seq
            if len(batch) < _LOAD_BATCH:
                return

    def _load_registrations(self) -> None:
        """Recording ids registered (by any replica) since the last refresh, into the set
        GenerateDataKey checks; the first time, every id in the registry."""
        store, key, registered = self._store, self._key, self._registered
        digest = hashlib.blake2b
        if self._key_seq < 0:
            last = store.last_key_seq()  # first: what later loads start from, then the ids
            after: str | None = None
            while True:
                ids = store.registered_ids(after, _LOAD_BATCH)
                with self._lock:
                    for recording_id in ids:
                        raw = digest(b"g\0" + recording_id.encode(), digest_size=8, key=key)
                        registered.add(int.from_bytes(raw.digest(), "big") or 1)
                if len(ids) < _LOAD_BATCH:
                    break
                after = ids[-1]
            self._key_seq = last
        while True:
            batch = store.registrations_since(self._key_seq, _LOAD_BATCH)
            with self._lock:
                for seq, recording_id in batch:
                    raw = digest(b"g\0" + recording_id.encode(), digest_size=8, key=key)
                    registered.add(int.from_bytes(raw.digest(), "big") or 1)
                    self._key_seq = seq
            if len(batch) < _LOAD_BATCH:
                break
        self._grow_registered()

    def _grow_registered(self) -> None:
        """Double the registered-id table here, on the refresh thread, before it fills up: if
        GenerateDataKey's own add had to grow it, the data-plane loop would rehash every
        registered id (seconds at millions) while holding the cache lock."""
        if self._registered.load < _GROW_AT:
            return
        with self._lock:
            current, self._registered_meanwhile = self._registered, []
        grown = DigestSet(2 * len(current))
        for value in current.values():
            grown.add(value)
        with self._lock:
            for value in self._registered_meanwhile or ():
                grown.add(value)
            self._registered, self._registered_meanwhile = grown, None

    def flush_registry(self) -> None:
        with self._lock:
            pending, self._buffer = self._buffer, []
        try:
            conflicts = self._store.register(pending)
        except Exception:  # keep the entries for the next attempt, then re-raise
            with self._lock:
                self._buffer[:0] = pending
            raise
        if conflicts:
            log.warning(
                "recording registry: %d registration(s) of an id another replica registered "
                "at the same moment; the first registration stands, every wrapped key is kept",
                len(conflicts),
            )
        if self._on_conflict is not None:
            for recording_id in conflicts:
                self._report_conflict(self._on_conflict, recording_id)

    @staticmethod
    def _report_conflict(report: Callable[[str], object], recording_id: str) -> None:
        try:
            report(recording_id)
        except Exception as exc:  # noqa: BLE001 - committed already; the log line stays
            log.error("registry conflict not recorded: %s", type(exc).__name__)  # noqa: TRY400

    def close(self) -> None:
        try:
            self.flush_registry()
            self._store.forget_replica(self.replica_id)
        except Exception as exc:  # noqa: BLE001 - shutting down: say what is lost
            log.warning("privacy state not flushed at shutdown: %s", type(exc).__name__)
        finally:
            self._store.close()

    @property
    def registered_count(self) -> int:
        return len(self._registered)

    @property
    def erased_count(self) -> int:
        return len(self._recordings) + len(self._subjects)


def _already_registered() -> AlreadyExistsError:
    return AlreadyExistsError(
        "recording id is already registered; use a new id (AmendPurposes changes purposes)",
        reason="recording_registered",
    )
