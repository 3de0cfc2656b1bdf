"""Runs one call: TLS and token checks, the use case, the decision record, the status mapping.

Every call through :meth:`CallGuard.run` produces exactly one decision record, allow or deny. With
a durable recorder (the audit journal) the record is durable before the reply leaves; if it cannot
be written the call fails closed with UNAVAILABLE, and no data key leaves. The live recorder
(spans) is best-effort and never fails a call.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from keybroker.core import policy
from keybroker.core.decision import Decision, Outcome
from keybroker.core.identity import Principal
from keybroker.core.ports import DecisionRecorder, DurableRecorder
from keybroker.core.wrapped_key import MAX_KEY_NAME, MAX_RECORDING_ID, WrappedKey
from keybroker.errors import (
    AuthenticationError,
    JournalUnavailableError,
    KeybrokerError,
    UnavailableError,
)
from keybroker.server.limits import DenialLimiter, RateLimits
from keybroker.server.logs import enter_call, leave_call
from keybroker.server.peer import peer_from_context
from keybroker.server.status import REASON_METADATA, status_for

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")
_TRACE_HEADERS = ("traceparent", "tracestate")
#: W3C Trace Context: ``traceparent`` version 00 is exactly 55 characters (later versions: the
#: first 55 are read); ``tracestate`` holds at most 32 members and is kept to 512 characters.
TRACEPARENT_SIZE = 55
TRACESTATE_SIZE = 512
TRACESTATE_MEMBERS = 32
_TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_context(metadata: tuple[tuple[str, str | bytes], ...]) -> dict[str, str]:
    """The caller's W3C trace headers, capped to their standard sizes (a record never carries
    more than ~570 characters of them, whatever the caller sends)."""
    out: dict[str, str] = {}
    for key, value in metadata:
        if key not in _TRACE_HEADERS or not isinstance(value, str):
            continue
        kept = _traceparent(value) if key == "traceparent" else _tracestate(value)
        if kept:
            out[key] = kept
    return out


def _traceparent(value: str) -> str | None:
    head = value[:TRACEPARENT_SIZE]
    if not _TRACEPARENT_RE.fullmatch(head) or head.startswith("ff"):
        return None
    if head.startswith("00-") and len(value) != TRACEPARENT_SIZE:
        return None  # version 00 is exactly this long
    return head


def _tracestate(value: str) -> str | None:
    members: list[str] = []
    size = 0
    for raw in value[: TRACESTATE_SIZE * 2].split(","):
        member = raw.strip()
        if not member:
            continue
        size += len(member) + (1 if members else 0)
        if size > TRACESTATE_SIZE or len(members) == TRACESTATE_MEMBERS:
            break  # whole members only, dropped from the end (W3C)
        members.append(member)
    return ",".join(members) or None


_ERROR_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        raise AuthenticationError(
            "missing access token (authorization metadata)", reason="token_missing"
        )
    if len(values) > 1 or not isinstance(values[0], str):
        raise AuthenticationError("access token malformed", reason="token_malformed")
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "authorization metadata must be 'Bearer <token>'", reason="token_malformed"
        )
    return token.strip()


@dataclass(frozen=True, slots=True)
class ItemError:
    """The failure of one item of a batch call."""

    code: grpc.StatusCode
    message: str
    reason: str


def _name_target(decision: Decision, exc: Exception, wrapped_key: bytes) -> None:
    """A refused call's record names whom and what it was about, as far as known: the token's
    identity when only a claim check failed, the key a wrapped key names (unauthenticated: it is
    what the request asked for, nothing more)."""
    claims = exc.verified_claims if isinstance(exc, AuthenticationError) else None
    if claims is not None and decision.subject is None:
        decision.subject, decision.token_id, decision.client_id = claims
    if decision.key_name is None and wrapped_key:
        try:
            ref = WrappedKey.parse(wrapped_key).key
        except Exception:  # noqa: BLE001 - a blob that does not parse names no key
            return
        decision.key_name, decision.key_version = ref.name, ref.version


def _allowed(decision: Decision) -> None:
    decision.outcome = Outcome.ALLOW
    decision.reason = "ok"
    decision.status_code = grpc.StatusCode.OK.name


@dataclass(slots=True)
class DeferredRecord:
    """A decision whose durable and live recording the server does later, before the reply."""

    decision: Decision
    durable: DurableRecorder | None
    live: DecisionRecorder
    error: KeybrokerError | None = None  # set when it could not be made durable


class RecordDeferral:
    """Implemented by a call context whose server commits decision records itself.

    :class:`keybroker.server.loop.LoopServer` answers data-plane calls on one thread and writes
    the records of all calls answered in one turn with one journal flush (group commit); it
    sends no reply before :func:`commit_deferred` has made that call's record durable."""

    def defer(self, record: DeferredRecord) -> bool:
        """Take over ``record``; False when this call records immediately after all."""
        return False


