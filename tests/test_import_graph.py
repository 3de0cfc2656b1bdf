"""keybroker's import graph (every import anywhere in a file, function-local ones included): no
module imports itself around a circle, and the command line takes no other module's private
names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.imports import (
    SRC,
    cycles,
    import_graph,
    module_name,
    private_imports,
)

CLI_FILES = sorted((SRC / "cli").glob("*.py"))


def test_the_cycle_finder_finds_cycles() -> None:
    """Not vacuous: a two-module circle and a three-module circle are both reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_private_names_are_seen(tmp_path: Path) -> None:
    """Not vacuous: a private name taken from a sibling inside a function is reported; a dunder
    (``__version__``) and the module's own names are not."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from keybroker import __version__\n"
        "def f():\n    from keybroker.cli.audit import _records, print_notes\n"
        "    from .main import _describe\n    from keybroker.cli.probe import _own\n"
    )
    assert private_imports(probe, "keybroker.cli.probe") == [
        "keybroker.cli.audit._records",
        "keybroker.cli.main._describe",
    ]


def test_cli_has_no_import_cycle() -> None:
    """``keybroker.cli``: main lists the subcommands, the subcommands share leaf modules
    (common, connect, journal_reading), and no module imports back up."""
    graph = {m: deps for m, deps in import_graph().items() if m.startswith("keybroker.cli")}
    assert cycles(graph) == []


@pytest.mark.parametrize("path", CLI_FILES, ids=lambda p: p.name)
def test_cli_module_imports_no_private_name(path: Path) -> None:
    """No module of the command line imports another module's private (``_x``) names."""
    assert private_imports(path) == [], f"{module_name(path)} takes private names"


def test_no_import_cycle_anywhere() -> None:
    """No two modules of src/keybroker import each other, directly or around a circle, even
    through a function-local or ``TYPE_CHECKING`` import (core.broker ↔ core.retention went
    through the epoch scheme, now the leaf core.epochs; adapters.checkpoint_keys ↔
    adapters.hsm_signer through the public-key type, now the leaf adapters.public_keys)."""
    assert cycles(import_graph()) == []
