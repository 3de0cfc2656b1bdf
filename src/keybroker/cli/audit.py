"""``keybroker audit verify | query | archive | public-key | signing-key | pseudonym``: auditors'
tools over the local journal."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path

from keybroker import settings as settings_mod
from keybroker.adapters.checkpoint_keys import (
    checkpoint_signer,
    configured_public_key,
    fingerprint,
    hsm_signer_config,
    load_public_key,
    public_pem,
    signature_check,
)
from keybroker.adapters.export import Pseudonymizer
from keybroker.adapters.files import write_private
from keybroker.adapters.journal import CHECKPOINTS, ChainLines, journal_files
from keybroker.adapters.journal_archive import (
    ARCHIVE,
    ARCHIVED,
    CHAINS,
    DELETED,
    MISSING,
    ArchiveRecord,
    FileRange,
    append_archive_record,
    delete_durably,
    file_ranges,
    move_durably,
    read_archive,
    registered_chains,
)
from keybroker.adapters.public_keys import PublicKey, checked_public_key
from keybroker.cli import audit_report
from keybroker.cli.common import EXIT_OK, load_settings
from keybroker.cli.journal_reading import (
    EXIT_TAMPERED,
    chain_dirs,
    journal_root,
    parse_when,
    print_notes,
    reading_journal,
    records,
)
from keybroker.core import journal as jf
from keybroker.core.decision import Decision
from keybroker.errors import ConfigurationError


def _first_where(chain: Path) -> str:
    files = journal_files(chain)
    return f"{files[0].name}:1" if files else ARCHIVE


def verify_chain(
    chain: Path, key: bytes, check: jf.SignatureCheck, anchor_file: Path | None
) -> str:
    """Verify one chain, its archive records and its anchors; return a summary or raise
    ChainError naming the place.

    Records before the first one present must be accounted for by archive records (archived,
    deleted or acknowledged missing), and the first record present must follow the last
    archived one: a chain whose oldest files were removed does not pass silently."""
    archived = read_archive(chain, key, check)
    covered = archived[-1].last if archived else 0
    heads: dict[int, str] = {}
    first: jf.Record | None = None
    last: jf.Record | None = None
    checkpoints = 0
    lines = ChainLines(chain)
    for record in jf.verify(key, lines, check_signature=check):
        if first is None:
            first = record
            _follows_archive(chain, record, archived)
        heads[record.seq] = record.mac
        checkpoints += record.kind == jf.KIND_CHECKPOINT
        last = record
    for entry in archived:  # an archived file still present (an interrupted archive run)
        if entry.last in heads and heads[entry.last] != entry.head:
            raise jf.ChainError(
                ARCHIVE, f"archive record {entry.n}: record {entry.last} differs from it"
            )
    if archived and last is None:
        raise jf.ChainError(
            ARCHIVE, f"no journal file after archived record {covered} (the newest was removed)"
        )
    if anchor_file is not None and anchor_file.exists():
        _check_anchors(anchor_file, heads, last.seq if last else 0)
    parts = [entry.describe() for entry in archived]
    if last is None or first is None:
        parts.append("empty")
    else:
        start = max(first.seq, covered + 1)
        parts.append(
            f"records {start}..{last.seq} intact, {checkpoints} signed checkpoints, "
            f"head {last.mac[:16]}"
        )
    if lines.torn:
        parts.append(lines.torn.note())
    return "; ".join(parts)


def _check_anchors(anchor_file: Path, heads: dict[int, str], end: int) -> None:
    """Every anchored checkpoint is present and unchanged (archived ones cannot be compared)."""
    for number, raw in enumerate(anchor_file.read_bytes().splitlines(), 1):
        where = f"{anchor_file.name}:{number}"
        try:
            anchor = jf.parse_line(raw)
            seq, mac = int(anchor["seq"]), str(anchor["mac"])
        except (ValueError, KeyError, TypeError):
            raise jf.ChainError(where, "unreadable anchor") from None
        if seq > end:
            raise jf.ChainError(
                where,
                f"journal truncated: it ends at record {end}, the checkpoint anchors record {seq}",
            )
        if seq in heads and heads[seq] != mac:
            raise jf.ChainError(where, f"record {seq} differs from its anchored checkpoint")


def _follows_archive(chain: Path, record: jf.Record, archived: list[ArchiveRecord]) -> None:
    """The first record present follows the archived ones, with no unrecorded gap."""
    covered = archived[-1].last if archived else 0
    if record.seq > covered + 1:
        raise jf.ChainError(
            _first_where(chain),
            f"records {covered + 1}..{record.seq - 1} are missing and no archive "
            "record accounts for them (journal files removed?)",
        )
    if record.seq == covered + 1 and covered and record.prev != archived[-1].head:
        raise jf.ChainError(
            _first_where(chain), f"record {record.seq} does not follow archived record {covered}"
        )


def _anchor_file(anchors: Path | None, chain: Path, chains: int) -> Path | None:
    """The checkpoints to check ``chain`` against: the off-host copy when given (a directory
    mirroring ``w<N>/checkpoints.jsonl``, or one file for a single chain), else the local one."""
    if anchors is None:
        return chain / CHECKPOINTS
    if anchors.is_dir():
        return anchors / chain.name / CHECKPOINTS
    if chains > 1:
        raise ConfigurationError(
            "--anchors: with several chains give a directory holding w<N>/checkpoints.jsonl"
        )
    return anchors


def _expected_chains(
    root: Path, present: list[str], s: settings_mod.Settings, anchors: Path | None
) -> dict[str, str]:
    """Chains that should exist, each with why: the register, the configured worker count
    (journals without a register), numbering gaps, and the off-host anchors."""
    expected: dict[str, str] = {}
    registered = registered_chains(root)
    if registered is not None:
        expected.update((name, f"listed in {CHAINS}") for name in registered)
    elif s.server.processes > 0:
        expected.update(
            (f"w{i}", f"[server] processes = {s.server.processes}")
            for i in range(s.server.processes)
        )
    numbers = [int(name[1:]) for name in present if name[1:].isdigit()]
    for i in range(max(numbers, default=-1)):
        expected.setdefault(f"w{i}", f"w{max(numbers)} exists")
    if anchors is not None and anchors.is_dir():
        for held in sorted(anchors.glob(f"w*/{CHECKPOINTS}")):
            expected.setdefault(held.parent.name, f"anchored in {anchors}")
    return expected


def _public_key(args: argparse.Namespace, s: settings_mod.Settings) -> tuple[PublicKey, str]:
    if args.public_key:
        key = load_public_key(Path(args.public_key))
        return key, f"pinned key {fingerprint(key)} ({args.public_key})"
    key = configured_public_key(s)
    return key, f"the configured signing key {fingerprint(key)}"


def cmd_verify(args: argparse.Namespace) -> int:
    s = load_settings(args)
    key = s.audit.load_chain_key()
    public, source = _public_key(args, s)
    check = signature_check(public)
    root = journal_root(args, s)
    chains = sorted(p for p in root.glob("w*") if p.is_dir())
    expected = _expected_chains(root, [c.name for c in chains], s, args.anchors)
    missing = sorted(set(expected) - {c.name for c in chains})
    if not chains and not missing:
        raise ConfigurationError(f"no journal under {root} ([audit] dir)")
    print(f"checking signatures against {source}")
    status = EXIT_OK
    for name in missing:
        print(f"{name}: MISSING: worker directory {root / name} not found ({expected[name]})")
        status = EXIT_TAMPERED
    for chain in chains:
        try:
            anchor_file = _anchor_file(args.anchors, chain, len(chains))
            print(f"{chain.name}: OK: {verify_chain(chain, key, check, anchor_file)}")
        except jf.ChainError as exc:
            print(f"{chain.name}: TAMPERED at {exc.where}: {exc.problem}")
            status = EXIT_TAMPERED
    return status


def cmd_archive(args: argparse.Namespace) -> int:
    try:
        return _archive(args)
    except jf.ChainError as exc:
        print(f"keybroker: not archived: TAMPERED at {exc.where}: {exc.problem}", file=sys.stderr)
        return EXIT_TAMPERED


def _record_missing(
    chain: Path,
    files: list[Path],
    *,
    key: bytes,
    sign: Callable[[bytes], bytes],
    check: jf.SignatureCheck,
    covered: int,
    reason: str,
) -> None:
    """Acknowledge records removed before archive records existed, with a signed record."""
    first = next(iter(file_ranges(files[:1], key, check, None)), None)
    if first is None or first.first <= covered + 1:
        print(f"{chain.name}: no unrecorded gap")
        return
    with files[0].open("rb") as fh:
        prev = str(jf.parse_line(fh.readline())["prev"])
    append_archive_record(
        chain, key, sign, action=MISSING, first=covered + 1, last=first.first - 1, head=prev,
        reason=reason,
    )  # fmt: skip
    print(f"{chain.name}: records {covered + 1}..{first.first - 1} recorded as missing")


def _archive(args: argparse.Namespace) -> int:
    """Archive (or delete) whole journal files older than ``--before``, oldest first, never the
    file being written; each one's archive record is durable before the file is touched."""
    s = load_settings(args)
    key = s.audit.load_chain_key()
    signer = checkpoint_signer(s)
    check = signature_check(checked_public_key(signer.public_key(), "[audit] signing key"))
    root = journal_root(args, s)
    if not args.before and not args.record_missing:
        raise ConfigurationError("--before is required with --to and --delete")
    before = parse_when(args.before) if args.before else None
    for chain in chain_dirs(root):
        archived = read_archive(chain, key, check)
        covered = archived[-1].last if archived else 0
        head = archived[-1].head if archived else None
        files = journal_files(chain)
        if args.record_missing:
            _record_missing(
                chain, files, key=key, sign=signer.sign, check=check, covered=covered,
                reason=args.reason or "",
            )  # fmt: skip
            continue
        done: list[FileRange] = []
        heads = {entry.last: entry.head for entry in archived}
        for path in files[:-1]:  # the newest file may be being written: never touched
            first_seq = int(path.stem.split("-")[1])
            pieces = file_ranges([path], key, check, heads.get(first_seq - 1, head))
            if not pieces:
                continue
            piece = pieces[0]
            if piece.first > covered + 1:
                raise jf.ChainError(
                    f"{path.name}:1",
                    f"records {covered + 1}..{piece.first - 1} are missing and no archive record "
                    "accounts for them; record that first with --record-missing",
                )
            if before is not None and piece.last_ts >= before:
                break
            if piece.last > covered:
                append_archive_record(
                    chain, key, signer.sign,
                    action=DELETED if args.delete else ARCHIVED,
                    first=piece.first, last=piece.last, head=piece.head, file=path.name,
                    sha256=piece.sha256,
                    to="" if args.delete else str((args.to / chain.name / path.name).resolve()),
                    reason=args.reason or "",
                )  # fmt: skip
                covered = piece.last
            if args.delete:
                delete_durably(path)
            else:
                move_durably(path, args.to / chain.name / path.name, piece.sha256)
            head = heads[piece.last] = piece.head
            done.append(piece)
        if done:
            how = "deleted" if args.delete else f"archived to {args.to / chain.name}"
            print(
                f"{chain.name}: records {done[0].first}..{done[-1].last} ({len(done)} files) {how}"
            )
        else:
            print(f"{chain.name}: nothing to archive")
    return EXIT_OK


