"""Where a journal's records went: archive records per chain, and the register of chains.

**Archive records** (``w<N>/archive.jsonl``): journal files are rotated, never rewritten; old files
are archived or deleted only by ``keybroker audit archive``, which first appends an archive record
naming the file, its range of records (``first``..``last``), the MAC of its last record
(``head``), its SHA-256, what was done (``archived`` to a place, ``deleted``) and when, and only
then moves or deletes the file. A range removed before this existed can be acknowledged as
``missing``. Each archive record is chained like the journal (``n`` = 1, 2, …, ``prev`` = the
previous record's ``mac``, ``mac`` = HMAC-SHA256 with the chain key) and signed by the checkpoint
key (``sig`` over ``keybroker-archive:`` + the canonical record without ``sig`` and ``mac``), so
``audit verify`` can tell "records 1..40 were archived on … to …" from "records 1..40 are gone".

**Register of chains** (``chains.jsonl`` beside the ``w<N>`` directories): each worker's journal
adds its chain's name the first time it opens it, so a worker directory that disappears later is
reported missing by ``audit verify`` instead of passing unseen.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keybroker.adapters.files import FILE_MODE, private_dir
from keybroker.core import journal as jf

ARCHIVE = "archive.jsonl"
CHAINS = "chains.jsonl"
ARCHIVED, DELETED, MISSING = "archived", "deleted", "missing"


def archive_message(body: dict[str, Any]) -> bytes:
    return b"keybroker-archive:" + jf.canonical(body)


@dataclass(frozen=True)
class ArchiveRecord:
    n: int
    action: str
    first: int
    last: int
    head: str
    ts: int
    file: str
    to: str
    by: str
    mac: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.ts / 1e9))
        what = {ARCHIVED: f"archived to {self.to}", DELETED: "deleted"}.get(
            self.action, "recorded as missing"
        )
        return f"records {self.first}..{self.last} {what} by {self.by} at {when}"


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_durably(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_dir(path.parent)


# -- the register of chains -----------------------------------------------------------------


def registered_chains(root: Path) -> list[str] | None:
    """Chain names in ``root/chains.jsonl``; None when there is no register (older journals)."""
    path = root / CHAINS
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    names: list[str] = []
    for line in raw.splitlines():
        try:
            name = str(jf.parse_line(line)["chain"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn append; verify reports missing directories, not this file
        if name not in names:
            names.append(name)
    return names


def register_chain(directory: Path) -> None:
    """Add ``directory``'s chain to its parent's register unless it is listed already."""
    root, name = directory.parent, directory.name
    if name in (registered_chains(root) or []):
        return
    _append_durably(root / CHAINS, jf.canonical({"chain": name, "ts": time.time_ns()}) + b"\n")


# -- archive records ------------------------------------------------------------------------


def read_archive(
    chain: Path, key: bytes, check_signature: jf.SignatureCheck
) -> list[ArchiveRecord]:
    """The chain's archive records, verified; raises ChainError naming the line of a defect."""
    path = chain / ARCHIVE
    if not path.exists():
        return []
    out: list[ArchiveRecord] = []
    prev = jf.GENESIS
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{ARCHIVE}:{number}"
        try:
            body = jf.parse_line(raw)
            mac = str(body.pop("mac"))
            sig_hex = str(body.pop("sig"))
            sig = bytes.fromhex(sig_hex)
            record = ArchiveRecord(
                n=int(body["n"]),
                action=str(body["action"]),
                first=int(body["first"]),
                last=int(body["last"]),
                head=str(body["head"]),
                ts=int(body["ts"]),
                file=str(body.get("file", "")),
                to=str(body.get("to", "")),
                by=str(body.get("by", "")),
                mac=mac,
            )
        except (ValueError, KeyError, TypeError):
            raise jf.ChainError(where, "unreadable archive record (modified or torn)") from None
        if not hmac.compare_digest(jf.mac_of(key, {**body, "sig": sig_hex}), mac):
            raise jf.ChainError(where, f"archive record {record.n} was modified (MAC mismatch)")
        if record.n != number or body.get("prev") != prev:
            raise jf.ChainError(
                where, f"archive record {number} missing or out of order (found {record.n})"
            )
        if not check_signature(archive_message(body), sig):
            raise jf.ChainError(where, f"archive record {record.n}: signature invalid")
        expected = out[-1].last + 1 if out else 1
        if record.first != expected or record.last < record.first:
            raise jf.ChainError(
                where, f"archive record {record.n} starts at record {record.first}, not {expected}"
            )
        out.append(record)
        prev = mac
    return out


