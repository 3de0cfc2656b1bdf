"""Journal records and their keyed hash chain (pure: no I/O).

One record per line, canonical JSON (sorted keys, no spaces)::

    {"d": {...decision...}, "kind": "decision", "mac": "<hex>", "prev": "<hex>", "seq": 7,
     "ts": 1732250000123456789, "v": 1}

``mac = HMAC-SHA256(chain key, canonical JSON of the record without "mac")``; ``prev`` is the mac
of the record before (64 zeros for the first), so changing, removing, inserting or reordering any
record breaks the chain. The chain key is never written to the journal. ``checkpoint`` records
carry a signature over ``"<seq>:<prev>"`` by the checkpoint signing key (Ed25519), so a chain head
can be anchored off-host and verified by anyone holding the public key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from keybroker.core.decision import Decision, Outcome

FORMAT_VERSION = 1
GENESIS = "0" * 64
KIND_DECISION = "decision"
KIND_CHECKPOINT = "checkpoint"
_KIND_DECISION_BYTES = KIND_DECISION.encode()

Signer = Callable[[bytes], bytes]


class CheckpointKey(Protocol):
    """What signs checkpoints: an Ed25519 private key, or the HSM (raw 64-byte signatures)."""

    def sign(self, data: bytes, /) -> bytes: ...


SignatureCheck = Callable[[bytes, bytes], bool]


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(obj: dict[str, Any]) -> bytes:
    return _ENCODER.encode(obj).encode()


def mac_of(key: bytes, body: dict[str, Any]) -> str:
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def checkpoint_message(seq: int, head: str) -> bytes:
    return f"keybroker-checkpoint:{seq}:{head}".encode()


_DECISION_FIELDS = tuple(f.name for f in dataclasses.fields(Decision))
_TUPLE_FIELDS = ("purposes", "subject_ids", "purposes_added", "purposes_removed")


def decision_to_dict(decision: Decision) -> dict[str, Any]:
    """The decision's non-empty fields (hot path: no deep copy)."""
    out: dict[str, Any] = {}
    for name in _DECISION_FIELDS:
        value = getattr(decision, name)
        if value is None or value in ("", (), {}):
            continue
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Outcome):
            value = value.value
        out[name] = value
    return out


def decision_from_dict(data: dict[str, Any]) -> Decision:
    fields = {f.name for f in dataclasses.fields(Decision)}
    values = {k: v for k, v in data.items() if k in fields}
    values["outcome"] = Outcome(values.get("outcome", "deny"))
    for name in _TUPLE_FIELDS:
        values[name] = tuple(values.get(name, ()))
    return Decision(**values)


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    ts: int
    kind: str
    body: dict[str, Any]
    prev: str
    mac: str
    encoded: bytes | None = None
    """The line, when it was serialised while sealing (decision records)."""

    @property
    def decision(self) -> Decision | None:
        return decision_from_dict(self.body["d"]) if self.kind == KIND_DECISION else None

    def line(self) -> bytes:
        if self.encoded is not None:
            return self.encoded
        return canonical({**self.body, "mac": self.mac}) + b"\n"


def seal(key: bytes, *, seq: int, ts: int, prev: str, kind: str, payload: dict[str, Any]) -> Record:
    """A chained record following ``prev``."""
    body = {"v": FORMAT_VERSION, "seq": seq, "ts": ts, "kind": kind, "prev": prev, **payload}
    return Record(seq, ts, kind, body, prev, mac_of(key, body))


def decision_json(decision: Decision) -> bytes:
    """``canonical(decision_to_dict(decision))``, built faster (hot path: one per call).

    JSON writes tuples as arrays and a StrEnum as its string, so the values need no conversion;
    a field is left out when it is None or an empty string, tuple or mapping (an int 0 stays).
    tests/core/test_journal_format.py checks it byte for byte against the generic form."""
    out: dict[str, Any] = {}
    for name in _DECISION_FIELDS:
        value = getattr(decision, name)
        if value or (value is not None and value.__class__ is int):
            out[name] = value
    return _ENCODER.encode(out).encode()


