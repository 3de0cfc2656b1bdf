"""The privacy changes in the audit journal, for privacy replay (keybroker.core.privacy_replay).

Reads every chain (``w<N>``) under a journal directory and checks each whole chain as it goes:
every record's MAC (the chain key), the sequence numbers and the links, so a record cannot be
forged, changed, removed or reordered without the replay refusing the journal; a chain listed in
the register of chains that has disappeared is refused too. A chain may start after record 1
(older files archived, see keybroker.adapters.journal_archive); the torn last record a crash
leaves is skipped (it was never acknowledged).

The check is made for speed, not by parsing every record: a record is the canonical JSON
the journal writes (keybroker.core.journal), so its MAC input is its line without the ``mac``
member, and only the records of the Privacy service are parsed (about 10 µs of CPU per record on
the reference machine); a line that is not in that form is checked the slow way before it is
refused.

**Verified so far** (``privacy-replay.json`` beside the chains): where each chain was verified up
to (file, byte range, sequence number and MAC of its last record) and every privacy record found
before that point, under an HMAC with the chain key. The next replay checks that the last
verified record is still there, unchanged, and verifies only what follows, so a start reads the
journal written since the previous one, not all of it. Privacy records of files archived since
are kept in it. A file that is missing, stale or fails its MAC is ignored: the chains are then
read in full (and the records it holds are not used).
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keybroker.adapters.files import FILE_MODE
from keybroker.adapters.journal import journal_files
from keybroker.adapters.journal_archive import registered_chains
from keybroker.core import journal as jf
from keybroker.core.privacy_replay import PRIVACY_SERVICE, JournaledDecision

VERIFIED = "privacy-replay.json"
_VERSION = 1
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


def _check(key: bytes, raw: bytes) -> tuple[int, str, str] | None:
    return _fast(key, raw) or _slow(key, raw)


@dataclass(frozen=True)
class Position:
    """The last verified record of a chain: its file, byte range, sequence number and MAC."""

    file: str
    start: int
    end: int
    seq: int
    mac: str


@dataclass
class Verified:
    positions: dict[str, Position]
    records: list[JournaledDecision]


def _record_to_json(r: JournaledDecision) -> dict[str, Any]:
    return {"where": r.where, "ts": r.ts, "d": jf.decision_to_dict(r.decision)}


def load_verified(root: Path, key: bytes) -> Verified:
    """What earlier replays verified (empty if there is nothing trustworthy)."""
    empty = Verified({}, [])
    try:
        data = json.loads((root / VERIFIED).read_bytes())
        mac = str(data.pop("mac"))
        if data.get("v") != _VERSION or not hmac.compare_digest(jf.mac_of(key, data), mac):
            return empty
        positions = {name: Position(**p) for name, p in data["positions"].items()}
        records = [
            JournaledDecision(str(r["where"]), int(r["ts"]), jf.decision_from_dict(r["d"]))
            for r in data["records"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return empty
    return Verified(positions, records)


def save_verified(root: Path, key: bytes, verified: Verified) -> None:
    """Write atomically (a temporary file renamed over the old one), mode 0600."""
    body: dict[str, Any] = {
        "v": _VERSION,
        "positions": {name: vars(p) for name, p in sorted(verified.positions.items())},
        "records": [_record_to_json(r) for r in verified.records],
    }
    data = jf.canonical({**body, "mac": jf.mac_of(key, body)})
    tmp = root / f".{VERIFIED}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(root / VERIFIED)


def _resume(chain: Path, key: bytes, pos: Position) -> tuple[list[Path], int] | None:
    """The files left to read and the offset in the first, after ``pos`` if it still holds."""
    files = journal_files(chain)
    names = [f.name for f in files]
    if pos.file not in names:
        return None
    path = chain / pos.file
    try:
        with path.open("rb") as fh:
            fh.seek(pos.start)
            raw = fh.read(pos.end - pos.start)
    except OSError:
        return None
    checked = _check(key, raw) if raw.endswith(b"\n") else None
    if checked is None or checked[0] != pos.seq or checked[2] != pos.mac:
        return None
    return files[names.index(pos.file) :], pos.end


def _lines(files: list[Path], offset: int) -> Iterator[tuple[str, int, int, bytes]]:
    """``(file name, start, end, line)`` from ``offset`` in the first file on; stops at the
    zeroed space after the last record and before a torn last line of the newest file."""
    for index, path in enumerate(files):
        newest = index == len(files) - 1
        with path.open("rb") as fh:
            position = offset if index == 0 else 0
            fh.seek(position)
            for raw in fh:
                if raw.startswith(b"\0"):
                    break
                if newest and not raw.endswith(b"\n"):
                    break  # a torn write: never acknowledged
                yield path.name, position, position + len(raw), raw
                position += len(raw)


def _chain_records(
    chain: Path, key: bytes, pos: Position | None
) -> tuple[list[JournaledDecision], Position | None]:
    """Verify the chain after ``pos`` (all of it if ``pos`` no longer holds)."""
    resumed = None if pos is None else _resume(chain, key, pos)
    files, offset = resumed or (journal_files(chain), 0)
    prev: str | None = None
    expected: int | None = None
    last: Position | None = None
    if resumed is not None and pos is not None:
        prev, expected, last = pos.mac, pos.seq + 1, pos
    found: list[JournaledDecision] = []
    for name, start, end, raw in _lines(files, offset):
        place = f"{chain.name}/{name} at byte {start}"
        checked = _check(key, raw)
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
        last = Position(name, start, end, seq, mac)
        if _MARK not in raw:
            continue
        body = jf.parse_line(raw)
        if body.get("kind") != jf.KIND_DECISION or not isinstance(body.get("d"), dict):
            continue
        decision = jf.decision_from_dict(body["d"])
        if decision.service == PRIVACY_SERVICE:
            where = f"{chain.name}/{name} record {seq}"
            found.append(JournaledDecision(where, int(body["ts"]), decision))
    return found, last


def privacy_decisions(
    root: Path, chain_key: bytes, *, remember: bool = True
) -> list[JournaledDecision]:
    """Every decision record of the Privacy service in every chain under ``root`` (those
    verified by earlier replays included); raises :class:`keybroker.core.journal.ChainError`
    at the first defect of any chain (before or after privacy records: the whole chain must
    verify), or when a chain the register lists (``chains.jsonl``) has no directory any more.
    ``remember``: write what was verified to ``privacy-replay.json`` for the next replay."""
    present = chains(root)
    for name in sorted(set(registered_chains(root) or ()) - {c.name for c in present}):
        raise jf.ChainError(name, f"chain directory {root / name} is missing")
    verified = load_verified(root, chain_key)
    records = list(verified.records)
    seen = {(r.where, r.ts) for r in records}
    positions = dict(verified.positions)
    for chain in present:
        found, last = _chain_records(chain, chain_key, positions.get(chain.name))
        for r in found:
            if (r.where, r.ts) not in seen:
                seen.add((r.where, r.ts))
                records.append(r)
        if last is not None:
            positions[chain.name] = last
    if remember and present:
        save_verified(root, chain_key, Verified(positions, records))
    return records
