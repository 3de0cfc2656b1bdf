"""What every subcommand shares: exit codes and the settings file. A leaf: it imports no other
module of the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from keybroker import settings

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def config_path(arg: str | None) -> Path | None:
    """``--config`` if given, else ``$KEYBROKER_CONFIG``, else none (defaults and env only)."""
    value = arg or os.environ.get("KEYBROKER_CONFIG")
    return Path(value) if value else None


def load_settings(args: argparse.Namespace) -> settings.Settings:
    """The settings named by ``args.config`` (or ``$KEYBROKER_CONFIG``)."""
    return settings.load(config_path(args.config))