def _unavailable(decision: Decision, exc: KeybrokerError) -> None:
    """The decision could not be made durable: it ends as an error, and its call UNAVAILABLE."""
    decision.outcome, decision.reason = Outcome.ERROR, exc.reason
    decision.status_code = grpc.StatusCode.UNAVAILABLE.name


def commit_deferred(records: Sequence[DeferredRecord]) -> None:
    """Make deferred records durable, one ``record_many`` (one flush) per journal; never raises.

    A record that cannot be made durable gets ``error`` set and its decision turns into an
    error, as :meth:`CallGuard._record` does for one call: its caller must get UNAVAILABLE and
    nothing else."""
    journals: dict[int, tuple[DurableRecorder, list[DeferredRecord]]] = {}
    for record in records:
        if record.durable is not None:
            journals.setdefault(id(record.durable), (record.durable, []))[1].append(record)
    for durable, batch in journals.values():
        try:
            durable.record_many([r.decision for r in batch])
        except Exception as exc:  # never let a reply out undurable
            if not isinstance(exc, KeybrokerError):  # a bug in the journal: fail closed too
                log.exception("recording decisions durably failed unexpectedly")
            error = exc if isinstance(exc, KeybrokerError) else JournalUnavailableError()
            for r in batch:
                r.error = error
                _unavailable(r.decision, error)


def record_live(records: Sequence[DeferredRecord]) -> None:
    """Hand the (now final) decisions to the live recorders: spans, alerts, metrics. Live
    recording is best-effort (as in :class:`FanOut`): a failing recorder never holds a reply."""
    for record in records:
        try:
            record.live.record(record.decision)
        except Exception:
            log.exception("live decision recorder %s failed", type(record.live).__name__)


class FanOut:
    """Passes each decision to several live recorders; one failing never fails the call."""

    def __init__(self, recorders: Sequence[DecisionRecorder]) -> None:
        self._recorders = tuple(recorders)

    def record(self, decision: Decision) -> None:
        for recorder in self._recorders:
            try:
                recorder.record(decision)
            except Exception:  # live recording is best-effort by design
                log.exception("live decision recorder %s failed", type(recorder).__name__)


