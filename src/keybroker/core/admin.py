"""Admin-plane use cases: who may change keys, and what each call records.

Authorization (scope ``keys:admin`` plus MFA) is checked before anything is read; the decision of
each call names the key and version it touched. The work itself is :class:`KeyLifecycle`'s.
"""

from __future__ import annotations

from keybroker.core import policy
from keybroker.core.decision import Decision, IntentRecorder, record_intent
from keybroker.core.epochs import is_retention_key
from keybroker.core.identity import Principal
from keybroker.core.keys import KeyInfo, VersionState
from keybroker.core.lifecycle import KeyLifecycle


class KeyAdmin:
    def __init__(
        self,
        lifecycle: KeyLifecycle,
        *,
        mfa_required: bool,
        intent: IntentRecorder | None = None,
    ) -> None:
        """``intent``: makes the intent of each change durable before it is applied (the audit
        journal); if it raises, nothing changes."""
        self._life = lifecycle
        self._mfa = mfa_required
        self._intent = intent

    def _about_to_change(self, decision: Decision) -> None:
        record_intent(self._intent, decision)

    def _authorize(
        self, principal: Principal, decision: Decision, name: str = "", version: int = 0
    ) -> None:
        decision.key_name = name or None
        decision.key_version = version or None
        policy.require_admin(principal, mfa_required=self._mfa)

    def create_key(
        self,
        principal: Principal,
        decision: Decision,
        name: str,
        *,
        rotation_period: int | None,
        rotate_after_wraps: int | None,
    ) -> KeyInfo:
        self._authorize(principal, decision, name)
        self._about_to_change(decision)
        key = self._life.create(
            name, rotation_period=rotation_period, rotate_after_wraps=rotate_after_wraps
        )
        decision.key_version = key.current_version
        return key

    def get_key(self, principal: Principal, decision: Decision, name: str) -> KeyInfo:
        self._authorize(principal, decision, name)
        return self._life.get(name)

    def list_keys(self, principal: Principal, decision: Decision) -> list[KeyInfo]:
        self._authorize(principal, decision)
        return self._life.list()

    def rotate_key(self, principal: Principal, decision: Decision, name: str) -> KeyInfo:
        self._authorize(principal, decision, name)
        if is_retention_key(name):  # its old versions go with the epoch: not while held
            self._life.require_not_held(name, None, "rotated")
        self._about_to_change(decision)
        ref = self._life.rotate(name)
        decision.key_version = ref.version if ref else None
        return self._life.get(name)

    def set_rotation_policy(
        self,
        principal: Principal,
        decision: Decision,
        name: str,
        *,
        rotation_period: int | None,
        rotate_after_wraps: int | None,
        min_decryption_version: int | None,
    ) -> KeyInfo:
        self._authorize(principal, decision, name)
        self._about_to_change(decision)
        return self._life.set_policy(
            name,
            rotation_period=rotation_period,
            rotate_after_wraps=rotate_after_wraps,
            min_decryption_version=min_decryption_version,
        )

    def set_version_state(
        self,
        principal: Principal,
        decision: Decision,
        name: str,
        version: int,
        state: VersionState,
    ) -> KeyInfo:
        self._authorize(principal, decision, name, version)
        self._about_to_change(decision)
        return self._life.set_state(name, version, state)

    def make_current(
        self, principal: Principal, decision: Decision, name: str, version: int
    ) -> KeyInfo:
        """Make a newer version current (e.g. one adopted from the HSM token): always this
        explicit, audited call, never by itself."""
        self._authorize(principal, decision, name, version)
        return self._life.make_current(name, version)

    def schedule_destruction(
        self,
        principal: Principal,
        decision: Decision,
        name: str,
        version: int,
        window: int | None,
    ) -> KeyInfo:
        self._authorize(principal, decision, name, version)
        self._life.require_not_held(name, version, "scheduled for destruction")
        self._about_to_change(decision)
        self._life.schedule_destruction(name, version, window)
        return self._life.get(name)

    def cancel_destruction(
        self, principal: Principal, decision: Decision, name: str, version: int
    ) -> KeyInfo:
        self._authorize(principal, decision, name, version)
        self._about_to_change(decision)
        return self._life.cancel_destruction(name, version)
