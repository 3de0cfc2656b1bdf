"""Retention epochs: crypto-shredding by destroying one KEK per retention period.

A recording whose ``retain_until`` falls in an epoch (by default a calendar month, UTC) has its
data key wrapped under that epoch's KEK, named ``<key>.e<label>`` (``recordings.e2027-02``), made
on first use. Once the epoch has ended and a grace period has passed, every version of the epoch
KEK is destroyed in the HSM: no copy of any wrapped key of that epoch — in any backup — can be
unwrapped again. Before that, recordings under legal hold are rewrapped to that epoch's hold key
``<epoch key>.hold`` (``recordings.e2027-02.hold``, from the copy of their wrapped key the registry
keeps) so the hold survives. Once no recording of the epoch is held any more, the hold copies are
deleted and every version of the epoch's hold key is destroyed too: a released recording is
crypto-shredded like the others, registry backups included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from keybroker.core.decision import Outcome
from keybroker.core.epochs import (
    EPOCH_KEYS_PER_MINUTE,
    HOLD_SUFFIX,
    MONTH,
    Epoch,
    EpochKeyBudget,
    EpochScheme,
    hold_key,
    is_retention_key,
)
from keybroker.core.keys import VersionState
from keybroker.core.ports import Clock, KeyStore
from keybroker.core.wrapped_key import WrappedKey
from keybroker.errors import KeybrokerError

if TYPE_CHECKING:
    from keybroker.core.broker import KeyBroker
    from keybroker.core.lifecycle import KeyLifecycle
    from keybroker.core.privacy import PrivacyStore

# the epoch scheme moved to keybroker.core.epochs (a leaf the broker can import without a
# circle); its names stay importable from here
__all__ = [
    "EPOCH_KEYS_PER_MINUTE",
    "HOLD_SUFFIX",
    "MONTH",
    "Epoch",
    "EpochKeyBudget",
    "EpochScheme",
    "RetentionShredder",
    "hold_key",
    "is_retention_key",
]

log = logging.getLogger(__name__)


class RetentionShredder:
    """Destroys retention epoch keys once their epoch and grace period are over, after moving
    the keys of held recordings to the hold key. Runs on every replica's scheduler; the store's
    claims make each destruction happen once."""

    def __init__(
        self,
        scheme: EpochScheme,
        *,
        keys: KeyStore,
        privacy: PrivacyStore,
        broker: KeyBroker,
        lifecycle: KeyLifecycle,
        clock: Clock,
    ) -> None:
        self._scheme = scheme
        self._keys = keys
        self._privacy = privacy
        self._broker = broker
        self._life = lifecycle
        self._clock = clock
        self.between_steps: Callable[[str], object] | None = None
        """Test seam: called with the epoch key after its holds were moved, before the key is
        claimed for destruction (where a hold placed concurrently used to be lost)."""

    def run_due(self) -> int:
        """Shred every epoch key that is due, and every epoch hold key whose holds are all
        released; returns the number of versions destroyed."""
        destroyed = 0
        now = self._clock()
        for key in self._keys.list_keys():
            is_hold = key.name.endswith(HOLD_SUFFIX)
            epoch_key = key.name.removesuffix(HOLD_SUFFIX)
            parsed = self._scheme.parse(epoch_key)
            if parsed is None or now < self._scheme.shred_after(parsed[1]):
                continue
            if all(v.state in (VersionState.DESTROYED, VersionState.PENDING) for v in key.versions):
                continue
            if is_hold:
                destroyed += self._shred_released(key.name, epoch_key)
                continue
            if not self._move_holds(key.name, hold_key(key.name)):
                continue  # a held recording could not be moved: keep the key, retry later
            if self.between_steps is not None:
                self.between_steps(key.name)
            shredded = self._life.shred(
                key.name, "retention_epoch_ended", claim=self._privacy.claim_shred_unless_held
            )
            if shredded is None:  # a hold arrived after the moves: move it on the next run
                log.info("retention: %s kept: a legal hold arrived while it was due", key.name)
                continue
            destroyed += shredded
        return destroyed

    def _shred_released(self, hold_name: str, epoch_key: str) -> int:
        """Delete the hold copies of released recordings of an epoch; once none is left, destroy
        the epoch's hold key (its recordings' retention ended with the epoch)."""
        self._privacy.drop_released_hold_copies(epoch_key)
        if self._privacy.count_hold_copies(epoch_key):
            return 0  # some recording of this epoch is still held
        return self._life.shred(hold_name, "legal_holds_released")

    def _move_holds(self, key_name: str, hold_name: str) -> bool:
        held = self._privacy.held_recordings(key_name)
        if not held:
            return True
        self._life.ensure_key(hold_name, "legal_hold_key")
        for entry in held:
            try:
                moved = self._broker.move_to_hold(entry.wrapped_key, hold_name)
            except KeybrokerError as exc:
                log.error(  # noqa: TRY400 - the reason is the whole story; no traceback
                    "retention: cannot move held recording to %s (%s); %s is kept",
                    hold_name,
                    exc.reason,
                    key_name,
                )
                self._life.record_event(
                    "RetentionHoldMove",
                    entry.key,
                    exc.reason,
                    Outcome.ERROR,
                    recording_id=entry.recording_id,
                )
                return False
            self._privacy.store_hold_copy(entry.seq, moved)
            ref = WrappedKey.parse(moved).key
            self._life.record_event(
                "RetentionHoldMove", ref, "legal_hold", recording_id=entry.recording_id
            )
        return True
