"""The decision record: one per call, allow or deny, with the facts an auditor needs.

Adapters turn it into a span (and, later, a journal entry). It never holds key material, wrapped
blobs or tokens: only identifiers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ERROR = "error"
    """The broker could not decide (HSM down, internal error)."""
    INTENT = "intent"
    """Not a verdict: an authorized change about to be applied (admin and privacy planes). Made
    durable before the change; the call's decision follows it."""


@dataclass(slots=True)
class Decision:
    """Filled in as a call progresses; recorded exactly once when it ends."""

    service: str
    operation: str
    outcome: Outcome = Outcome.DENY
    reason: str = ""
    status_code: str = ""
    subject: str | None = None
    token_id: str | None = None
    client_id: str | None = None
    cert_identity: str | None = None
    cert_thumbprint: str | None = None
    peer_address: str | None = None
    recording_id: str | None = None
    purposes: tuple[str, ...] = field(default_factory=tuple)
    subject_ids: tuple[str, ...] = field(default_factory=tuple)
    key_name: str | None = None
    key_version: int | None = None
    started_ns: int = 0
    ended_ns: int = 0
    reference: str | None = None
    """What the call produced that an auditor can look up, e.g. ``erasure:17``."""
    justification: str | None = None
    """The reason a caller gave for a privacy operation (erasure, hold, purpose amendment)."""
    purposes_added: tuple[str, ...] = field(default_factory=tuple)
    purposes_removed: tuple[str, ...] = field(default_factory=tuple)
    """What an AmendPurposes call asked to add and to remove (also in its intent record), so a
    purpose withdrawal can be re-applied from the journal after a restore (privacy replay)."""
    trace_context: dict[str, str] = field(default_factory=dict)
    """W3C ``traceparent``/``tracestate`` of the caller, to join its trace."""
    aggregated: dict[str, int] = field(default_factory=dict)
    """Only on an aggregate record (reason ``denials_aggregated``): the denials it stands for,
    counted by ``<operation>/<reason>`` (see keybroker.server.limits)."""


#: Makes a record durable, or raises (UnavailableError) if it cannot.
IntentRecorder = Callable[[Decision], object]


def record_intent(recorder: IntentRecorder | None, decision: Decision) -> None:
    """Durable intent before effect: record what an authorized change is about to do (who,
    what, why) before it is applied. If this raises, the caller must change nothing."""
    if recorder is None:
        return
    recorder(
        dataclasses.replace(
            decision,
            outcome=Outcome.INTENT,
            reason="intent",
            status_code="",
            ended_ns=time.time_ns(),
            trace_context=dict(decision.trace_context),
        )
    )