def append_archive_record(
    chain: Path,
    key: bytes,
    sign: Callable[[bytes], bytes],
    *,
    action: str,
    first: int,
    last: int,
    head: str,
    file: str = "",
    sha256: str = "",
    to: str = "",
    reason: str = "",
) -> None:
    """Append one signed, chained archive record, durably (before the file is touched)."""
    previous = _last_archive_line(chain)
    body: dict[str, Any] = {
        "v": 1,
        "n": previous[0] + 1,
        "prev": previous[1],
        "action": action,
        "chain": chain.name,
        "first": first,
        "last": last,
        "head": head,
        "ts": time.time_ns(),
        "by": _who(),
    }
    body.update({k: v for k, v in (("file", file), ("sha256", sha256), ("to", to)) if v})
    if reason:
        body["reason"] = reason
    signed = {**body, "sig": sign(archive_message(body)).hex()}
    line = jf.canonical({**signed, "mac": jf.mac_of(key, signed)}) + b"\n"
    _append_durably(chain / ARCHIVE, line)


def _last_archive_line(chain: Path) -> tuple[int, str]:
    path = chain / ARCHIVE
    if not path.exists():
        return 0, jf.GENESIS
    lines = path.read_bytes().splitlines()
    if not lines:
        return 0, jf.GENESIS
    last = jf.parse_line(lines[-1])
    return int(last["n"]), str(last["mac"])


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


# -- archiving ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRange:
    path: Path
    first: int
    last: int
    head: str
    last_ts: int
    sha256: str


def file_ranges(
    files: Iterable[Path], key: bytes, check_signature: jf.SignatureCheck, after: str | None
) -> list[FileRange]:
    """Verify ``files`` (whole, consecutive journal files) as one piece of chain following the
    record whose MAC is ``after`` (None: no constraint); their ranges. Raises ChainError."""
    out: list[FileRange] = []
    expected_prev = after
    for path in files:
        data = path.read_bytes().rstrip(b"\0")
        lines = [(f"{path.name}:{n}", raw) for n, raw in enumerate(data.splitlines(True), 1)]
        records = list(jf.verify(key, lines, check_signature=check_signature))
        if not records:
            continue
        if expected_prev is not None and records[0].prev != expected_prev:
            raise jf.ChainError(
                f"{path.name}:1", f"record {records[0].seq} does not follow the archived records"
            )
        if out and records[0].seq != out[-1].last + 1:
            raise jf.ChainError(f"{path.name}:1", f"expected record {out[-1].last + 1}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out.append(
            FileRange(
                path, records[0].seq, records[-1].seq, records[-1].mac, records[-1].ts, digest
            )
        )
        expected_prev = records[-1].mac
    return out


def move_durably(source: Path, target: Path, sha256: str) -> None:
    """Copy ``source`` to ``target`` (0600, flushed, checked against ``sha256``), then remove
    ``source``."""
    private_dir(target.parent)
    if target.exists():
        raise FileExistsError(f"{target} exists; refusing to overwrite an archived file")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "wb") as out, source.open("rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    _sync_dir(target.parent)
    if hashlib.sha256(target.read_bytes()).hexdigest() != sha256:
        raise OSError(f"{target}: the copy differs from {source}; {source} kept")
    source.unlink()
    _sync_dir(source.parent)


def delete_durably(source: Path) -> None:
    source.unlink()
    _sync_dir(source.parent)
