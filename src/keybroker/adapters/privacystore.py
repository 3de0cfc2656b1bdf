"""Privacy state in the metadata database: the recording registry, erasures, legal holds, and
which replica has loaded which privacy generation.

Every change takes one database-wide privacy lock (PostgreSQL advisory lock; SQLite's writer
lock), so erasure sequence numbers commit in order and a replica loading "every erasure after
the last one I saw" never skips one. Changes bump ``kb_meta.privacy_generation`` and notify.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from keybroker.adapters.sqldb import Cursor, Database
from keybroker.core.keys import VersionState
from keybroker.core.privacy import Erasure, Hold, RecordingEntry, Target
from keybroker.core.retention import HOLD_SUFFIX
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import FailedPreconditionError

T = TypeVar("T")

_PRIVACY_LOCK_ID = 7_274_512
_LIVE = (
    VersionState.ENABLED.value,
    VersionState.DECRYPT_ONLY.value,
    VersionState.DISABLED.value,
    VersionState.SCHEDULED_FOR_DESTRUCTION.value,
)


def _entry(row: Sequence[Any], subjects: tuple[str, ...]) -> RecordingEntry:
    return RecordingEntry(
        recording_id=row[0],
        subject_ids=subjects,
        purposes=tuple(json.loads(row[1])),
        retain_until=float(row[2]),
        key=KeyRef(row[3], int(row[4])),
        created_at=float(row[5]),
        erased_at=row[6],
    )


def _erasure(row: Sequence[Any], *, already: bool = False) -> Erasure:
    return Erasure(
        seq=int(row[0]),
        kind=Target(row[1]),
        target=row[2],
        reason=row[3],
        erased_by=row[4],
        erased_at=float(row[5]),
        recordings=int(row[6]),
        already_erased=already,
    )


_ERASURE_COLUMNS = "seq, kind, target, reason, erased_by, erased_at, recordings"
_HELD = (  # SQL: recording r is under legal hold, directly or through one of its subjects
    "(EXISTS (SELECT 1 FROM kb_holds h WHERE h.kind = 'recording' AND h.target = r.recording_id) "
    "OR EXISTS (SELECT 1 FROM kb_holds h JOIN kb_recording_subjects s ON h.kind = 'subject' "
    "AND h.target = s.subject_id WHERE s.recording_id = r.recording_id))"
)
_RECORDING_COLUMNS = (
    "recording_id, purposes, retain_until, key_name, key_version, created_at, erased_at"
)
_R_COLUMNS = ", ".join(f"r.{c}" for c in _RECORDING_COLUMNS.split(", "))


class SqlPrivacyStore:
    """Implements :class:`keybroker.core.privacy.PrivacyStore` on a :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _run(self, fn: Callable[[Cursor], T], *, write: bool) -> T:
        return self._db.run(fn, write=write)

    def close(self) -> None:
        self._db.close()

    def _changed(self, cur: Cursor) -> None:
        cur.execute("UPDATE kb_meta SET privacy_generation = privacy_generation + 1 WHERE id = 1")
        self._db.dialect.notify(cur)

    # -- registry ----------------------------------------------------------------------------

    def register(self, entries: Sequence[RecordingEntry]) -> list[str]:
        """Register recordings and append their wrapped keys; returns the ids of new
        registrations refused because the id was registered already.

        A recording id is registered once: its first registration sets its subjects, purposes
        and retention for good (a second GenerateDataKey with the same id, which two replicas
        can only race within their refresh interval, changes none of them). Every wrapped key
        handed out is appended to ``kb_recording_keys`` and never changed, so a legal hold keeps
        all of them. An amendment (AmendPurposes, the audited path) appends its key and updates
        the recording's purposes and current key."""
        if not entries:
            return []

        def write(cur: Cursor) -> list[str]:
            self._db.dialect.lock(cur, _PRIVACY_LOCK_ID)  # key rows commit in seq order
            ids = list(dict.fromkeys(e.recording_id for e in entries))
            known: set[str] = set()
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                cur.execute(
                    f"SELECT recording_id FROM kb_recordings WHERE recording_id IN ({marks})",  # noqa: S608
                    chunk,
                )
                known.update(r[0] for r in cur.fetchall())
            fresh: list[RecordingEntry] = []
            amended: dict[str, RecordingEntry] = {}
            conflicts: list[str] = []
            for e in entries:
                if e.recording_id not in known:
                    known.add(e.recording_id)
                    fresh.append(e)
                elif e.amendment:
                    amended[e.recording_id] = e  # the latest amendment wins
                else:
                    conflicts.append(e.recording_id)
            if fresh:
                cur.executemany(
                    f"INSERT INTO kb_recordings ({_RECORDING_COLUMNS}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?, NULL)",
                    [
                        (
                            e.recording_id,
                            json.dumps(list(e.purposes)),
                            e.retain_until,
                            e.key.name,
                            e.key.version,
                            e.created_at,
                        )
                        for e in fresh
                    ],
                )
                subjects = [(s, e.recording_id) for e in fresh for s in e.subject_ids]
                if subjects:
                    cur.executemany(
                        "INSERT INTO kb_recording_subjects (subject_id, recording_id) "
                        "VALUES (?, ?) ON CONFLICT DO NOTHING",
                        subjects,
                    )
            if amended:
                cur.executemany(
                    "UPDATE kb_recordings SET purposes = ?, key_name = ?, key_version = ? "
                    "WHERE recording_id = ?",
                    [
                        (json.dumps(list(e.purposes)), e.key.name, e.key.version, e.recording_id)
                        for e in amended.values()
                    ],
                )
            keys = [
                (e.recording_id, e.key.name, e.key.version, e.wrapped_key, e.created_at)
                for e in entries
                if e.wrapped_key
            ]
            if keys:
                cur.executemany(
                    "INSERT INTO kb_recording_keys (recording_id, key_name, key_version, "
                    "wrapped_key, registered_at) VALUES (?, ?, ?, ?, ?)",
                    keys,
                )
            return conflicts

        return self._run(write, write=True)

    def is_registered(self, recording_id: str) -> bool:
        def read(cur: Cursor) -> bool:
            cur.execute("SELECT 1 FROM kb_recordings WHERE recording_id = ?", (recording_id,))
            return cur.fetchone() is not None

        return self._run(read, write=False)

    def registered_ids(self, after: str | None, limit: int) -> list[str]:
        """Registered recording ids in id order after ``after`` (the first load of the cache)."""

        def read(cur: Cursor) -> list[str]:
            if after is None:
                cur.execute(
                    "SELECT recording_id FROM kb_recordings ORDER BY recording_id LIMIT ?",
                    (limit,),
                )
            else:
                cur.execute(
                    "SELECT recording_id FROM kb_recordings WHERE recording_id > ? "
                    "ORDER BY recording_id LIMIT ?",
                    (after, limit),
                )
            return [str(r[0]) for r in cur.fetchall()]

        return self._run(read, write=False)

    def last_key_seq(self) -> int:
        def read(cur: Cursor) -> int:
            cur.execute("SELECT MAX(seq) FROM kb_recording_keys")
            row = cur.fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        return self._run(read, write=False)

    def registrations_since(self, seq: int, limit: int) -> list[tuple[int, str]]:
        """``(seq, recording id)`` of the wrapped keys registered after ``seq``."""

        def read(cur: Cursor) -> list[tuple[int, str]]:
            cur.execute(
                "SELECT seq, recording_id FROM kb_recording_keys WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (seq, limit),
            )
            return [(int(r[0]), str(r[1])) for r in cur.fetchall()]

        return self._run(read, write=False)

    def recordings_of(self, subject_id: str) -> list[RecordingEntry]:
        def read(cur: Cursor) -> list[RecordingEntry]:
            cur.execute(
                f"SELECT {_RECORDING_COLUMNS} FROM kb_recordings WHERE recording_id IN "  # noqa: S608
                "(SELECT recording_id FROM kb_recording_subjects WHERE subject_id = ?) "
                "ORDER BY created_at, recording_id",
                (subject_id,),
            )
            rows = cur.fetchall()
            return [_entry(row, self._subjects(cur, row[0])) for row in rows]

        return self._run(read, write=False)

    def recording(self, recording_id: str) -> RecordingEntry | None:
        def read(cur: Cursor) -> RecordingEntry | None:
            cur.execute(
                f"SELECT {_RECORDING_COLUMNS} FROM kb_recordings WHERE recording_id = ?",  # noqa: S608
                (recording_id,),
            )
            row = cur.fetchone()
            return None if row is None else _entry(row, self._subjects(cur, recording_id))

        return self._run(read, write=False)

    def wrapped_keys(self, recording_id: str) -> list[bytes]:
        """Every wrapped key registered for the recording, oldest first."""

        def read(cur: Cursor) -> list[bytes]:
            cur.execute(
                "SELECT wrapped_key FROM kb_recording_keys WHERE recording_id = ? ORDER BY seq",
                (recording_id,),
            )
            return [bytes(r[0]) for r in cur.fetchall()]

        return self._run(read, write=False)

    def held_recordings(self, key_name: str) -> list[RecordingEntry]:
        """Every wrapped key under ``key_name`` of a recording under legal hold (directly or by
        a subject), not erased, and not yet copied to the hold key; one entry per key."""

        def read(cur: Cursor) -> list[RecordingEntry]:
            cur.execute(
                f"SELECT {_R_COLUMNS}, k.wrapped_key, k.seq, k.key_name, k.key_version "  # noqa: S608
                "FROM kb_recording_keys k JOIN kb_recordings r "
                "ON r.recording_id = k.recording_id WHERE k.key_name = ? "
                f"AND r.erased_at IS NULL AND k.held_wrapped_key IS NULL AND {_HELD} "
                "ORDER BY k.seq",
                (key_name,),
            )
            rows = cur.fetchall()
            out = []
            for row in rows:
                entry = _entry(row, self._subjects(cur, row[0]))
                out.append(
                    RecordingEntry(
                        entry.recording_id,
                        entry.subject_ids,
                        entry.purposes,
                        entry.retain_until,
                        KeyRef(row[9], int(row[10])),
                        entry.created_at,
                        entry.erased_at,
                        bytes(row[7]),
                        seq=int(row[8]),
                    )
                )
            return out

        return self._run(read, write=False)

    def held_under(self, key_name: str, version: int | None) -> int:
        """Wrapped keys under ``key_name`` (``version``, or any) of recordings under legal hold,
        not erased; for a hold key, the hold copies it keeps for recordings still held."""
        base = key_name.removesuffix(HOLD_SUFFIX)
        hold = base != key_name

        def read(cur: Cursor) -> int:
            sql = (
                "SELECT COUNT(*) FROM kb_recording_keys k JOIN kb_recordings r "  # noqa: S608
                f"ON r.recording_id = k.recording_id WHERE k.key_name = ? AND {_HELD} "
                "AND r.erased_at IS NULL"
            )
            params: list[Any] = [base]
            if hold:
                sql += " AND k.held_wrapped_key IS NOT NULL"
            elif version is not None:
                sql += " AND k.key_version = ?"
                params.append(version)
            cur.execute(sql, params)
            row = cur.fetchone()
            return int(row[0]) if row else 0

        return self._run(read, write=False)

    def claim_shred_unless_held(self, key_name: str, now: float) -> list[int] | None:
        """Every live version of the epoch key ``key_name`` -> DESTROYING, in one transaction
        with the check that no held recording under it still lacks its hold copy (None then:
        a hold came in after the copies were made; move it first). Holds are placed under the
        same lock, so a hold either is seen here or comes after the key is claimed."""

        def write(cur: Cursor) -> list[int] | None:
            self._db.dialect.lock(cur, _PRIVACY_LOCK_ID)
            cur.execute(
                "SELECT COUNT(*) FROM kb_recording_keys k JOIN kb_recordings r "  # noqa: S608
                "ON r.recording_id = k.recording_id WHERE k.key_name = ? "
                f"AND r.erased_at IS NULL AND k.held_wrapped_key IS NULL AND {_HELD}",
                (key_name,),
            )
            if int(cur.fetchone()[0]):
                return None
            self._db.dialect.lock_key(cur, key_name)
            cur.execute(
                "SELECT version FROM kb_key_versions WHERE name = ? AND state IN (?, ?, ?, ?) "
                "ORDER BY version",
                (key_name, *_LIVE),
            )
            versions = [int(r[0]) for r in cur.fetchall()]
            if versions:
                cur.execute(
                    "UPDATE kb_key_versions SET state = ?, updated_at = ? "
                    "WHERE name = ? AND state IN (?, ?, ?, ?)",
                    (VersionState.DESTROYING.value, now, key_name, *_LIVE),
                )
                cur.execute("UPDATE kb_meta SET generation = generation + 1 WHERE id = 1")
                self._db.dialect.notify(cur)
            return versions

        return self._run(write, write=True)

    def store_hold_copy(self, seq: int, wrapped_key: bytes) -> None:
        def write(cur: Cursor) -> None:
            cur.execute(
                "UPDATE kb_recording_keys SET held_wrapped_key = ? WHERE seq = ?",
                (wrapped_key, seq),
            )

        self._run(write, write=True)

    def drop_released_hold_copies(self, key_name: str) -> int:
        def write(cur: Cursor) -> int:
            cur.execute(
                "UPDATE kb_recording_keys SET held_wrapped_key = NULL "  # noqa: S608 - constants
                "WHERE key_name = ? AND held_wrapped_key IS NOT NULL AND EXISTS (SELECT 1 "
                "FROM kb_recordings r WHERE r.recording_id = kb_recording_keys.recording_id "
                f"AND (r.erased_at IS NOT NULL OR NOT ({_HELD})))",
                (key_name,),
            )
            return int(cur.rowcount or 0)

        count: int = self._run(write, write=True)
        return count

    def count_hold_copies(self, key_name: str) -> int:
        def read(cur: Cursor) -> int:
            cur.execute(
                "SELECT COUNT(*) FROM kb_recording_keys "
                "WHERE key_name = ? AND held_wrapped_key IS NOT NULL",
                (key_name,),
            )
            row = cur.fetchone()
            return int(row[0]) if row else 0

        count: int = self._run(read, write=False)
        return count

    def hold_copies(self, recording_id: str) -> list[bytes]:
        """The recording's wrapped keys moved to the hold key, if any were."""

        def read(cur: Cursor) -> list[bytes]:
            cur.execute(
                "SELECT held_wrapped_key FROM kb_recording_keys "
                "WHERE recording_id = ? AND held_wrapped_key IS NOT NULL ORDER BY seq",
                (recording_id,),
            )
            return [bytes(r[0]) for r in cur.fetchall()]

        return self._run(read, write=False)

    @staticmethod
    def _subjects(cur: Cursor, recording_id: str) -> tuple[str, ...]:
        cur.execute(
            "SELECT subject_id FROM kb_recording_subjects WHERE recording_id = ? "
            "ORDER BY subject_id",
            (recording_id,),
        )
        return tuple(r[0] for r in cur.fetchall())

    # -- erasure -----------------------------------------------------------------------------

    def erase(
        self, kind: Target, target: str, *, reason: str, erased_by: str, now: float
    ) -> Erasure:
        def write(cur: Cursor) -> Erasure:
            self._db.dialect.lock(cur, _PRIVACY_LOCK_ID)
            cur.execute(
                f"SELECT {_ERASURE_COLUMNS} FROM kb_erasures WHERE kind = ? AND target = ?",  # noqa: S608
                (kind.value, target),
            )
            existing = cur.fetchone()
            if existing is not None:
                return _erasure(existing, already=True)
            self._refuse_if_held(cur, kind, target)
            return self._tombstone(cur, kind, target, reason=reason, erased_by=erased_by, now=now)

        return self._run(write, write=True)

    def restore_erasure(
        self,
        kind: Target,
        target: str,
        *,
        reason: str,
        erased_by: str,
        erased_at: float,
        check_holds: bool,
    ) -> Erasure | None:
        """Privacy replay (keybroker.core.privacy_replay): the tombstone of an erasure the
        journal holds, unless the database has it (None then)."""

        def write(cur: Cursor) -> Erasure | None:
            self._db.dialect.lock(cur, _PRIVACY_LOCK_ID)
            cur.execute(
                "SELECT 1 FROM kb_erasures WHERE kind = ? AND target = ?", (kind.value, target)
            )
            if cur.fetchone() is not None:
                return None
            if check_holds:
                self._refuse_if_held(cur, kind, target)
            return self._tombstone(
                cur, kind, target, reason=reason, erased_by=erased_by, now=erased_at
            )

        result: Erasure | None = self._run(write, write=True)
        return result

    def erased_targets(self) -> set[tuple[str, str]]:
        def read(cur: Cursor) -> set[tuple[str, str]]:
            cur.execute("SELECT kind, target FROM kb_erasures")
            return {(str(r[0]), str(r[1])) for r in cur.fetchall()}

        result: set[tuple[str, str]] = self._run(read, write=False)
        return result

    def _tombstone(
        self, cur: Cursor, kind: Target, target: str, *, reason: str, erased_by: str, now: float
    ) -> Erasure:
        """Mark the covered recordings erased and insert the tombstone (under the lock)."""
        if kind is Target.RECORDING:
            cur.execute(
                "UPDATE kb_recordings SET erased_at = ? "
                "WHERE recording_id = ? AND erased_at IS NULL",
                (now, target),
            )
            covered = 1
        else:
            cur.execute(
                "UPDATE kb_recordings SET erased_at = ? WHERE erased_at IS NULL AND "
                "recording_id IN (SELECT recording_id FROM kb_recording_subjects "
                "WHERE subject_id = ?)",
                (now, target),
            )
            cur.execute(
                "SELECT COUNT(*) FROM kb_recording_subjects WHERE subject_id = ?", (target,)
            )
            covered = int(cur.fetchone()[0])
        cur.execute(
            "INSERT INTO kb_erasures (kind, target, reason, erased_by, erased_at, recordings) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (kind.value, target, reason, erased_by, now, covered),
        )
        cur.execute(
            f"SELECT {_ERASURE_COLUMNS} FROM kb_erasures WHERE kind = ? AND target = ?",  # noqa: S608
            (kind.value, target),
        )
        row = cur.fetchone()
        self._changed(cur)
        return _erasure(row)

    def _refuse_if_held(self, cur: Cursor, kind: Target, target: str) -> None:
        """A hold on the target, on the recording's subjects, or on the subject's recordings."""
        if kind is Target.RECORDING:
            cur.execute(
                "SELECT kind, target FROM kb_holds WHERE (kind = 'recording' AND target = ?) "
                "OR (kind = 'subject' AND target IN (SELECT subject_id FROM "
                "kb_recording_subjects WHERE recording_id = ?))",
                (target, target),
            )
        else:
            cur.execute(
                "SELECT kind, target FROM kb_holds WHERE (kind = 'subject' AND target = ?) "
                "OR (kind = 'recording' AND target IN (SELECT recording_id FROM "
                "kb_recording_subjects WHERE subject_id = ?))",
                (target, target),
            )
        held = cur.fetchone()
        if held is not None:
            what = (
                "this recording"
                if held[0] == kind.value and held[1] == target
                else (f"a {held[0]} it covers")
            )
            raise FailedPreconditionError(
                f"under legal hold ({what}); release the hold before erasing",
                reason="legal_hold",
            )

    def erasure_targets_since(self, seq: int, limit: int) -> list[tuple[int, str, str]]:
        """``(seq, kind, target)`` of the erasures after ``seq`` (what the hot path loads)."""

        def read(cur: Cursor) -> list[tuple[int, str, str]]:
            cur.execute(
                "SELECT seq, kind, target FROM kb_erasures WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            )
            return [(int(r[0]), str(r[1]), str(r[2])) for r in cur.fetchall()]

        return self._run(read, write=False)

    def erasure_counts(self) -> dict[str, int]:
        """Erasures per kind (to size the cache before loading)."""

        def read(cur: Cursor) -> dict[str, int]:
            cur.execute("SELECT kind, COUNT(*) FROM kb_erasures GROUP BY kind")
            return {str(r[0]): int(r[1]) for r in cur.fetchall()}

        return self._run(read, write=False)

    # -- legal holds -------------------------------------------------------------------------

    def place_hold(self, hold: Hold) -> None:
        def write(cur: Cursor) -> None:
            self._db.dialect.lock(cur, _PRIVACY_LOCK_ID)
            cur.execute(
                "SELECT 1 FROM kb_holds WHERE kind = ? AND target = ?",
                (hold.kind.value, hold.target),
            )
            if cur.fetchone() is not None:
                raise FailedPreconditionError(
                    f"{hold.kind.value} is already under legal hold", reason="already_held"
                )
            cur.execute(
                "SELECT 1 FROM kb_erasures WHERE kind = ? AND target = ?",
                (hold.kind.value, hold.target),
            )
            if cur.fetchone() is not None:
                raise FailedPreconditionError(
                    f"{hold.kind.value} is erased; there is nothing left to hold", reason="erased"
                )
            if hold.kind is Target.RECORDING:
                self._refuse_if_shredded(cur, hold.target)
            cur.execute(
                "INSERT INTO kb_holds (kind, target, reason, placed_by, placed_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (hold.kind.value, hold.target, hold.reason, hold.placed_by, hold.placed_at),
            )
            self._changed(cur)

        self._run(write, write=True)

    @staticmethod
    def _refuse_if_shredded(cur: Cursor, recording_id: str) -> None:
        """A hold must protect something: refuse it when every registered key of the recording
        is under a version being destroyed or destroyed, with no hold copy (its retention and
        grace period are over and the shredder claimed its epoch key first: the claim and this
        check run under the same lock, so a hold is either honoured or refused, never lost)."""
        cur.execute(
            "SELECT COUNT(*), SUM(CASE WHEN v.state IN (?, ?) AND k.held_wrapped_key IS NULL "
            "THEN 1 ELSE 0 END) FROM kb_recording_keys k LEFT JOIN kb_key_versions v "
            "ON v.name = k.key_name AND v.version = k.key_version WHERE k.recording_id = ?",
            (VersionState.DESTROYING.value, VersionState.DESTROYED.value, recording_id),
        )
        total, dead = cur.fetchone()
        if total and int(dead or 0) == int(total):
            raise FailedPreconditionError(
                "recording is crypto-shredded (its retention is over and its keys are "
                "destroyed); there is nothing left to hold",
                reason="shredded",
            )

    def release_hold(self, kind: Target, target: str) -> Hold:
        def write(cur: Cursor) -> Hold:
            self._db.dialect.lock(cur, _PRIVACY_LOCK_ID)
            cur.execute(
                "SELECT reason, placed_by, placed_at FROM kb_holds WHERE kind = ? AND target = ?",
                (kind.value, target),
            )
            row = cur.fetchone()
            if row is None:
                raise FailedPreconditionError(
                    f"{kind.value} is not under legal hold", reason="not_held"
                )
            cur.execute("DELETE FROM kb_holds WHERE kind = ? AND target = ?", (kind.value, target))
            self._changed(cur)
            return Hold(kind, target, row[0], row[1], float(row[2]))

        return self._run(write, write=True)

    def restore_hold(self, hold: Hold) -> bool:
        """Privacy replay: place a journaled hold again unless it is there or its target is
        erased; True if placed."""

        def write(cur: Cursor) -> bool:
            self._db.dialect.lock(cur, _PRIVACY_LOCK_ID)
            cur.execute(
                "SELECT 1 FROM kb_holds WHERE kind = ? AND target = ? UNION ALL "
                "SELECT 1 FROM kb_erasures WHERE kind = ? AND target = ?",
                (hold.kind.value, hold.target, hold.kind.value, hold.target),
            )
            if cur.fetchone() is not None:
                return False
            cur.execute(
                "INSERT INTO kb_holds (kind, target, reason, placed_by, placed_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (hold.kind.value, hold.target, hold.reason, hold.placed_by, hold.placed_at),
            )
            self._changed(cur)
            return True

        placed: bool = self._run(write, write=True)
        return placed

    def holds(self) -> list[Hold]:
        def read(cur: Cursor) -> list[Hold]:
            cur.execute(
                "SELECT kind, target, reason, placed_by, placed_at FROM kb_holds "
                "ORDER BY kind, target"
            )
            return [Hold(Target(r[0]), r[1], r[2], r[3], float(r[4])) for r in cur.fetchall()]

        return self._run(read, write=False)

    # -- purpose withdrawals -------------------------------------------------------------------

    def change_purposes(
        self,
        recording_id: str,
        *,
        withdrawn: Sequence[str],
        restored: Sequence[str],
        reason: str,
        by: str,
        now: float,
    ) -> None:
        """Record purposes withdrawn from a recording and lift those given back, in one change."""

        def write(cur: Cursor) -> None:
            for purpose in restored:
                cur.execute(
                    "DELETE FROM kb_purpose_withdrawals WHERE recording_id = ? AND purpose = ?",
                    (recording_id, purpose),
                )
            for purpose in withdrawn:
                cur.execute(
                    "SELECT 1 FROM kb_purpose_withdrawals WHERE recording_id = ? AND purpose = ?",
                    (recording_id, purpose),
                )
                if cur.fetchone() is None:
                    cur.execute(
                        "INSERT INTO kb_purpose_withdrawals (recording_id, purpose, reason, "
                        "withdrawn_by, withdrawn_at) VALUES (?, ?, ?, ?, ?)",
                        (recording_id, purpose, reason, by, now),
                    )
            self._changed(cur)

        self._run(write, write=True)

    def restore_withdrawal(
        self, recording_id: str, purpose: str, *, reason: str, by: str, at: float
    ) -> bool:
        """Privacy replay: store a journaled withdrawal again unless it is there."""

        def write(cur: Cursor) -> bool:
            self._db.dialect.lock(cur, _PRIVACY_LOCK_ID)
            cur.execute(
                "SELECT 1 FROM kb_purpose_withdrawals WHERE recording_id = ? AND purpose = ?",
                (recording_id, purpose),
            )
            if cur.fetchone() is not None:
                return False
            cur.execute(
                "INSERT INTO kb_purpose_withdrawals (recording_id, purpose, reason, "
                "withdrawn_by, withdrawn_at) VALUES (?, ?, ?, ?, ?)",
                (recording_id, purpose, reason, by, at),
            )
            self._changed(cur)
            return True

        stored: bool = self._run(write, write=True)
        return stored

    def purpose_withdrawals(self) -> list[tuple[str, str]]:
        """Every ``(recording id, purpose)`` withdrawn and not given back."""

        def read(cur: Cursor) -> list[tuple[str, str]]:
            cur.execute("SELECT recording_id, purpose FROM kb_purpose_withdrawals")
            return [(str(r[0]), str(r[1])) for r in cur.fetchall()]

        return self._run(read, write=False)

    # -- replicas ----------------------------------------------------------------------------

    def generation(self) -> int:
        def read(cur: Cursor) -> int:
            cur.execute("SELECT privacy_generation FROM kb_meta WHERE id = 1")
            return int(cur.fetchone()[0])

        return self._run(read, write=False)

    def acknowledge(self, replica: str, generation: int, now: float) -> None:
        """This replica enforces everything up to ``generation`` (and is alive)."""

        def write(cur: Cursor) -> None:
            cur.execute(
                "INSERT INTO kb_replicas (replica_id, seen_privacy, heartbeat_at) VALUES (?, ?, ?) "
                "ON CONFLICT (replica_id) DO UPDATE SET seen_privacy = excluded.seen_privacy, "
                "heartbeat_at = excluded.heartbeat_at",
                (replica, generation, now),
            )

        self._run(write, write=True)

    def lagging_replicas(self, generation: int, alive_since: float) -> list[str]:
        """Live replicas (heartbeat after ``alive_since``) that have not loaded ``generation``."""

        def read(cur: Cursor) -> list[str]:
            cur.execute(
                "SELECT replica_id FROM kb_replicas WHERE heartbeat_at >= ? AND seen_privacy < ?",
                (alive_since, generation),
            )
            return [r[0] for r in cur.fetchall()]

        return self._run(read, write=False)

    def forget_replica(self, replica: str) -> None:
        def write(cur: Cursor) -> None:
            cur.execute("DELETE FROM kb_replicas WHERE replica_id = ?", (replica,))

        self._run(write, write=True)
