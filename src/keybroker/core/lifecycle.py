"""KEK lifecycle: create, rotate, retire, disable, schedule and carry out destruction, reconcile.

Every change that touches both the HSM and the metadata store is ordered so a crash between the
two steps leaves a state :meth:`KeyLifecycle.reconcile` can finish:

- rotation: claim the next number as PENDING in the store -> create the HSM object -> record ->
  activate (PENDING -> ENABLED, current = max). A PENDING row older than ``reconcile_after`` is
  activated if its HSM object exists, dropped otherwise.
- destruction: claim (SCHEDULED -> DESTROYING, one replica wins) -> record -> destroy the HSM
  object -> DESTROYED. A DESTROYING row older than ``reconcile_after`` is finished.
- an HSM object without metadata (and passing the adoption checks of the HSM adapter) is
  adopted as ENABLED but never made current for a key that has a current version: that takes
  :meth:`KeyLifecycle.make_current` (KeyAdmin ``EnableKeyVersion`` with ``make_current``). Only a
  key nobody knew gets its highest version current (the first start after ``kek create
  --offline``).

Events no caller asked for (scheduled rotations and destructions, reconciliation) are recorded
as decisions of service ``keybroker.v1.KeyAdmin`` with subject ``keybroker:scheduler``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import overload

from keybroker.core.decision import Decision, Outcome
from keybroker.core.keys import (
    DEFAULT_ROTATE_AFTER_WRAPS,
    MAX_ROTATE_AFTER_WRAPS,
    KeyInfo,
    VersionState,
    require_transition,
)
from keybroker.core.ports import Clock, KekAdministration, KeyStore
from keybroker.core.retention import is_retention_key
from keybroker.core.wrapped_key import KeyRef, validate_key_name
from keybroker.errors import (
    FailedPreconditionError,
    InvalidRequestError,
    KeybrokerError,
    NotFoundError,
)

log = logging.getLogger(__name__)

ADMIN_SERVICE = "keybroker.v1.KeyAdmin"
#: Reason of the event recorded for an object under a KEK label that is never used.
REJECTED_OBJECT = "hsm_object_rejected"
SCHEDULER_SUBJECT = "keybroker:scheduler"
MIN_ROTATION_PERIOD = 3600
MAX_ROTATION_PERIOD = 100 * 366 * 86400
"""A century: beyond it a period means "never" and only overflows storage (use 0 for none)."""
MAX_DESTRUCTION_WINDOW = MAX_ROTATION_PERIOD
S = VersionState
#: Claims every live version of a key for destruction: the versions won, or None for "not now".
ShredClaim = Callable[[str, float], "list[int] | None"]


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    destruction_window: int = 7 * 86400
    """Default wait between scheduling a destruction and carrying it out."""
    min_destruction_window: int = 86400
    """No destruction may be scheduled sooner than this."""
    reconcile_after: float = 60.0
    """A PENDING or DESTROYING version this old was left by a crash and is finished."""


class KeyLifecycle:
    """Lifecycle use cases over the store and the HSM. Authorization is the caller's job."""

    def __init__(
        self,
        store: KeyStore,
        hsm: KekAdministration,
        *,
        clock: Clock,
        config: LifecycleConfig,
        record_event: Callable[[Decision], object],
        after_change: Callable[[], object] | None = None,
        held_under: Callable[[str, int | None], int] | None = None,
    ) -> None:
        """``held_under(name, version)``: how many held recordings a version (None: any
        version) of a key still wraps (see :meth:`require_not_held`)."""
        self._held_under = held_under
        self._after_change = after_change
        self._store = store
        self._hsm = hsm
        self._clock = clock
        self._c = config
        self._record = record_event

    def _changed(self) -> None:
        """Let this replica see its own change at once (others follow within the staleness
        bound). Never fails the change itself."""
        if self._after_change is not None:
            try:
                self._after_change()
            except Exception:  # noqa: BLE001 - the change is committed; the cache catches up
                log.warning("key metadata changed but the local cache could not reload yet")

    # -- reads -------------------------------------------------------------------------------

    def get(self, name: str) -> KeyInfo:
        key = self._store.key(validate_key_name(name))
        if key is None:
            raise NotFoundError(f"no key named {name!r}", reason="key_not_found")
        return key

    def list(self) -> list[KeyInfo]:
        return self._store.list_keys()

    def require_not_held(self, name: str, version: int | None, change: str) -> None:
        """Refuse (FAILED_PRECONDITION ``legal_hold``) a change that would destroy, or start
        the destruction of, a version that still wraps recordings under legal hold. For a
        retention-epoch or hold key every version counts while any of its recordings is held
        (a held recording's blob may have been rewrapped to any of them)."""
        if self._held_under is None:
            return
        held = self._holds_on(validate_key_name(name), version)
        if held:
            what = f"version {version} of {name!r}" if version else f"key {name!r}"
            raise FailedPreconditionError(
                f"{what} still wraps {held} key(s) of recordings under legal hold; "
                f"it cannot be {change} until the holds are released",
                reason="legal_hold",
            )

    def _holds_on(self, name: str, version: int | None) -> int:
        if self._held_under is None:
            return 0
        return self._held_under(name, None if is_retention_key(name) else version)

    # -- creation and rotation ---------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        rotation_period: int | None = None,
        rotate_after_wraps: int | None = None,
    ) -> KeyInfo:
        validate_key_name(name)
        _check_policy(rotation_period, rotate_after_wraps)
        created = self._store.create_key(
            name,
            self._clock(),
            rotation_period=rotation_period,
            rotate_after_wraps=rotate_after_wraps or DEFAULT_ROTATE_AFTER_WRAPS,
        )
        if not created:
            raise FailedPreconditionError(f"key {name!r} already exists", reason="key_exists")
        self._materialise(KeyRef(name, 1))
        self._changed()
        return self.get(name)

    def rotate(self, name: str, *, expected_current: int | None = None) -> KeyRef | None:
        """Make a new current version. With ``expected_current``, only if the current version
        is still that one (None otherwise: another replica rotated first)."""
        key = self.get(name)
        if key.current_version == 0:
            raise FailedPreconditionError(
                f"key {name!r} is still being created", reason="key_pending"
            )
        version = self._store.claim_version(name, self._clock(), expected_current)
        if version is None:
            return None
        ref = KeyRef(name, version)
        self._materialise(ref)
        self._changed()
        return ref

    def _materialise(self, ref: KeyRef, on_created: Callable[[], object] | None = None) -> None:
        """HSM object for a claimed PENDING version, then activate it (see module docstring)."""
        try:
            if not self._hsm.create_version(ref):
                log.warning("hsm object for %s already existed; adopting it", ref)
        except BaseException:
            self._store.drop_pending(ref.name, ref.version)
            raise
        if on_created is not None:
            on_created()  # if this fails the PENDING row stays: reconcile() activates it
        self._store.activate_version(ref.name, ref.version, self._clock())

    def make_current(self, name: str, version: int) -> KeyInfo:
        """Make a newer version (e.g. one adopted from the HSM token) current, after checking
        that its HSM object is usable and passes a wrap/unwrap self-test."""
        key = self.get(name)
        found = key.version(version)
        if found is None or found.state not in (S.ENABLED, S.DECRYPT_ONLY, S.DISABLED):
            raise NotFoundError(
                f"key {name!r} has no live version {version}", reason="key_version_not_found"
            )
        if version <= key.current_version:
            raise FailedPreconditionError(
                f"only a version newer than the current version {key.current_version} can be "
                "made current; rotate the key instead",
                reason="key_version_not_newer",
            )
        ref = KeyRef(name, version)
        if ref not in self._hsm.versions_on_token():
            raise FailedPreconditionError(
                f"version {version} has no usable HSM object", reason="hsm_object_missing"
            )
        why = self._hsm.self_test(ref)
        if why is not None:
            raise FailedPreconditionError(
                f"version {version} failed its self-test: {why}", reason="kek_self_test_failed"
            )
        if not self._store.make_current(name, version, self._clock()):
            raise FailedPreconditionError(
                f"version {version} of {name!r} changed concurrently; read it again",
                reason="concurrent_change",
            )
        self._changed()
        return self.get(name)

    # -- policy and states -------------------------------------------------------------------

    def set_policy(
        self,
        name: str,
        *,
        rotation_period: int | None,
        rotate_after_wraps: int | None,
        min_decryption_version: int | None,
    ) -> KeyInfo:
        """Change what is given (``rotation_period=0`` turns scheduled rotation off)."""
        key = self.get(name)
        period = key.rotation_period if rotation_period is None else (rotation_period or None)
        wraps = rotate_after_wraps or key.rotate_after_wraps
        _check_policy(period, wraps)
        minimum = key.min_decryption_version
        if min_decryption_version is not None:
            if not 1 <= min_decryption_version <= key.current_version:
                raise InvalidRequestError(
                    f"min_decryption_version must be 1..{key.current_version} "
                    "(the current version)",
                    reason="bad_min_decryption_version",
                )
            minimum = min_decryption_version
        self._store.set_policy(
            name, rotation_period=period, rotate_after_wraps=wraps, min_decryption_version=minimum
        )
        self._changed()
        return self.get(name)

    def set_state(self, name: str, version: int, target: VersionState) -> KeyInfo:
        """ENABLED, DECRYPT_ONLY or DISABLED (destruction has its own methods)."""
        if target not in (S.ENABLED, S.DECRYPT_ONLY, S.DISABLED):
            raise InvalidRequestError("state must be enabled, decrypt_only or disabled")
        key = self.get(name)
        found = require_transition(key, version, target)
        if found.state is S.SCHEDULED_FOR_DESTRUCTION and target is not S.DISABLED:
            raise FailedPreconditionError(
                f"version {version} is scheduled for destruction; cancel the destruction first",
                reason="key_version_state",
            )
        self._move(key, version, found.state, target)
        return self.get(name)

    def schedule_destruction(self, name: str, version: int, window: int | None = None) -> float:
        """Schedule the HSM object's destruction; returns when it will happen (Unix seconds)."""
        wait = self._c.destruction_window if window is None else window
        if wait < self._c.min_destruction_window:
            raise InvalidRequestError(
                f"the destruction window must be at least {self._c.min_destruction_window} s",
                reason="destruction_window_too_short",
            )
        if wait > MAX_DESTRUCTION_WINDOW:  # the date must fit a protobuf Timestamp and the store
            raise InvalidRequestError(
                f"the destruction window must be at most {MAX_DESTRUCTION_WINDOW} s (a century)"
            )
        key = self.get(name)
        found = require_transition(key, version, S.SCHEDULED_FOR_DESTRUCTION)
        if found.state is S.SCHEDULED_FOR_DESTRUCTION:
            raise FailedPreconditionError(
                f"version {version} is already scheduled for destruction",
                reason="key_version_state",
            )
        destroy_after = self._clock() + wait
        self._move(key, version, found.state, S.SCHEDULED_FOR_DESTRUCTION, destroy_after)
        return destroy_after

    def cancel_destruction(self, name: str, version: int) -> KeyInfo:
        """Back to DISABLED: an administrator enables it deliberately afterwards."""
        key = self.get(name)
        found = key.version(version)
        if found is None or found.state is not S.SCHEDULED_FOR_DESTRUCTION:
            raise FailedPreconditionError(
                f"version {version} of {name!r} is not scheduled for destruction",
                reason="key_version_state",
            )
        self._move(key, version, found.state, S.DISABLED)
        return self.get(name)

    def _move(
        self,
        key: KeyInfo,
        version: int,
        expected: VersionState,
        target: VersionState,
        destroy_after: float | None = None,
    ) -> None:
        if expected is target:
            return
        moved = self._store.set_state(
            key.name,
            version,
            expected=expected,
            new=target,
            now=self._clock(),
            destroy_after=destroy_after,
        )
        if not moved:
            raise FailedPreconditionError(
                f"version {version} of {key.name!r} changed concurrently; read it again",
                reason="concurrent_change",
            )
        self._changed()

    # -- what nobody asked for: schedules and crash repair --------------------------------------

    def run_due(self) -> int:
        """Scheduled rotations, wrap-count rotations and due destructions. Returns events done."""
        done = 0
        now = self._clock()
        for key in self._store.list_keys():
            current = key.current
            if current is None:
                continue
            reason = None
            if key.rotation_period and now - current.created_at >= key.rotation_period:
                reason = "rotation_period_elapsed"
            elif current.wraps >= key.rotate_after_wraps:
                reason = "wrap_limit_reached"
            if reason is not None:
                done += self._scheduled_rotation(key, reason)
        for ref in self._store.due_destructions(now):
            if self._holds_on(ref.name, ref.version):
                log.warning("destruction of %s postponed: it wraps held recordings", ref)
                continue
            if self._store.claim_destruction(ref.name, ref.version, now):
                self._event("ScheduledDestruction", ref, "destruction_window_elapsed")
                self._destroy(ref)
                done += 1
        if done:
            self._changed()
        return done

    def ensure_key(self, name: str, reason: str) -> None:
        """Create ``name`` unless it exists (e.g. a retention epoch key on first use); recorded.
        Waits briefly if another replica is creating it at the same moment."""
        try:
            self.create(name)
        except FailedPreconditionError as exc:
            if exc.reason != "key_exists":
                raise
        else:
            self._event("CreateKey", KeyRef(name, 1), reason)
            return
        for _ in range(50):  # bounded: 50 x 20 ms
            key = self._store.key(name)
            if key is not None and key.current_version:
                self._changed()
                return
            time.sleep(0.02)
        raise FailedPreconditionError(f"key {name!r} is still being created", reason="key_pending")

    @overload
    def shred(self, name: str, reason: str) -> int: ...

    @overload
    def shred(self, name: str, reason: str, *, claim: ShredClaim) -> int | None: ...

    def shred(
        self,
        name: str,
        reason: str,
        *,
        claim: ShredClaim | None = None,
    ) -> int | None:
        """Destroy every version of ``name`` (retention epoch over). Exactly one replica wins
        each version; each destruction is recorded before the HSM object goes. ``claim``
        replaces the store's claim (e.g. one that refuses, with None, while a hold is
        unprotected); None is passed on."""
        claimed = (claim or self._store.claim_shred)(name, self._clock())
        if claimed is None:
            return None
        versions = claimed
        for version in versions:
            ref = KeyRef(name, version)
            self._event("RetentionShred", ref, reason)
            self._destroy(ref)
        if versions:
            self._changed()
        return len(versions)

    def _scheduled_rotation(self, key: KeyInfo, reason: str) -> int:
        version = self._store.claim_version(key.name, self._clock(), key.current_version)
        if version is None:
            return 0  # another replica rotated first
        ref = KeyRef(key.name, version)
        self._materialise(ref, lambda: self._event("ScheduledRotation", ref, reason))
        return 1

    def _destroy(self, ref: KeyRef) -> None:
        self._hsm.destroy_version(ref)
        self._store.finish_destruction(ref.name, ref.version, self._clock())
        log.info("key version %s destroyed", ref)

    def reconcile(self, *, full: bool = False) -> int:
        """Finish what a crash left half done. ``full`` also compares the HSM token with the
        store (start-up). Returns the number of repairs."""
        repairs = 0
        cutoff = self._clock() - self._c.reconcile_after
        stale_pending = self._store.stale(S.PENDING, cutoff)
        stale_destroying = self._store.stale(S.DESTROYING, cutoff)
        token = self._hsm.versions_on_token() if (full or stale_pending) else set()
        for ref, _ in stale_pending:
            if ref in token:
                self._event("Reconcile", ref, "rotation_completed")
                self._store.activate_version(ref.name, ref.version, self._clock())
            else:
                self._store.drop_pending(ref.name, ref.version)
                self._event("Reconcile", ref, "rotation_abandoned")
            repairs += 1
        for ref, _ in stale_destroying:
            self._event("Reconcile", ref, "destruction_completed")
            self._destroy(ref)
            repairs += 1
        if full:
            repairs += self._reconcile_token(token)
        if repairs:
            self._changed()
        return repairs

    def _reconcile_token(self, token: set[KeyRef]) -> int:
        repairs = 0
        known: dict[KeyRef, VersionState] = {
            KeyRef(key.name, v.version): v.state
            for key in self._store.list_keys()
            for v in key.versions
        }
        for ref in sorted(token):
            state = known.get(ref)
            if state is None:
                if self._store.adopt_version(ref, self._clock()):
                    current = self._store.key(ref.name)
                    made_current = current is not None and current.current_version == ref.version
                    reason = "adopted_from_hsm" if made_current else "adopted_from_hsm_not_current"
                    if not made_current:
                        log.warning(
                            "key version %s found on the HSM token was adopted but is not "
                            "current: make it current with KeyAdmin EnableKeyVersion "
                            "(make_current) if it should be",
                            ref,
                        )
                    self._event("Reconcile", ref, reason)
                    repairs += 1
            elif state is S.DESTROYED:
                self._event("Reconcile", ref, "destruction_completed")
                self._hsm.destroy_version(ref)
                repairs += 1
        for label, why in sorted(self._hsm.rejected_objects().items()):
            log.error("HSM object %r is never used: %s", label, why)
            named = _label_ref(label)
            if named is not None:  # journaled (and alerted on: foreign_kek_object)
                self._event("Reconcile", named, REJECTED_OBJECT, Outcome.ERROR)
        for ref, state in sorted(known.items()):
            live = state not in (S.PENDING, S.DESTROYING, S.DESTROYED)
            if live and ref not in token:
                log.error("key version %s is %s but its HSM object is missing", ref, state.value)
                self._event("Reconcile", ref, "hsm_object_missing", Outcome.ERROR)
        return repairs

    def _event(
        self,
        operation: str,
        ref: KeyRef,
        reason: str,
        outcome: Outcome = Outcome.ALLOW,
        recording_id: str | None = None,
    ) -> None:
        now = time.time_ns()
        self._record(
            Decision(
                service=ADMIN_SERVICE,
                operation=operation,
                outcome=outcome,
                reason=reason,
                status_code="OK" if outcome is Outcome.ALLOW else "INTERNAL",
                subject=SCHEDULER_SUBJECT,
                recording_id=recording_id,
                key_name=ref.name,
                key_version=ref.version,
                started_ns=now,
                ended_ns=now,
            )
        )

    record_event = _event


