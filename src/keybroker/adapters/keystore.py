"""Key metadata (keys, versions, states, policies, usage) in the metadata database.

Every write is one transaction that locks the key's row first, so two replicas never compute the
same next version number. Every metadata change bumps ``kb_meta.generation`` (and, on PostgreSQL,
sends ``NOTIFY keybroker_keys``) so caches know to reload; usage counts do not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from keybroker.adapters.sqldb import Cursor, Database
from keybroker.core.keys import (
    DEFAULT_ROTATE_AFTER_WRAPS,
    KeyInfo,
    VersionInfo,
    VersionState,
)
from keybroker.core.ports import Usage
from keybroker.core.wrapped_key import KeyRef

T = TypeVar("T")


def _version(row: Sequence[Any]) -> VersionInfo:
    return VersionInfo(
        version=int(row[1]),
        state=VersionState(row[2]),
        created_at=float(row[3]),
        destroy_after=row[4],
        destroyed_at=row[5],
        wraps=int(row[6]),
        unwraps=int(row[7]),
        last_used_at=row[8],
    )


_VERSION_COLUMNS = (
    "name, version, state, created_at, destroy_after, destroyed_at, wraps, unwraps, last_used_at"
)
_KEY_COLUMNS = (
    "name, created_at, current_version, min_decryption_version, rotation_period, rotate_after_wraps"
)


class SqlKeyStore:
    """Implements :class:`keybroker.core.ports.KeyStore` on a :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._d = db.dialect

    def _run(self, fn: Callable[[Cursor], T], *, write: bool) -> T:
        return self._db.run(fn, write=write)

    def close(self) -> None:
        self._db.close()

    @property
    def database(self) -> Database:
        return self._db

    # -- reads -------------------------------------------------------------------------------

    def generation(self) -> int:
        def read(cur: Cursor) -> int:
            cur.execute("SELECT generation FROM kb_meta WHERE id = 1")
            return int(cur.fetchone()[0])

        return self._run(read, write=False)

    def list_keys(self) -> list[KeyInfo]:
        def read(cur: Cursor) -> list[KeyInfo]:
            cur.execute(f"SELECT {_KEY_COLUMNS} FROM kb_keys ORDER BY name")  # noqa: S608 - constant
            key_rows = cur.fetchall()
            cur.execute(
                f"SELECT {_VERSION_COLUMNS} FROM kb_key_versions ORDER BY name, version"  # noqa: S608
            )
            versions: dict[str, list[VersionInfo]] = {}
            for row in cur.fetchall():
                versions.setdefault(row[0], []).append(_version(row))
            return [
                KeyInfo(
                    name=row[0],
                    created_at=float(row[1]),
                    current_version=int(row[2]),
                    min_decryption_version=int(row[3]),
                    rotation_period=None if row[4] is None else int(row[4]),
                    rotate_after_wraps=int(row[5]),
                    versions=tuple(versions.get(row[0], ())),
                )
                for row in key_rows
            ]

        return self._run(read, write=False)

    def key(self, name: str) -> KeyInfo | None:
        for key in self.list_keys():  # few keys; one code path for both reads
            if key.name == name:
                return key
        return None

    def stale(self, state: VersionState, older_than: float) -> list[tuple[KeyRef, float]]:
        def read(cur: Cursor) -> list[tuple[KeyRef, float]]:
            cur.execute(
                "SELECT name, version, updated_at FROM kb_key_versions "
                "WHERE state = ? AND updated_at < ? ORDER BY name, version",
                (state.value, older_than),
            )
            return [(KeyRef(r[0], int(r[1])), float(r[2])) for r in cur.fetchall()]

        return self._run(read, write=False)

    def due_destructions(self, now: float) -> list[KeyRef]:
        def read(cur: Cursor) -> list[KeyRef]:
            cur.execute(
                "SELECT name, version FROM kb_key_versions "
                "WHERE state = ? AND destroy_after <= ? ORDER BY name, version",
                (VersionState.SCHEDULED_FOR_DESTRUCTION.value, now),
            )
            return [KeyRef(r[0], int(r[1])) for r in cur.fetchall()]

        return self._run(read, write=False)

    # -- writes ------------------------------------------------------------------------------

    def _changed(self, cur: Cursor) -> None:
        cur.execute("UPDATE kb_meta SET generation = generation + 1 WHERE id = 1")
        self._d.notify(cur)

    def _insert_version(self, cur: Cursor, name: str, version: int, state: str, now: float) -> None:
        cur.execute(
            "INSERT INTO kb_key_versions (name, version, state, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, version, state, now, now),
        )

    def create_key(
        self, name: str, now: float, *, rotation_period: int | None, rotate_after_wraps: int
    ) -> bool:
        def write(cur: Cursor) -> bool:
            cur.execute(
                "INSERT INTO kb_keys (name, created_at, current_version, min_decryption_version, "
                "rotation_period, rotate_after_wraps) VALUES (?, ?, 0, 1, ?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (name, now, rotation_period, rotate_after_wraps),
            )
            if cur.rowcount != 1:
                return False
            self._insert_version(cur, name, 1, VersionState.PENDING.value, now)
            self._changed(cur)
            return True

        return self._run(write, write=True)

    def claim_version(self, name: str, now: float, expected_current: int | None) -> int | None:
        def write(cur: Cursor) -> int | None:
            self._d.lock_key(cur, name)
            cur.execute("SELECT current_version FROM kb_keys WHERE name = ?", (name,))
            row = cur.fetchone()
            if row is None:
                return None
            if expected_current is not None and int(row[0]) != expected_current:
                return None
            cur.execute("SELECT MAX(version) FROM kb_key_versions WHERE name = ?", (name,))
            version = int(cur.fetchone()[0] or 0) + 1
            self._insert_version(cur, name, version, VersionState.PENDING.value, now)
            return version

        return self._run(write, write=True)

    def activate_version(self, name: str, version: int, now: float) -> None:
        def write(cur: Cursor) -> None:
            self._d.lock_key(cur, name)
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, updated_at = ? "
                "WHERE name = ? AND version = ? AND state = ?",
                (VersionState.ENABLED.value, now, name, version, VersionState.PENDING.value),
            )
            cur.execute(
                "UPDATE kb_keys SET current_version = ? WHERE name = ? AND current_version < ?",
                (version, name, version),
            )
            self._changed(cur)

        self._run(write, write=True)

    def drop_pending(self, name: str, version: int) -> bool:
        def write(cur: Cursor) -> bool:
            cur.execute(
                "DELETE FROM kb_key_versions WHERE name = ? AND version = ? AND state = ?",
                (name, version, VersionState.PENDING.value),
            )
            dropped = cur.rowcount == 1
            cur.execute(
                "DELETE FROM kb_keys WHERE name = ? AND current_version = 0 AND NOT EXISTS "
                "(SELECT 1 FROM kb_key_versions v WHERE v.name = kb_keys.name)",
                (name,),
            )
            return dropped

        return self._run(write, write=True)

    def set_state(
        self,
        name: str,
        version: int,
        *,
        expected: VersionState,
        new: VersionState,
        now: float,
        destroy_after: float | None = None,
    ) -> bool:
        def write(cur: Cursor) -> bool:
            self._d.lock_key(cur, name)
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, destroy_after = ?, updated_at = ? "
                "WHERE name = ? AND version = ? AND state = ? AND version <> "
                "(SELECT current_version FROM kb_keys WHERE name = ?)",
                (new.value, destroy_after, now, name, version, expected.value, name),
            )
            if cur.rowcount != 1:
                return False
            self._changed(cur)
            return True

        return self._run(write, write=True)

    def set_policy(
        self,
        name: str,
        *,
        rotation_period: int | None,
        rotate_after_wraps: int,
        min_decryption_version: int,
    ) -> None:
        def write(cur: Cursor) -> None:
            self._d.lock_key(cur, name)
            cur.execute(
                "UPDATE kb_keys SET rotation_period = ?, rotate_after_wraps = ?, "
                "min_decryption_version = ? WHERE name = ?",
                (rotation_period, rotate_after_wraps, min_decryption_version, name),
            )
            self._changed(cur)

        self._run(write, write=True)

    def claim_destruction(self, name: str, version: int, now: float) -> bool:
        def write(cur: Cursor) -> bool:
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, updated_at = ? "
                "WHERE name = ? AND version = ? AND state = ? AND destroy_after <= ?",
                (
                    VersionState.DESTROYING.value,
                    now,
                    name,
                    version,
                    VersionState.SCHEDULED_FOR_DESTRUCTION.value,
                    now,
                ),
            )
            if cur.rowcount != 1:
                return False
            self._changed(cur)
            return True

        return self._run(write, write=True)

    def claim_shred(self, name: str, now: float) -> list[int]:
        """Every live version of ``name`` -> DESTROYING at once; the versions this caller won."""

        def write(cur: Cursor) -> list[int]:
            self._d.lock_key(cur, name)
            live = (
                VersionState.ENABLED.value,
                VersionState.DECRYPT_ONLY.value,
                VersionState.DISABLED.value,
                VersionState.SCHEDULED_FOR_DESTRUCTION.value,
            )
            cur.execute(
                "SELECT version FROM kb_key_versions WHERE name = ? AND state IN (?, ?, ?, ?) "
                "ORDER BY version",
                (name, *live),
            )
            versions = [int(r[0]) for r in cur.fetchall()]
            if not versions:
                return []
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, updated_at = ? "
                "WHERE name = ? AND state IN (?, ?, ?, ?)",
                (VersionState.DESTROYING.value, now, name, *live),
            )
            self._changed(cur)
            return versions

        return self._run(write, write=True)

    def finish_destruction(self, name: str, version: int, now: float) -> None:
        def write(cur: Cursor) -> None:
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, destroyed_at = ?, updated_at = ? "
                "WHERE name = ? AND version = ? AND state = ?",
                (
                    VersionState.DESTROYED.value,
                    now,
                    now,
                    name,
                    version,
                    VersionState.DESTROYING.value,
                ),
            )
            self._changed(cur)

        self._run(write, write=True)

    def adopt_version(self, key: KeyRef, now: float) -> bool:
        def write(cur: Cursor) -> bool:
            cur.execute(
                "INSERT INTO kb_keys (name, created_at, current_version, min_decryption_version, "
                "rotation_period, rotate_after_wraps) VALUES (?, ?, 0, 1, NULL, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (key.name, now, DEFAULT_ROTATE_AFTER_WRAPS),
            )
            self._d.lock_key(cur, key.name)
            cur.execute(
                "INSERT INTO kb_key_versions (name, version, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name, version) DO NOTHING",
                (key.name, key.version, VersionState.ENABLED.value, now, now),
            )
            if cur.rowcount != 1:
                return False
            # Never displaces a current version: only a key nobody knew gets one (the first
            # start after `kek create --offline`); otherwise it takes KeyAdmin make_current.
            cur.execute(
                "UPDATE kb_keys SET current_version = ? WHERE name = ? AND current_version = 0",
                (key.version, key.name),
            )
            self._changed(cur)
            return True

        return self._run(write, write=True)

    def make_current(self, name: str, version: int, now: float) -> bool:
        def write(cur: Cursor) -> bool:
            self._d.lock_key(cur, name)
            live = (
                VersionState.ENABLED.value,
                VersionState.DECRYPT_ONLY.value,
                VersionState.DISABLED.value,
            )
            cur.execute(
                "UPDATE kb_key_versions SET state = ?, updated_at = ? "
                "WHERE name = ? AND version = ? AND state IN (?, ?, ?) AND version > "
                "(SELECT current_version FROM kb_keys WHERE name = ?)",
                (VersionState.ENABLED.value, now, name, version, *live, name),
            )
            if cur.rowcount != 1:
                return False
            cur.execute("UPDATE kb_keys SET current_version = ? WHERE name = ?", (version, name))
            self._changed(cur)
            return True

        return self._run(write, write=True)

    def add_usage(self, usage: Mapping[KeyRef, Usage]) -> None:
        if not usage:
            return

        def write(cur: Cursor) -> None:
            for ref, use in sorted(usage.items()):
                cur.execute(
                    "UPDATE kb_key_versions SET wraps = wraps + ?, unwraps = unwraps + ?, "
                    "last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < ? "
                    "THEN ? ELSE last_used_at END WHERE name = ? AND version = ?",
                    (
                        use.wraps,
                        use.unwraps,
                        use.last_used_at,
                        use.last_used_at,
                        ref.name,
                        ref.version,
                    ),
                )

        self._run(write, write=True)
