"""Reading the audit journal for the audit subcommands (``audit query``, ``report``, ``verify``,
``archive``): where it is, its records in order, and one-line messages instead of tracebacks."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from keybroker import settings as settings_mod
from keybroker.adapters.journal import ChainLines, TornTail
from keybroker.cli.common import EXIT_FAILURE
from keybroker.core import journal as jf
from keybroker.errors import ConfigurationError

EXIT_TAMPERED = EXIT_FAILURE


class UnreadableJournalError(Exception):
    """A record that is not a torn tail does not parse: the journal needs ``audit verify``."""


def reading_journal(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Turn an unreadable record into a one-line message and exit 1 (never a traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except UnreadableJournalError as exc:
            print(f"keybroker: {exc}", file=sys.stderr)
            return EXIT_TAMPERED

    return run


def chain_dirs(root: Path) -> list[Path]:
    chains = sorted(p for p in root.glob("w*") if p.is_dir())
    if not chains:
        raise ConfigurationError(f"no journal under {root} ([audit] dir)")
    return chains


def journal_root(args: argparse.Namespace, s: settings_mod.Settings) -> Path:
    root = args.dir or s.audit.dir
    if root is None:
        raise ConfigurationError("[audit] dir is not set; pass --dir")
    return Path(root)


def records(root: Path, notes: list[str] | None = None) -> Iterator[tuple[str, jf.Record]]:
    """Every record of every chain, read (not verified). A torn last record (a crash) is
    skipped and noted in ``notes``; any other unreadable line is an error naming its place."""
    for chain in chain_dirs(root):
        lines = ChainLines(chain)
        for where, raw in lines:
            try:
                body = jf.parse_line(raw)
                mac = str(body.pop("mac"))
                record = jf.Record(
                    int(body["seq"]),
                    int(body["ts"]),
                    str(body["kind"]),
                    body,
                    str(body["prev"]),
                    mac,
                )
            except (ValueError, KeyError, TypeError):
                raise UnreadableJournalError(
                    f"{chain.name}/{where}: unreadable record; run `keybroker audit verify`"
                ) from None
            yield chain.name, record
        if lines.torn is not None and notes is not None:
            notes.append(f"{chain.name}/{torn_note(lines.torn)}")


def torn_note(torn: TornTail) -> str:
    return (
        f"{torn.where}: skipped a torn last record "
        f"({torn.size} bytes, a crash or a write in progress)"
    )


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def parse_when(value: str) -> int:
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1e9)
