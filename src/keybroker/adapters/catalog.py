"""The data plane's in-memory view of key metadata, and usage counters flushed in aggregate.

Hot path: :meth:`CachedCatalog.snapshot` is an attribute read and :meth:`CachedCatalog.count`
one dict update under a lock: no database round trip per call.

Freshness: a background thread compares the store's ``generation`` every ``refresh_interval``
seconds and reloads when it moved. On PostgreSQL a ``LISTEN keybroker_keys`` connection wakes it
as soon as another replica commits a change, so the usual delay is milliseconds and the bound is
``refresh_interval`` (plus one reload) even if notifications are lost. If the store cannot be
reached the last snapshot stays in force and the loop keeps retrying.

Misses: a wrapped key may name a version this replica has not loaded yet (another replica or
worker process made it a moment ago). :meth:`CachedCatalog.fresh_snapshot` then reloads at once,
on the calling thread, so the verdict on that blob rests on a snapshot read *after* the blob
existed. Forced reloads are rate-limited by a token bucket per process (a burst of
``MISS_REFRESH_BURST``, then ``MISS_REFRESH_RATE`` a second; callers arriving while one runs
share it), so a flood of blobs naming unknown keys costs the store a bounded number of cheap
``generation`` reads. A caller that cannot have a fresh snapshot gets
:class:`~keybroker.errors.KeyStateStaleError` (UNAVAILABLE, retryable), never "invalid".

Usage: wraps and unwraps per version are summed in memory and added to the store every
``usage_flush_interval`` seconds and at shutdown (a failed flush is kept and retried).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from keybroker.adapters.keystore import SqlKeyStore
from keybroker.adapters.sqldb import NOTIFY_CHANNEL
from keybroker.core.keys import KeySnapshot
from keybroker.core.ports import Usage
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import KeybrokerError, KeyStateStaleError

log = logging.getLogger(__name__)

ChangeListener = Callable[[KeySnapshot, KeySnapshot], None]

#: Forced reloads on a miss: a burst of this many, then this many a second, per process.
MISS_REFRESH_BURST = 100
MISS_REFRESH_RATE = 20.0
#: Longest a caller waits for a reload another thread is running before it answers UNAVAILABLE.
MISS_REFRESH_WAIT = 0.5


class CachedCatalog:
    """Implements :class:`keybroker.core.ports.KeyCatalog` over a :class:`SqlKeyStore`."""

    def __init__(
        self,
        store: SqlKeyStore,
        *,
        refresh_interval: float = 0.5,
        usage_flush_interval: float = 5.0,
        listen: Callable[[], Any] | None = None,
        tick: Callable[[], None] | None = None,
        tick_interval: float = 10.0,
        miss_refresh_burst: int = MISS_REFRESH_BURST,
        miss_refresh_rate: float = MISS_REFRESH_RATE,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        """``heartbeat`` is called on every turn of the background loop and after each of its
        steps (the broker's liveness)."""
        self._store = store
        self._heartbeat = heartbeat or (lambda: None)
        self._refresh_interval = refresh_interval
        self._flush_interval = usage_flush_interval
        self._listen = listen
        self._tick = tick
        self._tick_interval = tick_interval
        self._snapshot = KeySnapshot()
        self._refresh_lock = threading.Lock()
        self._read_at = float("-inf")  # monotonic time the last good reload began its read
        self._miss_burst = float(miss_refresh_burst)
        self._miss_rate = miss_refresh_rate
        self._miss_tokens = float(miss_refresh_burst)
        self._miss_filled = time.monotonic()
        self._usage: dict[KeyRef, Usage] = {}
        self._usage_lock = threading.Lock()
        self._listeners: list[ChangeListener] = []
        self._refreshers: list[Callable[[], object]] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- hot path ----------------------------------------------------------------------------

    def snapshot(self) -> KeySnapshot:
        return self._snapshot

    def count(self, key: KeyRef, *, wraps: int = 0, unwraps: int = 0) -> None:
        now = time.time()
        with self._usage_lock:
            old = self._usage.get(key)
            if old is None:
                self._usage[key] = Usage(wraps, unwraps, now)
            else:
                self._usage[key] = Usage(old.wraps + wraps, old.unwraps + unwraps, now)

    # -- freshness ---------------------------------------------------------------------------

    def on_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def also_refresh(self, refresher: Callable[[], object]) -> None:
        """Run ``refresher`` after every refresh of the key metadata (same wake-ups)."""
        self._refreshers.append(refresher)

    def staleness(self) -> float:
        """Seconds since the last successful read of the key metadata began (a gauge)."""
        read_at = self._read_at
        return time.monotonic() - read_at if read_at != float("-inf") else 0.0

    def refresh(self, *, force: bool = False) -> bool:
        """Reload if the store's generation moved; True if the snapshot changed."""
        with self._refresh_lock:
            return self._refresh(force)

    def _refresh(self, force: bool) -> bool:
        started = time.monotonic()
        generation = self._store.generation()
        if not force and generation == self._snapshot.generation:
            self._read_at = started  # confirmed current as of ``started``
            return False
        keys = self._store.list_keys()
        old, new = self._snapshot, KeySnapshot.of(generation, {k.name: k for k in keys})
        self._snapshot = new
        self._read_at = started
        for listener in self._listeners:
            listener(old, new)
        return True

    def fresh_snapshot(self) -> KeySnapshot:
        """A snapshot whose read began after this call: for a blob naming a version the current
        snapshot does not know (see the module docstring). Raises KeyStateStaleError when none
        can be had now (rate limit, store unreachable, a reload elsewhere taking too long)."""
        asked = time.monotonic()
        if not self._refresh_lock.acquire(timeout=MISS_REFRESH_WAIT):
            raise KeyStateStaleError
        try:
            if self._read_at >= asked:  # a reload that began after we asked has finished
                return self._snapshot
            now = time.monotonic()
            self._miss_tokens = min(
                self._miss_burst, self._miss_tokens + (now - self._miss_filled) * self._miss_rate
            )
            self._miss_filled = now
            if self._miss_tokens < 1:
                raise KeyStateStaleError
            self._miss_tokens -= 1
            try:
                self._refresh(False)
            except Exception as exc:  # noqa: BLE001 - no fresh state: no verdict either
                log.warning("key catalog reload on a miss failed: %s", type(exc).__name__)
                raise KeyStateStaleError from None
            return self._snapshot
        finally:
            self._refresh_lock.release()

    def flush_usage(self) -> None:
        with self._usage_lock:
            pending, self._usage = self._usage, {}
        if not pending:
            return
        try:
            self._store.add_usage(pending)
        except Exception:
            with self._usage_lock:  # keep the counts for the next attempt
                for ref, use in pending.items():
                    old = self._usage.get(ref, Usage())
                    self._usage[ref] = Usage(
                        old.wraps + use.wraps,
                        old.unwraps + use.unwraps,
                        max(old.last_used_at, use.last_used_at),
                    )
            raise

    # -- background --------------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._loop, name="kb-catalog", daemon=True)]
        if self._listen is not None:
            self._threads.append(
                threading.Thread(target=self._listen_loop, name="kb-catalog-listen", daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(5)
        try:
            self.flush_usage()
        except Exception as exc:  # noqa: BLE001 - shutting down: say the counts are lost
            log.warning("usage counts not flushed at shutdown: %s", type(exc).__name__)

    def _loop(self) -> None:
        next_flush = time.monotonic() + self._flush_interval
        next_tick = time.monotonic() + self._tick_interval
        while not self._stopping.is_set():
            self._heartbeat()
            self._wake.wait(self._refresh_interval)
            self._wake.clear()
            if self._stopping.is_set():
                return
            self._step("refresh", self.refresh)
            for refresher in self._refreshers:
                self._step("refresh", refresher)
            now = time.monotonic()
            if now >= next_flush:
                next_flush = now + self._flush_interval
                self._step("usage flush", self.flush_usage)
            if self._tick is not None and now >= next_tick:
                next_tick = now + self._tick_interval
                self._step("lifecycle tick", self._tick)

    def _step(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except KeybrokerError as exc:
            log.warning("key catalog %s failed: %s", what, exc.reason)
        except Exception:
            log.exception("key catalog %s failed", what)
        self._heartbeat()

    def _listen_loop(self) -> None:
        """PostgreSQL: wake the refresh loop on NOTIFY; reconnect with a pause on failure."""
        if self._listen is None:
            return
        while not self._stopping.is_set():
            conn = None
            try:
                conn = self._listen()
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self._wake.set()  # catch up on anything missed while disconnected
                while not self._stopping.is_set():
                    for _ in conn.notifies(timeout=1.0, stop_after=1):
                        self._wake.set()
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect after a pause
                log.warning("key change listener: %s; retrying", type(exc).__name__)
                self._stopping.wait(1.0)
            finally:
                if conn is not None:
                    conn.close()
