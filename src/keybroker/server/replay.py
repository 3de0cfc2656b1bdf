"""Privacy replay at start-up and from ``keybroker privacy replay``: the audit journal's erasures,
legal holds and purpose withdrawals re-applied to a metadata database that is behind it (restored
from a backup). The rules are keybroker.core.privacy_replay's; docs/OPERATIONS.md ("Backup and
restore") is the operator's side."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from keybroker.adapters.privacy_journal import privacy_decisions
from keybroker.adapters.privacystore import SqlPrivacyStore
from keybroker.core import journal as jf
from keybroker.core.decision import Decision
from keybroker.core.privacy_replay import ReplayReport, changes, plan, replay
from keybroker.errors import JournalUnavailableError

log = logging.getLogger(__name__)


def replay_journal(
    root: Path,
    chain_key: bytes,
    store: SqlPrivacyStore,
    record: Callable[[Decision], object] | None,
    *,
    dry_run: bool = False,
    quiet: bool = False,
) -> ReplayReport:
    """Verify every chain under ``root``, then re-apply what ``store`` lacks (journaling each
    re-application through ``record``). A chain that fails verification stops everything: the
    database might lack an erasure recorded after the defect (fail closed)."""
    try:
        found = changes(privacy_decisions(root, chain_key, remember=not dry_run))
    except jf.ChainError as exc:
        raise JournalUnavailableError(
            f"privacy replay: the audit journal fails verification at {exc.where} "
            f"({exc.problem}); the metadata database may lack privacy changes recorded there. "
            "Run `keybroker audit verify` (docs/OPERATIONS.md, Backup and restore)"
        ) from None
    report = replay(plan(found), store, record=record, dry_run=dry_run)
    if quiet:
        return report
    verb = "would re-apply" if dry_run else "re-applied"
    for line in report.applied:
        log.warning("privacy replay: the database lacked it, %s: %s", verb, line)
    for line in report.kept:
        log.warning("privacy replay: %s", line)
    if not report.applied:
        log.info("privacy replay: the database holds every privacy change of the journal")
    return report
