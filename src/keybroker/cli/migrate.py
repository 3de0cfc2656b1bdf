"""``keybroker migrate``: apply the metadata database's schema migrations, and nothing else.

For deployments where the broker runs as a database role without DDL rights
(``[state] migrate = false``, deploy/postgres/roles.sql): run this as the migrator role before
the broker starts and before every upgrade. Migrations are numbered and idempotent; replicas or
jobs running it together apply each exactly once (an advisory lock on PostgreSQL).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

EXIT_OK, EXIT_BEHIND = 0, 1


def _run(args: argparse.Namespace) -> int:
    from keybroker import settings
    from keybroker.adapters.schema import schema_version
    from keybroker.adapters.sqldb import SCHEMA_VERSION, Database, dialect_for

    value = args.config or os.environ.get("KEYBROKER_CONFIG")
    path = Path(value) if value else None
    loaded = settings.load(path)
    state = loaded.state
    db = Database(dialect_for(state.url, base=loaded.state_dir(), password=state.read_password()))
    try:
        before = schema_version(db)
        if args.check:
            current = before == SCHEMA_VERSION
            print(f"schema v{before}; this keybroker needs v{SCHEMA_VERSION}: "
                  + ("up to date" if current else "run `keybroker migrate`"))  # fmt: skip
            return EXIT_OK if current else EXIT_BEHIND
        after = db.migrate()
    finally:
        db.close()
    if after == before:
        print(f"schema v{after}: up to date ({db.backend})")
    else:
        print(f"schema v{before} -> v{after}: applied migrations {before + 1}..{after} "
              f"({db.backend})")  # fmt: skip
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrate", help="apply the metadata database's schema migrations ([state] url)"
    )
    p.add_argument("--config", help="TOML settings file (default: $KEYBROKER_CONFIG)")
    p.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 if the schema is behind this keybroker",
    )
    p.set_defaults(func=_run)
