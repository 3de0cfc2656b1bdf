"""gRPC core's settings for the broker (keybroker.server.grpc_settings)."""

from __future__ import annotations

import os

import tests
from keybroker.server import grpc_settings
from tests.support.process import run_fresh


def test_the_default_is_set_unless_the_operator_chose() -> None:
    env: dict[str, str] = {}
    grpc_settings.prepare(env)
    assert env == {"GRPC_EXPERIMENTS": grpc_settings.GRPC_EXPERIMENTS}
    own = {"GRPC_EXPERIMENTS": "event_engine_listener"}
    grpc_settings.prepare(own)
    assert own == {"GRPC_EXPERIMENTS": "event_engine_listener"}


def test_it_reports_when_grpc_was_imported_first() -> None:
    import grpc  # noqa: F401 - imported by now in this process anyway

    assert grpc_settings.prepare({}) is False


def test_the_suite_runs_the_servers_as_keybroker_serve_does() -> None:
    assert tests.GRPC_PREPARED, "grpc was imported before tests/__init__.py could configure it"
    assert os.environ["GRPC_EXPERIMENTS"] == grpc_settings.GRPC_EXPERIMENTS


def test_the_keybroker_command_configures_grpc_before_importing_it() -> None:
    """`keybroker serve` (like every subcommand) runs with the settings: the CLI package sets
    them before any of its modules imports grpc; spawned workers inherit the environment."""
    probe = (
        "import os, sys\n"
        "import keybroker.cli.main\n"
        "keybroker.cli.main.build_parser()  # imports every subcommand, grpc included\n"
        "print(keybroker.cli.GRPC_PREPARED, os.environ.get('GRPC_EXPERIMENTS'),"
        " 'grpc' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    out = run_fresh(probe, env)
    assert out.split() == ["True", grpc_settings.GRPC_EXPERIMENTS, "True"]