def cmd_public_key(args: argparse.Namespace) -> int:
    pem = public_pem(configured_public_key(load_settings(args)))
    if args.output:
        write_private(args.output, pem)
        print(f"written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(pem.decode())
    return EXIT_OK


def cmd_signing_key_create(args: argparse.Namespace) -> int:
    from keybroker.adapters.hsm_signer import create_signing_key

    s = load_settings(args)
    if not s.audit.signing_key_label:
        raise ConfigurationError("set [audit] signing_key_label to the label the key pair gets")
    public = create_signing_key(hsm_signer_config(s), args.algorithm)
    pem = public_pem(public)
    if args.output:
        write_private(args.output, pem)
    sys.stdout.write(pem.decode())
    print(
        f"created {args.algorithm} key pair {s.audit.signing_key_label!r} "
        f"({fingerprint(public)}); pin this public key for `audit verify --public-key`",
        file=sys.stderr,
    )
    return EXIT_OK


def _matches(d: Decision, args: argparse.Namespace) -> bool:
    key = f"{d.key_name}/v{d.key_version}" if d.key_name else ""
    checks = [
        (args.recording, d.recording_id == args.recording),
        (args.subject, args.subject in d.subject_ids),
        (args.principal, d.subject == args.principal),
        (args.cert, args.cert in (d.cert_identity, d.cert_thumbprint)),
        (args.key, args.key in (key, d.key_name)),
        (args.operation, d.operation == args.operation),
        (args.decision, d.outcome.value == args.decision),
    ]
    return all(ok for wanted, ok in checks if wanted)


def cmd_query(args: argparse.Namespace) -> int:
    s = load_settings(args)
    since = parse_when(args.since) if args.since else None
    until = parse_when(args.until) if args.until else None
    rows = []
    notes: list[str] = []
    for chain, record in records(journal_root(args, s), notes):
        d = record.decision
        if d is None or (since and record.ts < since) or (until and record.ts > until):
            continue
        if _matches(d, args):
            rows.append((chain, record, d))
    rows.sort(key=lambda r: r[1].ts)
    for chain, record, d in rows:
        when = dt.datetime.fromtimestamp(record.ts / 1e9, dt.UTC).isoformat(timespec="milliseconds")
        if args.json:
            print(
                json.dumps(
                    {"chain": chain, "seq": record.seq, "time": when, **jf.decision_to_dict(d)}
                )
            )
        else:
            key = f"{d.key_name}/v{d.key_version}" if d.key_name else "-"
            print(
                f"{when}  {d.operation:<22} {d.outcome.value:<5} {d.reason:<20} "
                f"{d.subject or '-':<16} {d.recording_id or '-':<16} "
                f"{','.join(d.purposes) or '-':<12} {key}"
            )
    if not args.json:
        print(f"({len(rows)} decisions)", file=sys.stderr)
    print_notes(notes)
    return EXIT_OK


def cmd_pseudonym(args: argparse.Namespace) -> int:
    key = load_settings(args).audit.load_pseudonym_key()
    if key is None:
        raise ConfigurationError(
            "[audit] pseudonymize is off: exported spans carry identifiers in clear"
        )
    print(Pseudonymizer(key)(args.kind, args.identifier))
    return EXIT_OK


CONFIG_HELP = "settings file with an [audit] section (default: $KEYBROKER_CONFIG)"
QUERY_FILTERS = {
    "recording": "recording id",
    "subject": "data subject id",
    "principal": "token subject (sub) of the caller",
    "cert": "client certificate identity or SHA-256 thumbprint",
    "key": "key name, or name/vN for one version",
    "operation": "method name, e.g. UnwrapDataKey",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="verify and query the audit journal").add_subparsers(
        dest="audit_command", required=True
    )
    p = audit.add_parser(
        "verify", help="check the hash chains, archive records, signatures and anchors"
    )
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--dir", type=Path, help="journal directory (default [audit] dir)")
    p.add_argument(
        "--anchors",
        type=Path,
        help="checkpoints kept off-host: a directory holding w<N>/checkpoints.jsonl, or one "
        "checkpoints file when there is one chain",
    )
    p.add_argument(
        "--public-key",
        help="pinned public key (PEM, Ed25519 or ECDSA P-256) that must have signed every "
        "checkpoint and archive record; the configured signing key is then not read",
    )
    p.set_defaults(func=cmd_verify)
    p = audit.add_parser(
        "archive",
        help="move (or delete) old journal files, recording it first in the chain's signed "
        "archive records",
    )
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--dir", type=Path, help="journal directory (default [audit] dir)")
    p.add_argument("--before", help="archive whole files whose last record is older (ISO 8601)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", type=Path, help="move the files to DIR/w<N>/")
    where.add_argument("--delete", action="store_true", help="delete the files")
    where.add_argument(
        "--record-missing",
        action="store_true",
        help="record records already removed by hand (journals from before archive records)",
    )
    p.add_argument("--reason", help="why (kept in the archive record)")
    p.set_defaults(func=cmd_archive)
    p = audit.add_parser("public-key", help="the checkpoint signing key's public key (PEM)")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--output", type=Path, help="write it to this file (mode 600)")
    p.set_defaults(func=cmd_public_key)
    signing = audit.add_parser(
        "signing-key", help="the checkpoint signing key in the HSM"
    ).add_subparsers(dest="signing_command", required=True)
    p = signing.add_parser(
        "create", help="make the key pair [audit] signing_key_label on the [hsm] token"
    )
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument(
        "--algorithm",
        choices=["ed25519", "ecdsa-p256"],
        default="ed25519",
        help="key type (default ed25519)",
    )
    p.add_argument("--output", type=Path, help="also write the public key PEM here")
    p.set_defaults(func=cmd_signing_key_create)
    p = audit.add_parser("query", help="decisions matching all given filters")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--dir", type=Path, help="journal directory (default [audit] dir)")
    for flag, text in QUERY_FILTERS.items():
        p.add_argument(f"--{flag}", help=text)
    p.add_argument("--decision", choices=["allow", "deny", "error", "intent"], help="the outcome")
    p.add_argument("--since", help="ISO 8601 time (UTC if no zone)")
    p.add_argument("--until", help="ISO 8601 time (UTC if no zone)")
    p.add_argument("--json", action="store_true", help="JSON lines")
    p.set_defaults(func=reading_journal(cmd_query))
    audit_report.register(audit)
    p = audit.add_parser("pseudonym", help="the pseudonym an identifier has in exported spans")
    p.add_argument("identifier", help="a recording or subject id, or a justification")
    p.add_argument(
        "--kind",
        choices=["recording", "subject", "justification"],
        default="recording",
        help="what the identifier is (a justification: the exact text given, spaces trimmed)",
    )
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=cmd_pseudonym)
