"""The privacy changes in the audit journal, for privacy replay (keybroker.core.privacy_replay).

Reads every chain (``w<N>``) under a journal directory and checks each whole chain as it goes:
every record's MAC (the chain key), the sequence numbers and the links, so a record cannot be
forged, changed, removed or reordered without the replay refusing the journal; a chain listed in
the register of chains that has disappeared is refused too. A chain may start
after record 1 (older files archived, see keybroker.adapters.journal_archive); the torn last
record a crash leaves is skipped (it was never acknowledged).

The check is made for speed, not by parsing every record: a record is the canonical JSON
the journal writes (keybroker.core.journal), so its MAC input is its line without the ``mac``
member, and only the records of the Privacy service are parsed. About 1 GB of journal per few
seconds; a line that is not in that form is checked the slow way before it is refused.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from pathlib import Path

from keybroker.adapters.journal import ChainLines
from keybroker.adapters.journal_archive import registered_chains
from keybroker.core import journal as jf
from keybroker.core.privacy_replay import PRIVACY_SERVICE, JournaledDecision

_MAC = b',"mac":"'
_PREV = b',"prev":"'
_SEQ = b',"seq":'
_MARK = b'"service":"' + PRIVACY_SERVICE.encode() + b'"'


def chains(root: Path) -> list[Path]:
    """The chain directories under a journal directory (``[audit] dir``)."""
    return sorted(p for p in root.glob("w*") if p.is_dir())


def _fast(key: bytes, raw: bytes) -> tuple[int, str, str] | None:
    """``(seq, prev, mac)`` of a canonical line whose MAC verifies, else None."""
    line = raw.rstrip(b"\n")
    i = line.rfind(_MAC)
    if i < 0 or line[i + 72 : i + 73] != b'"':
        return None
    mac = line[i + 8 : i + 72]
    tail = line[i + 73 :]
    if not tail.startswith(_PREV) or tail[73:74] != b'"':
        return None
    expected = hmac.digest(key, line[:i] + tail, "sha256").hex().encode()
    if not hmac.compare_digest(expected, mac):
        return None
    j = tail.find(_SEQ)
    end = tail.find(b",", j + 1)
    try:
        seq = int(tail[j + len(_SEQ) : end])
    except ValueError:
        return None
    return seq, tail[9:73].decode(), mac.decode()


def _slow(key: bytes, raw: bytes) -> tuple[int, str, str] | None:
    try:
        data = jf.parse_line(raw)
        mac = str(data.pop("mac"))
        seq, prev = int(data["seq"]), str(data["prev"])
    except (ValueError, KeyError, TypeError):
        return None
    return (seq, prev, mac) if hmac.compare_digest(jf.mac_of(key, data), mac) else None


def privacy_decisions(root: Path, chain_key: bytes) -> Iterator[JournaledDecision]:
    """Every decision record of the Privacy service in every chain under ``root``, chain by
    chain; raises :class:`keybroker.core.journal.ChainError` at the first defect of any chain
    (before or after privacy records: the whole chain must verify), or when a chain the register
    lists (``chains.jsonl``) has no directory any more."""
    present = chains(root)
    for name in sorted(set(registered_chains(root) or ()) - {c.name for c in present}):
        raise jf.ChainError(name, f"chain directory {root / name} is missing")
    for chain in present:
        prev: str | None = None
        expected: int | None = None
        for where, raw in ChainLines(chain):
            place = f"{chain.name}/{where}"
            checked = _fast(chain_key, raw) or _slow(chain_key, raw)
            if checked is None:
                raise jf.ChainError(place, "record fails verification (modified or forged)")
            seq, link, mac = checked
            if expected is None:
                if seq == 1 and link != jf.GENESIS:
                    raise jf.ChainError(place, "record 1 does not start a chain")
            elif seq != expected:
                raise jf.ChainError(place, f"expected record {expected}, found {seq}")
            elif link != prev:
                raise jf.ChainError(place, f"record {seq} does not follow record {seq - 1}")
            prev, expected = mac, seq + 1
            if _MARK not in raw:
                continue
            body = jf.parse_line(raw)
            if body.get("kind") != jf.KIND_DECISION or not isinstance(body.get("d"), dict):
                continue
            decision = jf.decision_from_dict(body["d"])
            if decision.service == PRIVACY_SERVICE:
                yield JournaledDecision(place, int(body["ts"]), decision)
