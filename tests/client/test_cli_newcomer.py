"""The command line a newcomer meets: help for every command and argument without markup, a
client token file made 0600 by `keybroker dev token --output`, encrypt/decrypt that never replace
a file (the input least of all) without --force, and no-configuration messages that say what to
pass."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from keybroker.cli.main import build_parser
from keybroker.devenv import DevEnv
from tests.support.process import run_cli

MARKUP = re.compile(r"``|:(class|func|meth|mod|attr):`|\.\. [a-z]+::")


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("keybroker",)
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, dict[str, str | None]]]:
    """Every (sub)command: its path, parser, and the help line its parent lists for it."""
    yield path, parser, {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                for found in parsers(child, (*path, name)):
                    yield found[0], found[1], {**found[2], "listed": helps.get(name)}


def test_every_command_and_argument_has_help_and_no_markup() -> None:
    """`keybroker … --help` describes every command and every argument, in plain text."""
    seen = 0
    for path, parser, info in parsers(build_parser()):
        seen += 1
        name = " ".join(path)
        assert parser.description, f"{name}: no description"
        if len(path) > 1:
            assert info.get("listed"), f"{name}: no help line in its parent's list"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        text = parser.format_help()
        assert not MARKUP.search(text), f"{name} --help shows markup:\n{text}"
    assert seen > 30  # serve, kek …, privacy …, encrypt, decrypt, inspect, audit …, dev …


def test_serve_help_has_a_description() -> None:
    """`keybroker serve --help` says what serving does and where the errors are explained."""
    out = run_cli("serve", "--help")
    assert out.returncode == 0
    assert "Run the broker" in out.stdout
    assert "docs/TROUBLESHOOTING.md" in out.stdout


def test_dev_token_output_is_mode_600_even_over_an_existing_file(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """The documented way to get a client token writes it readable by its owner only."""
    out = tmp_path / "client.token"
    out.write_text("old\n")
    out.chmod(0o644)
    done = run_cli(
        "dev", "token", "--state-dir", str(devenv.root), "--scope", "keys:unwrap",
        "--purpose", "support", "--output", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.read_text().count(".") == 2  # a JWT: header.claims.signature
    assert done.stdout == ""  # the token is not echoed


@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_an_existing_output_or_the_input_is_never_replaced_without_force(
    command: str, tmp_path: Path
) -> None:
    """Refused before any call to the broker: exit 2, a message saying --force, files intact."""
    src = tmp_path / "call.wav"
    src.write_bytes(b"original recording")
    existing = tmp_path / "out.bin"
    existing.write_bytes(b"keep me")
    extra = ["--recording-id", "r1"] if command == "encrypt" else []
    for output, message in ((existing, "exists"), (src, "is the input file")):
        out = run_cli(
            command, *extra, "--purpose", "support", str(src), str(output),
            env={"KEYBROKER_CONFIG": ""},
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert message in out.stderr
        assert "--force" in out.stderr
    assert src.read_bytes() == b"original recording"
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["call.wav", "out.bin"]


def test_force_gets_past_the_overwrite_check(tmp_path: Path) -> None:
    """With --force the command goes on (here to the missing configuration)."""
    src, out_path = tmp_path / "call.wav", tmp_path / "out.kbr"
    src.write_bytes(b"x")
    out_path.write_bytes(b"y")
    out = run_cli(
        "encrypt", "--recording-id", "r1", "--purpose", "support", "--force", str(src),
        str(out_path), env={"KEYBROKER_CONFIG": ""},
    )  # fmt: skip
    assert out.returncode == 2
    assert "no configuration given" in out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["encrypt", "--recording-id", "r1", "--purpose", "support", "IN", "OUT"],
        ["decrypt", "--purpose", "support", "IN", "OUT"],
        ["kek", "show", "recordings"],
        ["privacy", "report", "subj-1"],
    ],
)
def test_client_commands_without_configuration_name_config_and_the_variable(
    args: list[str], tmp_path: Path
) -> None:
    """No --config and no KEYBROKER_CONFIG: the message says so, exit 2."""
    (tmp_path / "IN").write_bytes(b"x")
    argv = [str(tmp_path / a) if a in ("IN", "OUT") else a for a in args]
    out = run_cli(*argv, env={"KEYBROKER_CONFIG": ""})
    assert out.returncode == 2, out.stderr
    assert "no configuration given" in out.stderr
    assert "--config" in out.stderr
    assert "KEYBROKER_CONFIG" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_missing_token_file_says_how_to_mint_one(devenv: DevEnv, tmp_path: Path) -> None:
    """[client] token_file naming no file points at `keybroker dev token --output`."""
    src = tmp_path / "call.wav"
    src.write_bytes(b"x")
    out = run_cli(
        "encrypt", "--config", str(devenv.config), "--recording-id", "r1", "--purpose",
        "support", str(src), str(tmp_path / "call.kbr"),
        env={"KEYBROKER_CLIENT_TOKEN_FILE": str(tmp_path / "none.token")},
    )  # fmt: skip
    assert out.returncode == 2
    assert "keybroker dev token" in out.stderr
    assert "--output" in out.stderr
    assert os.listdir(tmp_path) == ["call.wav"]
