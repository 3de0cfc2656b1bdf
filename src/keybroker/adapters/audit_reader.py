"""Reading decisions back from this host's audit journal (every chain under ``[audit] dir``).

Used by the subject access report. It reads; verification is ``keybroker audit verify``'s job.
A line that does not parse (a torn write being repaired) is skipped, never fatal.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from pathlib import Path

from keybroker.adapters.journal import read_lines
from keybroker.core import journal as jf
from keybroker.core.decision import Decision


def decisions(root: Path) -> Iterator[tuple[int, Decision]]:
    """``(timestamp ns, decision)`` of every decision record, chain by chain."""
    for chain in sorted(p for p in root.glob("w*") if p.is_dir()):
        for _where, raw in read_lines(chain):
            try:
                body = jf.parse_line(raw)
            except (ValueError, TypeError):
                continue
            if body.get("kind") == jf.KIND_DECISION and isinstance(body.get("d"), dict):
                try:
                    yield int(body["ts"]), jf.decision_from_dict(body["d"])
                except (KeyError, TypeError, ValueError, json.JSONDecodeError):
                    continue


def decisions_about(
    root: Path | None, recording_ids: Collection[str], subject_id: str
) -> list[tuple[int, Decision]]:
    """Decisions naming one of ``recording_ids`` or bound to ``subject_id``, oldest first."""
    if root is None or not root.exists():
        return []
    found = [
        (ts, d)
        for ts, d in decisions(root)
        if (d.recording_id is not None and d.recording_id in recording_ids)
        or subject_id in d.subject_ids
    ]
    found.sort(key=lambda item: item[0])
    return found
