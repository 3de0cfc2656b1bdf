"""``keybroker encrypt | decrypt | inspect``: recording files through the client SDK."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from keybroker.cli.common import EXIT_CONFIG
from keybroker.cli.connect import client_settings
from keybroker.client import KeyBrokerClient
from keybroker.client.recording import Progress, RecordingHeader
from keybroker.core.wrapped_key import WrappedKey
from keybroker.errors import InvalidRequestError, InvalidWrappedKeyError

PROGRESS_MIN_BYTES = 8 * 1024 * 1024
EXIT_USAGE = EXIT_CONFIG


def _client(args: argparse.Namespace) -> KeyBrokerClient:
    target, tls, token, timeout = client_settings(args)
    return KeyBrokerClient(target, tls=tls, token=token, timeout=timeout)


def refuse_overwrite(args: argparse.Namespace) -> str | None:
    """Why writing ``args.output`` needs ``--force`` (it exists, or it is the input), or None."""
    if args.force:
        return None
    if args.output.exists() and args.output.resolve() == args.input.resolve():
        return f"{args.output} is the input file; write to another file (or pass --force)"
    if args.output.exists() or args.output.is_symlink():
        return f"{args.output} exists; choose another output file or pass --force to replace it"
    return None


def _context(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"--context expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _progress(total: int | None, label: str) -> Progress | None:
    """A one-line progress bar on stderr for large files when stderr is a terminal."""
    if total is None or total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and done < total:
            return
        last[0] = now
        width = 30
        filled = int(width * min(done, total) / total)
        print(
            f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done * 100 // total:3d}%",
            end="\n" if done >= total else "",
            file=sys.stderr,
            flush=True,
        )

    return show


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path``; rename on success, delete on failure, so a
    refused or damaged input never leaves a partial plaintext behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path())
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def cmd_encrypt(args: argparse.Namespace) -> int:
    if why := refuse_overwrite(args):
        print(f"keybroker: {why}", file=sys.stderr)
        return EXIT_USAGE
    retain = (
        dt.datetime.now(dt.UTC) + dt.timedelta(days=args.retain_days) if args.retain_days else None
    )
    with _client(args) as kb, args.input.open("rb") as src, _atomic_output(args.output) as dst:
        ref = kb.encrypt_recording(
            src,
            dst,
            recording_id=args.recording_id,
            purposes=args.purpose,
            subject_ids=args.subject,
            retain_until=retain,
            context=_context(args.context),
            progress=_progress(_size(args.input), "encrypting"),
        )
    print(f"encrypted {args.input} -> {args.output} (recording {args.recording_id}, key {ref})")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    if why := refuse_overwrite(args):
        print(f"keybroker: {why}", file=sys.stderr)
        return EXIT_USAGE
    with _client(args) as kb, args.input.open("rb") as src, _atomic_output(args.output) as dst:
        header = kb.decrypt_recording(
            src,
            dst,
            purpose=args.purpose,
            context=_context(args.context),
            progress=_progress(_size(args.input), "decrypting"),
        )
    print(f"decrypted {args.input} -> {args.output} (recording {header.recording_id})")
    return 0


def describe(header: RecordingHeader) -> dict[str, object]:
    """Header and bindings of an encrypted recording: identifiers only, never key material."""
    info: dict[str, object] = {
        "format": "keybroker recording v1",
        "recording_id": header.recording_id,
        "segment_size": header.segment_size,
    }
    try:
        wrapped = WrappedKey.parse(header.wrapped_key)
    except InvalidWrappedKeyError:
        info["wrapped_key"] = "unparseable"
        return info
    b = wrapped.bindings
    info.update(
        key=str(wrapped.key),
        purposes=list(b.purposes),
        subject_ids=list(b.subject_ids),
        retain_until=dt.datetime.fromtimestamp(b.retain_until, dt.UTC).isoformat(),
        context=b.context_map,
    )
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    with args.input.open("rb") as src:
        info = describe(RecordingHeader.read(src))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            print(f"{key:<{width}}  {shown}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the encrypt, decrypt and inspect subcommands."""
    common: list[tuple[tuple[str, ...], dict[str, object]]] = [
        (("--config",), {"help": "TOML with a [client] section (default: $KEYBROKER_CONFIG)"}),
        (
            ("--context",),
            {
                "action": "append",
                "default": [],
                "metavar": "KEY=VALUE",
                "help": "caller context bound to the key (must match on decrypt); repeat",
            },
        ),
        (
            ("--force",),
            {"action": "store_true", "help": "replace the output file if it exists"},
        ),
    ]
    p = sub.add_parser("encrypt", help="encrypt a recording under a fresh data key")
    p.add_argument("--recording-id", required=True, help="the recording's id, bound to its key")
    p.add_argument("--purpose", action="append", required=True, help="repeat for several")
    p.add_argument("--subject", action="append", default=[], help="data subject id; repeat")
    p.add_argument("--retain-days", type=int, help="default: the broker's default retention")
    _add(p, common, cmd_encrypt, ("the recording to encrypt", "the encrypted file to write"))
    p = sub.add_parser("decrypt", help="decrypt a recording for one purpose")
    p.add_argument("--purpose", required=True, help="why it is used, e.g. support")
    _add(p, common, cmd_decrypt, ("the encrypted recording", "the decrypted file to write"))
    p = sub.add_parser("inspect", help="show a recording's header and bindings (no secrets)")
    p.add_argument("input", type=Path, help="an encrypted recording")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)


def _add(
    p: argparse.ArgumentParser,
    common: list[tuple[tuple[str, ...], dict[str, object]]],
    func: Callable[[argparse.Namespace], int],
    files: tuple[str, str],
) -> None:
    for names, kwargs in common:
        p.add_argument(*names, **kwargs)  # type: ignore[arg-type]
    p.add_argument("input", type=Path, help=files[0])
    p.add_argument("output", type=Path, help=files[1] + " (refused if it exists, unless --force)")
    p.set_defaults(func=func)
