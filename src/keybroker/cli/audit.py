"""``keybroker audit verify | query | pseudonym``: auditors' tools over the local journal."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from keybroker import settings as settings_mod
from keybroker.adapters.export import Pseudonymizer
from keybroker.adapters.journal import CHECKPOINTS, read_lines
from keybroker.core import journal as jf
from keybroker.core.decision import Decision
from keybroker.errors import ConfigurationError

EXIT_OK, EXIT_TAMPERED = 0, 1


def _settings(args: argparse.Namespace) -> settings_mod.Settings:
    from keybroker.cli.main import config_path

    return settings_mod.load(config_path(args.config))


def _chains(root: Path) -> list[Path]:
    chains = sorted(p for p in root.glob("w*") if p.is_dir())
    if not chains:
        raise ConfigurationError(f"no journal under {root} ([audit] dir)")
    return chains


def _journal_root(args: argparse.Namespace, s: settings_mod.Settings) -> Path:
    root = args.dir or s.audit.dir
    if root is None:
        raise ConfigurationError("[audit] dir is not set; pass --dir")
    return Path(root)


def _signature_check(public_key: Ed25519PublicKey) -> jf.SignatureCheck:
    def check(message: bytes, signature: bytes) -> bool:
        try:
            public_key.verify(signature, message)
        except Exception:  # noqa: BLE001 - InvalidSignature or malformed signature bytes
            return False
        return True

    return check


def verify_chain(
    chain: Path, key: bytes, public_key: Ed25519PublicKey, anchors: Path | None
) -> str:
    """Verify one chain; return a summary or raise ChainError naming the place."""
    heads: dict[int, str] = {}
    last: jf.Record | None = None
    checkpoints = 0
    for record in jf.verify(key, read_lines(chain), check_signature=_signature_check(public_key)):
        heads[record.seq] = record.mac
        checkpoints += record.kind == jf.KIND_CHECKPOINT
        last = record
    anchor_file = anchors or chain / CHECKPOINTS
    if anchor_file.exists():
        for number, raw in enumerate(anchor_file.read_bytes().splitlines(), 1):
            anchor = jf.parse_line(raw)
            seq, mac = int(anchor["seq"]), str(anchor["mac"])
            where = f"{anchor_file.name}:{number}"
            if last is None or seq > last.seq:
                end = last.seq if last else 0
                raise jf.ChainError(
                    where,
                    f"journal truncated: it ends at record {end}, "
                    f"the checkpoint anchors record {seq}",
                )
            if seq in heads and heads[seq] != mac:
                raise jf.ChainError(where, f"record {seq} differs from its anchored checkpoint")
    if last is None:
        return "empty"
    first = min(heads)
    return (
        f"records {first}..{last.seq} intact, {checkpoints} signed checkpoints, "
        f"head {last.mac[:16]}"
    )


def cmd_verify(args: argparse.Namespace) -> int:
    s = _settings(args)
    key, signing = s.audit.load_keys()
    public = signing.public_key()
    if args.public_key:
        loaded = load_pem_public_key(Path(args.public_key).read_bytes())
        if not isinstance(loaded, Ed25519PublicKey):
            raise ConfigurationError("--public-key must be an Ed25519 public key")
        public = loaded
    status = EXIT_OK
    for chain in _chains(_journal_root(args, s)):
        try:
            print(f"{chain.name}: OK: {verify_chain(chain, key, public, args.anchors)}")
        except jf.ChainError as exc:
            print(f"{chain.name}: TAMPERED at {exc.where}: {exc.problem}")
            status = EXIT_TAMPERED
    return status


def _records(root: Path) -> Iterator[tuple[str, jf.Record]]:
    for chain in _chains(root):
        for _where, raw in read_lines(chain):
            body = jf.parse_line(raw)
            mac = str(body.pop("mac"))
            yield (
                chain.name,
                jf.Record(
                    int(body["seq"]),
                    int(body["ts"]),
                    str(body["kind"]),
                    body,
                    str(body["prev"]),
                    mac,
                ),
            )


def _when(value: str) -> int:
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1e9)


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
    s = _settings(args)
    since = _when(args.since) if args.since else None
    until = _when(args.until) if args.until else None
    rows = []
    for chain, record in _records(_journal_root(args, s)):
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
    return EXIT_OK


def cmd_pseudonym(args: argparse.Namespace) -> int:
    key = _settings(args).audit.load_pseudonym_key()
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
    p = audit.add_parser("verify", help="check the hash chain, signatures and anchors")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--dir", type=Path, help="journal directory (default [audit] dir)")
    p.add_argument("--anchors", type=Path, help="checkpoints file kept off-host")
    p.add_argument("--public-key", help="Ed25519 public key PEM (default: from the signing key)")
    p.set_defaults(func=cmd_verify)
    p = audit.add_parser("query", help="decisions matching all given filters")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--dir", type=Path, help="journal directory (default [audit] dir)")
    for flag, text in QUERY_FILTERS.items():
        p.add_argument(f"--{flag}", help=text)
    p.add_argument("--decision", choices=["allow", "deny", "error"], help="the outcome")
    p.add_argument("--since", help="ISO 8601 time (UTC if no zone)")
    p.add_argument("--until", help="ISO 8601 time (UTC if no zone)")
    p.add_argument("--json", action="store_true", help="JSON lines")
    p.set_defaults(func=cmd_query)
    from keybroker.cli import audit_report

    audit_report.register(audit)
    p = audit.add_parser("pseudonym", help="the pseudonym an identifier has in exported spans")
    p.add_argument("identifier", help="a recording or subject id")
    p.add_argument(
        "--kind",
        choices=["recording", "subject"],
        default="recording",
        help="what the identifier is (default recording)",
    )
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=cmd_pseudonym)