def decision_line(
    key: bytes, *, seq: int, ts: int, prev: str, decision: Decision
) -> tuple[str, bytes]:
    """The mac and the journal line of a decision record, serialised once (hot path).

    The canonical JSON of the body is assembled around the canonical JSON of the decision: the
    top-level keys sorted are ``d < kind < mac < prev < seq < ts < v``, so the MAC input (the body
    without ``mac``) and the line (with it) share every byte but the ``mac`` member. The result is
    byte for byte what :func:`seal` would give (tests/core/test_journal_format.py checks it).
    """
    head = b'{"d":' + decision_json(decision) + b',"kind":"' + _KIND_DECISION_BYTES + b'"'
    tail = f',"prev":"{prev}","seq":{int(seq)},"ts":{int(ts)},"v":{FORMAT_VERSION}}}'.encode()
    mac = hmac.digest(key, head + tail, "sha256").hex()  # one-shot C HMAC
    return mac, b"".join((head, b',"mac":"', mac.encode(), b'"', tail, b"\n"))


def decision_record(key: bytes, *, seq: int, ts: int, prev: str, decision: Decision) -> Record:
    """A chained decision record (see :func:`decision_line`), with its parsed body."""
    mac, line = decision_line(key, seq=seq, ts=ts, prev=prev, decision=decision)
    body = {
        "v": FORMAT_VERSION,
        "seq": seq,
        "ts": ts,
        "kind": KIND_DECISION,
        "prev": prev,
        "d": decision_to_dict(decision),
    }
    return Record(seq, ts, KIND_DECISION, body, prev, mac, line)


def checkpoint_record(key: bytes, signer: Signer, *, seq: int, ts: int, prev: str) -> Record:
    """Signs the head of the chain (the mac of record ``seq - 1``)."""
    sig = signer(checkpoint_message(seq - 1, prev)).hex()
    return seal(key, seq=seq, ts=ts, prev=prev, kind=KIND_CHECKPOINT, payload={"sig": sig})


class ChainError(Exception):
    """Where and how a journal fails verification."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


def parse_line(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise TypeError("not an object")
    return data


def verify(
    key: bytes,
    lines: Iterable[tuple[str, bytes]],
    *,
    check_signature: SignatureCheck | None = None,
) -> Iterator[Record]:
    """Check the chain over ``(location, line)`` pairs, yielding records; raise ChainError at the
    first defect, naming the location (file:line) and the sequence number."""
    prev: str | None = None
    expected: int | None = None
    for where, raw in lines:
        try:
            data = parse_line(raw)
            mac = str(data.pop("mac"))
            seq, ts, kind, link = int(data["seq"]), int(data["ts"]), str(data["kind"]), data["prev"]
        except (ValueError, KeyError, TypeError):
            raise ChainError(where, "unreadable record (modified or torn)") from None
        if expected is None:
            # The first record present. Record 1 starts the chain; a later one means older files
            # were archived or removed: the chain is checked from here, and the caller checks
            # that archive records account for the earlier ones (adapters/journal_archive.py).
            if seq == 1 and link != GENESIS:
                raise ChainError(where, "record 1 does not start a chain")
        elif seq != expected:
            what = "missing (deleted)" if seq > expected else "out of order or inserted"
            raise ChainError(where, f"expected record {expected}, found {seq}: records {what}")
        elif link != prev:
            raise ChainError(where, f"record {seq} does not follow record {seq - 1}")
        if not hmac.compare_digest(mac_of(key, data), mac):
            raise ChainError(where, f"record {seq} was modified (MAC mismatch)")
        if kind == KIND_CHECKPOINT and check_signature is not None:
            try:
                sig = bytes.fromhex(str(data.get("sig", "")))
            except ValueError:
                sig = b""
            if not check_signature(checkpoint_message(seq - 1, str(link)), sig):
                raise ChainError(where, f"record {seq}: checkpoint signature invalid")
        yield Record(seq, ts, kind, data, str(link), mac)
        prev, expected = mac, seq + 1