def _check_policy(rotation_period: int | None, rotate_after_wraps: int | None) -> None:
    if rotation_period is not None and not (
        MIN_ROTATION_PERIOD <= rotation_period <= MAX_ROTATION_PERIOD
    ):
        raise InvalidRequestError(
            f"rotation_period must be {MIN_ROTATION_PERIOD}..{MAX_ROTATION_PERIOD} s "
            "(or 0 for none)",
            reason="bad_rotation_period",
        )
    if rotate_after_wraps is not None and not 1 <= rotate_after_wraps <= MAX_ROTATE_AFTER_WRAPS:
        raise InvalidRequestError(
            f"rotate_after_wraps must be 1..{MAX_ROTATE_AFTER_WRAPS}",
            reason="bad_rotate_after_wraps",
        )


def _label_ref(label: str) -> KeyRef | None:
    """The key version a ``kek:<name>:v<version>`` label names, if it is well formed."""
    parts = label.split(":")
    if len(parts) != 3 or parts[0] != "kek" or not parts[2].startswith("v"):
        return None
    try:
        return KeyRef(validate_key_name(parts[1]), int(parts[2][1:]))
    except (InvalidRequestError, ValueError):
        return None


def describe_failure(exc: BaseException) -> str:
    """A log-safe description of a failed scheduler step."""
    return exc.reason if isinstance(exc, KeybrokerError) else type(exc).__name__
