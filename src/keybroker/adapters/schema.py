"""The schema check of a broker that may not change the schema (``[state] migrate = false``).

Such a broker runs as a database role without DDL rights; the schema is applied beforehand by
``keybroker migrate`` as a role that has them (deploy/postgres/roles.sql). At start the broker
only reads which migrations were applied and refuses to serve against any other schema version.
"""

from __future__ import annotations

from keybroker.adapters.sqldb import SCHEMA_VERSION, Cursor, Database
from keybroker.errors import ConfigurationError

_TABLE = "kb_schema_migrations"


def schema_version(db: Database) -> int:
    """The highest applied migration, 0 for a database keybroker never migrated."""

    def read(cur: Cursor) -> int:
        if db.backend == "postgresql":
            cur.execute("SELECT to_regclass(?) IS NOT NULL", (_TABLE,))
        else:
            cur.execute("SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (_TABLE,))  # fmt: skip
        row = cur.fetchone()
        if not row or not row[0]:
            return 0
        cur.execute(f"SELECT max(version) FROM {_TABLE}")  # noqa: S608 - a constant name
        row = cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    version: int = db.run(read, write=False)
    return version


def require_current_schema(db: Database) -> None:
    """Raise a ConfigurationError naming the fix unless the schema is this version's."""
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"[state] the database schema (v{version}) is newer than this keybroker "
            f"(v{SCHEMA_VERSION}); upgrade keybroker"
        )
    if version < SCHEMA_VERSION:
        raise ConfigurationError(
            f"[state] the database schema is at v{version}, this keybroker needs "
            f"v{SCHEMA_VERSION}, and [state] migrate = false: run `keybroker migrate --config "
            "FILE` as a role allowed to change the schema first"
        )