class CallGuard:
    """Authenticates and records every call of one service."""

    def __init__(
        self,
        *,
        service: str,
        verifier: Callable[[str], Principal],
        recorder: DecisionRecorder,
        require_cnf: bool,
        durable: DurableRecorder | None = None,
        draining: threading.Event | None = None,
        limits: RateLimits | None = None,
        denials: DenialLimiter | None = None,
        counters: DecisionRecorder | None = None,
    ) -> None:
        """``limits``: per-caller call rates; ``denials``: which denials are journaled one by one
        (the rest go into aggregate records, and only to ``counters`` live: the alert detector
        and metrics, which must see every denial). See keybroker.server.limits."""
        self._service = service
        self._limits = limits
        self._denials = denials
        self._counters = counters
        self._draining = draining
        self._verify = verifier
        self._recorder = recorder
        self._durable = durable
        self._require_cnf = require_cnf

    def run(
        self,
        context: grpc.ServicerContext,
        operation: str,
        action: Callable[[Principal, Decision], R],
        *,
        recording_id: str = "",
        key_name: str = "",
        wrapped_key: bytes = b"",
    ) -> R:
        """``recording_id``, ``key_name``, ``wrapped_key``: what the request names, so that a
        refusal before the use case ran (token, TLS) still names its target."""
        decision = self._start(context, operation)
        if recording_id:
            decision.recording_id = recording_id[:MAX_RECORDING_ID]
        if key_name:
            decision.key_name = key_name[:MAX_KEY_NAME]
        entered = enter_call(decision.trace_context.get("traceparent"))
        try:
            try:
                principal = self._authenticate(context, decision)
                result = action(principal, decision)
            except Exception as exc:  # noqa: BLE001 - every failure is mapped, logged, recorded
                _name_target(decision, exc, wrapped_key)
                code, message = self._failed(decision, exc, operation)
                self._record(context, decision)
                context.set_trailing_metadata(((REASON_METADATA, decision.reason),))
                context.abort(code, message)
            _allowed(decision)
            self._record(context, decision)
            return result
        finally:
            leave_call(entered)

    def run_batch(
        self,
        context: grpc.ServicerContext,
        operation: str,
        items: Sequence[T],
        authorize: Callable[[Principal], None],
        action: Callable[[T, Decision], R],
    ) -> list[R | ItemError]:
        """One call carrying many items: authenticate and ``authorize`` once, then one decision
        per item, all recorded with one durable flush before the reply leaves."""
        base = self._start(context, operation)
        entered = enter_call(base.trace_context.get("traceparent"))
        try:
            try:
                principal = self._authenticate(context, base)
                authorize(principal)
            except Exception as exc:  # noqa: BLE001 - mapped, logged and recorded
                _name_target(base, exc, b"")
                code, message = self._failed(base, exc, operation)
                self._record(context, base)
                context.set_trailing_metadata(((REASON_METADATA, base.reason),))
                context.abort(code, message)
            results: list[R | ItemError] = []
            decisions: list[Decision] = []
            for item in items:
                decision = dataclasses.replace(base, started_ns=time.time_ns())
                try:
                    results.append(action(item, decision))
                    _allowed(decision)
                except Exception as exc:  # noqa: BLE001 - per item: mapped, recorded, reported
                    code, message = self._failed(decision, exc, operation)
                    results.append(ItemError(code, message, decision.reason))
                decision.ended_ns = time.time_ns()
                decisions.append(decision)
            if self._durable is not None:
                try:
                    self._durable.record_many(decisions)
                except KeybrokerError as exc:
                    for decision in decisions:
                        _unavailable(decision, exc)
                        self._recorder.record(decision)
                    context.set_trailing_metadata(((REASON_METADATA, exc.reason),))
                    context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
            for decision in decisions:
                self._recorder.record(decision)
            return results
        finally:
            leave_call(entered)

    def _start(self, context: grpc.ServicerContext, operation: str) -> Decision:
        metadata = tuple(context.invocation_metadata() or ())
        return Decision(
            service=self._service,
            operation=operation,
            started_ns=time.time_ns(),
            trace_context=trace_context(metadata),
        )

    def _authenticate(self, context: grpc.ServicerContext, decision: Decision) -> Principal:
        metadata = tuple(context.invocation_metadata() or ())
        decision.peer_address = context.peer()  # even when there is no certificate to read
        peer = peer_from_context(context)
        decision.peer_address = peer.address
        decision.cert_identity = peer.identity
        decision.cert_thumbprint = peer.thumbprint
        if self._draining is not None and self._draining.is_set():
            raise UnavailableError("broker shutting down; retry", reason="shutting_down")
        policy.require_tls13(peer)
        if self._limits is not None:  # before the signature check: a flood costs no ES256
            self._limits.check_certificate(peer.identity or peer.thumbprint)
        principal = self._verify(bearer_token(metadata))
        decision.subject = principal.subject
        decision.token_id = principal.token_id
        decision.client_id = principal.client_id
        if self._limits is not None:
            self._limits.check_subject(principal.subject)
        policy.require_certificate_binding(principal, peer, mandatory=self._require_cnf)
        return principal

    @staticmethod
    def _failed(decision: Decision, exc: Exception, operation: str) -> tuple[grpc.StatusCode, str]:
        code, message = status_for(exc)
        if not isinstance(exc, KeybrokerError):
            log.exception("unexpected error in %s", operation)
        decision.outcome = Outcome.ERROR if code in _ERROR_CODES else Outcome.DENY
        decision.reason = exc.reason if isinstance(exc, KeybrokerError) else "internal"
        decision.status_code = code.name
        return code, message

    def _record(self, context: grpc.ServicerContext, decision: Decision) -> None:
        """Durable record first (fail closed), then the live span."""
        decision.ended_ns = time.time_ns()
        if log.isEnabledFor(logging.DEBUG):  # never names the principal, the target or a key
            log.debug(
                "%s/%s: %s (%s, %s)",
                decision.service,
                decision.operation,
                decision.outcome.value,
                decision.reason,
                decision.status_code,
            )
        if self._denials is not None and not self._denials.admit(decision):
            if self._counters is not None:  # counted into an aggregate record; alerts still see it
                self._counters.record(decision)
            return
        if isinstance(context, RecordDeferral) and context.defer(
            DeferredRecord(decision, self._durable, self._recorder)
        ):
            return
        if self._durable is not None:
            try:
                self._durable.record(decision)
            except KeybrokerError as exc:
                _unavailable(decision, exc)
                self._recorder.record(decision)
                context.set_trailing_metadata(((REASON_METADATA, exc.reason),))
                context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
        self._recorder.record(decision)
