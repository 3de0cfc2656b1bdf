"""``keybroker privacy …``: erasure, legal holds, purpose amendments, subject access reports.

Every command but ``replay`` talks to a running broker over mTLS with the token in
``[client] token_file`` (or ``--token-file``). Tables by default, ``--json`` for scripts. Exit
codes: 0 success; 1 refused or failed (e.g. ``legal_hold``, a journal that fails verification);
2 usage or configuration error.

``replay`` works on the journal and the metadata database directly, with the broker stopped: it
re-applies the journal's erasures, legal holds and purpose withdrawals the database lacks (after
a restore from a backup; the broker also does it when it starts). docs/OPERATIONS.md, "Backup
and restore".
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
from typing import Any

from keybroker.cli.common import EXIT_OK, load_settings
from keybroker.cli.connect import add_connection_options, as_json, client_settings, table, when
from keybroker.client.privacy import PrivacyClient
from keybroker.errors import ConfigurationError
from keybroker.v1 import privacy_pb2 as pb


def _client(args: argparse.Namespace) -> PrivacyClient:
    target, tls, token, timeout = client_settings(args)
    return PrivacyClient(target, tls=tls, token=token, timeout=max(timeout, 30.0))


def format_receipt(r: pb.ErasureReceipt) -> str:
    state = "already erased" if r.already_erased else "erased"
    return (
        f"{state}: {r.kind} {r.target}\n"
        f"  recordings covered  {r.recordings}\n"
        f"  erased at           {when(r.erased_at)}\n"
        f"  erased by           {r.erased_by}\n"
        f"  reason              {r.reason}\n"
        f"  audit reference     {r.audit_reference}\n"
        "Every replica now refuses to unwrap these recordings' keys, backups included."
    )


def format_hold(h: pb.LegalHold, verb: str) -> str:
    return (
        f"legal hold {verb}: {h.kind} {h.target} "
        f"(placed by {h.placed_by} at {when(h.placed_at)}: {h.reason})"
    )


def format_report(r: pb.SubjectAccessReportResponse) -> str:
    lines = [
        f"subject {r.subject_id}: {len(r.recordings)} recordings, {len(r.decisions)} decisions"
    ]
    if r.recordings:
        rows: list[tuple[str, ...]] = [
            ("RECORDING", "PURPOSES", "RETAIN UNTIL", "KEY", "CREATED", "ERASED")
        ]
        rows += [
            (
                e.recording_id,
                ",".join(e.purposes),
                when(e.retain_until),
                f"{e.key_ref.key_name}/v{e.key_ref.version}",
                when(e.created_at),
                when(e.erased_at),
            )
            for e in r.recordings
        ]
        lines += ["", *table(rows)]
    if r.decisions:
        decisions: list[tuple[str, ...]] = [
            ("TIME", "OPERATION", "OUTCOME", "REASON", "WHO", "CLIENT", "RECORDING", "PURPOSE")
        ]
        decisions += [
            (
                when(d.time),
                d.operation,
                d.outcome,
                d.reason,
                d.principal or "-",
                d.client_identity or "-",
                d.recording_id or "-",
                ",".join(d.purposes) or "-",
            )
            for d in r.decisions
        ]
        lines += ["", *table(decisions)]
    return "\n".join(lines)


def _target(args: argparse.Namespace) -> dict[str, str]:
    return {"recording_id": args.recording} if args.recording else {"subject_id": args.subject}


def _run(args: argparse.Namespace) -> int:
    with _client(args) as client:
        command = args.privacy_command
        if command in ("erase-recording", "erase-subject"):
            erase = client.erase_recording if command == "erase-recording" else client.erase_subject
            receipt = erase(args.id, reason=args.reason)
            print(as_json(receipt) if args.json else format_receipt(receipt))
            return EXIT_OK
        if command == "hold":
            hold = client.place_hold(**_target(args), reason=args.reason)
            print(as_json(hold) if args.json else format_hold(hold, "placed"))
            return EXIT_OK
        if command == "release":
            hold = client.release_hold(**_target(args))
            print(as_json(hold) if args.json else format_hold(hold, "released"))
            return EXIT_OK
        if command == "amend":
            out = client.amend_purposes(
                args.recording_id,
                _wrapped(args.wrapped_key),
                add=args.add,
                remove=args.remove,
                reason=args.reason,
            )
            row: dict[str, Any] = {
                "recording_id": args.recording_id,
                "wrapped_key": base64.b64encode(out.wrapped_key).decode(),
                "purposes": list(out.purposes),
                "key_version": out.key_ref.version,
            }
            print(json.dumps(row) if args.json else "\n".join(f"{k}: {v}" for k, v in row.items()))
            return EXIT_OK
        report = client.subject_access_report(args.id)
        print(as_json(report) if args.json else format_report(report))
        return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    from keybroker.adapters.journal_lock import lock_directory
    from keybroker.server.app import replay_with_own_journal

    settings = load_settings(args)
    if settings.audit.dir is None:
        raise ConfigurationError("[audit] dir is not set: there is no journal to replay")
    lock = None if args.dry_run else lock_directory(settings.audit.dir)  # no broker runs
    try:
        report = replay_with_own_journal(settings, dry_run=args.dry_run, quiet=True)
    finally:
        if lock is not None:
            lock.release()
    if report is None:  # pragma: no cover - [audit] dir is set
        return EXIT_OK
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "applied": report.applied, "kept": report.kept}))
        return EXIT_OK
    verb = "would re-apply" if args.dry_run else "re-applied"
    if not report.applied:
        print("the database holds every erasure, legal hold and withdrawal of the journal")
    for line in report.applied:
        print(f"{verb}: {line}")
    for line in report.kept:
        print(f"note: {line}")
    return EXIT_OK


def _wrapped(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise ConfigurationError("--wrapped-key must be base64") from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    privacy = sub.add_parser(
        "privacy", help="erasure, legal holds, purpose amendments, subject access (via the broker)"
    ).add_subparsers(dest="privacy_command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = privacy.add_parser(name, help=help_text)
        add_connection_options(p)
        p.set_defaults(func=_run)
        return p

    p = add("erase-recording", "erase one recording: its key can never be unwrapped again")
    p.add_argument("id", help="the recording id")
    p.add_argument("--reason", required=True, help="e.g. the request's reference")
    p = add("erase-subject", "erase every recording bound to a data subject")
    p.add_argument("id", help="the data subject id")
    p.add_argument("--reason", required=True, help="e.g. the request's reference")
    for name, text in (("hold", "place a legal hold"), ("release", "release a legal hold")):
        p = add(name, text)
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--recording", help="one recording id")
        target.add_argument("--subject", help="a data subject id (all of its recordings)")
        if name == "hold":
            p.add_argument("--reason", required=True, help="e.g. the case number")
    p = add("amend", "add or remove purposes of a recording (returns the new wrapped key)")
    p.add_argument("--recording-id", required=True, help="the recording id")
    p.add_argument("--wrapped-key", required=True, help="its current wrapped key, base64")
    p.add_argument("--add", action="append", default=[], help="purpose to add; repeat")
    p.add_argument("--remove", action="append", default=[], help="purpose to withdraw; repeat")
    p.add_argument("--reason", required=True, help="e.g. the new consent's reference")
    p = add("report", "subject access report: recordings and every decision about them")
    p.add_argument("id", help="the data subject id")
    p = privacy.add_parser(
        "replay",
        help="re-apply the journal's erasures, holds and withdrawals the database lacks "
        "(after a restore; broker stopped)",
    )
    p.add_argument("--config", help="TOML settings file (default: $KEYBROKER_CONFIG)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only say what the database lacks; change nothing (not even the schema)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_replay)
