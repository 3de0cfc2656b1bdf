"""What the commands that call a running broker share: `[client]` settings, tables, JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from keybroker import settings
from keybroker.cli.common import config_path
from keybroker.client import TlsFiles, TokenFile
from keybroker.errors import ConfigurationError

NO_CLIENT_CONFIGURATION = (
    "no configuration given: pass --config FILE or set KEYBROKER_CONFIG=FILE, a settings file "
    "whose [client] section names the broker, the TLS files and the token file "
    "(for the dev broker: --config .keybroker/keybroker.toml)"
)


def client_settings(args: argparse.Namespace) -> tuple[str, TlsFiles, TokenFile, float]:
    """(target, TLS files, token file, timeout) from ``[client]`` and ``--token-file``."""
    path = config_path(args.config)
    client = settings.load(path).client
    try:
        tls, token_file = client.require(getattr(args, "token_file", None))
    except ConfigurationError as exc:
        if path is None and client.ca_file is None:
            raise ConfigurationError(NO_CLIENT_CONFIGURATION) from None
        raise exc from None
    return client.target, TlsFiles(*tls), TokenFile(token_file), client.timeout


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="settings file with a [client] section")
    parser.add_argument("--token-file", type=Path, help="token file (default: [client] token_file)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def as_json(message: Message) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), sort_keys=True)


def when(ts: Any) -> str:
    """A protobuf Timestamp as UTC text, or "-" when unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return dt.datetime.fromtimestamp(ts.seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
