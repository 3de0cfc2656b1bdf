"""``keybroker kek …``: key-encryption-key lifecycle, through the broker's KeyAdmin service.

Every command except ``create --offline`` talks to a running broker over mTLS with the token in
``[client] token_file`` (or ``--token-file``): the broker checks the token, records the decision
and applies the change on every replica. ``create --offline`` writes version 1 straight to the
HSM token, for the very first start (the broker adopts it, and records that, when it starts).

Output: readable tables; ``--json`` prints the same data as JSON for scripts.
Exit codes: 0 success; 1 refused or failed (including any item of ``kek rewrap``); 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from keybroker.cli.common import EXIT_FAILURE, EXIT_OK, load_settings
from keybroker.cli.connect import add_connection_options, as_json, client_settings, table, when
from keybroker.client import KeyBrokerClient
from keybroker.client.admin import KeyAdminClient
from keybroker.core.broker import MAX_REWRAP_BATCH
from keybroker.errors import ConfigurationError, FailedPreconditionError, KeybrokerError
from keybroker.settings import parse_duration
from keybroker.v1 import admin_pb2 as pb


def _admin(args: argparse.Namespace) -> KeyAdminClient:
    target, tls, token, timeout = client_settings(args)
    return KeyAdminClient(target, tls=tls, token=token, timeout=timeout)


def _state(value: int) -> str:
    return pb.KeyVersionState.Name(value).removeprefix("KEY_VERSION_STATE_").lower()


def format_key(key: pb.Key) -> str:
    period = f"{key.rotation_period_seconds}s" if key.rotation_period_seconds else "off"
    lines = [
        f"key {key.name}: current version {key.current_version}, "
        f"min decryption version {key.min_decryption_version}, "
        f"rotation period {period}, rotate after {key.rotate_after_wraps} wraps",
    ]
    rows = [("VERSION", "STATE", "CREATED", "WRAPS", "UNWRAPS", "LAST USED", "DESTROY AFTER")]
    for v in key.versions:
        rows.append(
            (
                f"{v.version}{'*' if v.current else ''}",
                _state(v.state),
                when(v.created_at),
                str(v.wraps),
                str(v.unwraps),
                when(v.last_used_at),
                when(v.destroy_after) if v.HasField("destroy_after") else "-",
            )
        )
    lines += table(rows)
    lines.append("(* = current; usage counts reach the store every few seconds)")
    return "\n".join(lines)


def _print_key(args: argparse.Namespace, key: pb.Key) -> int:
    if args.json:
        print(as_json(key))
    else:
        print(format_key(key))
    return EXIT_OK


def _admin_call(fn: Callable[[KeyAdminClient, argparse.Namespace], pb.Key]) -> Any:
    def run(args: argparse.Namespace) -> int:
        with _admin(args) as admin:
            return _print_key(args, fn(admin, args))

    return run


def _duration(value: str) -> int:
    try:
        return parse_duration(value, "duration")
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _cmd_create(args: argparse.Namespace) -> int:
    if args.offline:
        return _create_offline(args)
    with _admin(args) as admin:
        key = admin.create_key(
            args.name,
            rotation_period=args.rotation_period or 0,
            rotate_after_wraps=args.rotate_after_wraps or 0,
        )
        return _print_key(args, key)


def _create_offline(args: argparse.Namespace) -> int:
    from keybroker.adapters.hsm import HsmConfig, Pkcs11Keks

    loaded = load_settings(args)
    if not loaded.hsm.token_label:
        raise ConfigurationError("[hsm] token_label is required")
    os.environ.update(loaded.hsm.env)
    keks = Pkcs11Keks(HsmConfig(loaded.hsm.module, loaded.hsm.token_label, loaded.read_pin()))
    keks.connect()
    try:
        ref = keks.create(args.name)
    except FailedPreconditionError:
        if args.if_missing:
            return EXIT_OK
        raise
    print(f"created {ref} (AES-256, non-extractable) on the HSM; the broker adopts it at start")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        keys = admin.list_keys()
    if args.json:
        for key in keys:
            print(as_json(key))
    else:
        print("\n\n".join(format_key(k) for k in keys) if keys else "no keys")
    return EXIT_OK


def _read_items(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                item["_wrapped"] = base64.b64decode(item["wrapped_key"], validate=True)
                str(item["recording_id"])
            except (ValueError, KeyError, TypeError):
                raise ConfigurationError(
                    f"{path}:{number}: expected a JSON object with recording_id and wrapped_key "
                    "(base64)"
                ) from None
            yield item


def _cmd_rewrap(args: argparse.Namespace) -> int:
    """Rewrap every wrapped key of a JSON-lines file to the current versions (bulk migration)."""
    target, tls, token, timeout = client_settings(args)
    items = list(_read_items(args.input))
    done = failed = 0
    out_dir = args.output.resolve().parent
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{args.output.name}.")
    try:
        with (
            os.fdopen(fd, "w") as out,
            KeyBrokerClient(target, tls=tls, token=token, timeout=timeout) as kb,
        ):
            for start in range(0, len(items), args.batch):
                chunk = items[start : start + args.batch]
                results = kb.rewrap_data_keys((i["recording_id"], i["_wrapped"]) for i in chunk)
                for item, result in zip(chunk, results, strict=True):
                    row = {k: v for k, v in item.items() if k != "_wrapped"}
                    if isinstance(result, KeybrokerError):
                        failed += 1
                        row["error"] = result.reason
                    else:
                        done += 1
                        row["wrapped_key"] = base64.b64encode(result.wrapped).decode()
                        row["key_version"] = result.key_ref.version
                    out.write(json.dumps(row, sort_keys=True) + "\n")
        os.replace(tmp, args.output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    summary = {"rewrapped": done, "failed": failed, "output": str(args.output)}
    print(
        json.dumps(summary) if args.json else f"rewrapped {done}, failed {failed} -> {args.output}"
    )
    return EXIT_OK if failed == 0 else EXIT_FAILURE


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kek = sub.add_parser(
        "kek", help="key-encryption keys: create, rotate, retire, destroy (via the broker)"
    ).add_subparsers(dest="kek_command", required=True)

    def add(name: str, help_text: str, func: Any, *, version: bool = False) -> Any:
        p = kek.add_parser(name, help=help_text)
        if name not in ("list", "rewrap"):
            p.add_argument("name", help="key name, e.g. recordings")
        if version:
            p.add_argument("version", type=int, help="version number, e.g. 1")
        add_connection_options(p)
        p.set_defaults(func=func)
        return p

    p = add("create", "create a key with version 1", _cmd_create)
    p.add_argument("--rotation-period", type=_duration, help="e.g. 90d (at least 1h)")
    p.add_argument("--rotate-after-wraps", type=int, help="default 2^28")
    p.add_argument(
        "--offline",
        action="store_true",
        help="write version 1 straight to the HSM (first start, no broker running yet)",
    )
    p.add_argument("--if-missing", action="store_true", help="with --offline: ok if it exists")
    add("list", "list keys, versions, states and usage", _cmd_list)
    add("show", "one key: versions, states and usage", _admin_call(lambda a, n: a.get_key(n.name)))
    add("rotate", "make a new current version", _admin_call(lambda a, n: a.rotate_key(n.name)))
    p = add(
        "policy",
        "set rotation period, wrap limit, minimum decryption version",
        _admin_call(
            lambda a, n: a.set_rotation_policy(
                n.name,
                rotation_period=n.rotation_period,
                rotate_after_wraps=n.rotate_after_wraps,
                min_decryption_version=n.min_decryption_version,
            )
        ),
    )
    p.add_argument("--rotation-period", type=_duration, help="e.g. 90d; 0 turns it off")
    p.add_argument(
        "--rotate-after-wraps", type=int, help="rotate after this many wraps (default 2^28)"
    )
    p.add_argument("--min-decryption-version", type=int, help="refuse every version below this one")
    p = add(
        "disable",
        "refuse every use of a version",
        _admin_call(lambda a, n: a.disable_version(n.name, n.version, decrypt_only=n.decrypt_only)),
        version=True,
    )
    p.add_argument(
        "--decrypt-only", action="store_true", help="retire instead: unwrap keeps working"
    )
    p = add(
        "enable",
        "enable a disabled or decrypt-only version",
        _admin_call(lambda a, n: a.enable_version(n.name, n.version, make_current=n.make_current)),
        version=True,
    )
    p.add_argument(
        "--make-current",
        action="store_true",
        help="also make it the current version (a newer one, e.g. found on the HSM token)",
    )
    p = add(
        "schedule-destruction",
        "destroy a version's HSM object after a waiting window",
        _admin_call(lambda a, n: a.schedule_destruction(n.name, n.version, window=n.window or 0)),
        version=True,
    )
    p.add_argument("--window", type=_duration, help="default [keys] destruction_window (7d)")
    add(
        "cancel-destruction",
        "cancel a scheduled destruction (the version becomes disabled)",
        _admin_call(lambda a, n: a.cancel_destruction(n.name, n.version)),
        version=True,
    )
    p = add("rewrap", "rewrap a JSON-lines file of wrapped keys to current versions", _cmd_rewrap)
    p.add_argument("--input", type=Path, required=True, help="lines of {recording_id, wrapped_key}")
    p.add_argument("--output", type=Path, required=True, help="same lines, rewrapped")
    p.add_argument(
        "--batch",
        type=int,
        default=100,
        choices=range(1, MAX_REWRAP_BATCH + 1),
        metavar="N",
        help=f"keys per RewrapDataKeys call, 1..{MAX_REWRAP_BATCH} (default 100)",
    )
