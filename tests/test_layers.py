"""keybroker's layers, enforced on every import of every module (function-local imports and
imports under ``TYPE_CHECKING`` included, relative ones resolved):

- ``keybroker`` (the package itself: ``__version__``) and ``keybroker.errors`` (the one domain
  error hierarchy) sit under everything: every layer may import them; they import nothing else.
- ``core`` imports no other layer (only errors).
- ``settings`` (the TOML + KEYBROKER_* loader) is not core: it may import core (for its value
  types) and errors, and core never imports it.
- ``adapters`` import only core, settings and errors.
- ``wire`` (status ↔ error, reason trailer: shared by client and server) imports only errors and
  the generated ``v1`` code.
- ``client`` (the SDK) imports neither ``server``, ``adapters``, ``settings`` nor ``cli``: only
  core, errors, wire and v1.
- ``server`` imports anything but ``cli`` and ``devenv``.
- ``devenv`` (``keybroker dev``) imports anything but ``cli``.
- ``cli`` may import anything, and nothing imports ``cli``.

A new top-level module must be given its place here, or this test fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.imports import (
    imported_keybroker_modules,
    is_module,
    module_name,
    source_files,
)

BASE = frozenset({"keybroker", "errors"})
ALLOWED: dict[str, frozenset[str]] = {
    "keybroker": frozenset({"keybroker"}),
    "errors": BASE,
    "core": BASE | {"core"},
    "settings": BASE | {"core", "settings"},
    "adapters": BASE | {"core", "settings", "adapters"},
    "v1": frozenset({"v1"}),
    "wire": BASE | {"v1", "wire"},
    "client": BASE | {"core", "wire", "v1", "client"},
    "server": BASE | {"core", "settings", "adapters", "wire", "v1", "server"},
    "devenv": BASE | {"core", "settings", "adapters", "wire", "v1", "server", "devenv"},
    "cli": BASE
    | {"core", "settings", "adapters", "wire", "v1", "server", "client", "devenv", "cli"},
}


def layer(module: str) -> str:
    """``keybroker.server.app`` → ``server``; ``keybroker`` → ``keybroker``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def violations(path: Path, module: str | None = None) -> list[str]:
    """The imports of ``path`` its layer may not make."""
    own = layer(module or module_name(path))
    allowed = ALLOWED[own]
    return sorted(m for m in imported_keybroker_modules(path, module) if layer(m) not in allowed)


FILES = source_files()


def test_every_module_has_a_layer() -> None:
    """Every module of src/keybroker (and every layer it imports) has a row in ALLOWED."""
    layers = {layer(module_name(p)) for p in source_files(generated=True)}
    assert layers <= set(ALLOWED), f"no layer rule for {sorted(layers - set(ALLOWED))}"
    assert {"core", "adapters", "server", "client", "cli"} <= layers


def test_the_scan_sees_hidden_and_relative_imports(tmp_path: Path) -> None:
    """Not vacuous: an import inside a function, under TYPE_CHECKING and a relative one each
    count, and ``from keybroker import __version__`` is the package, not a layer."""
    probe = tmp_path / "_probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "from keybroker import __version__\n"
        "if TYPE_CHECKING:\n    from keybroker.adapters.hsm import HsmConfig\n"
        "def f():\n    from ..cli import main\n    from . import broker\n"
    )
    found = imported_keybroker_modules(probe, "keybroker.core._probe")
    assert found == {
        "keybroker",
        "keybroker.adapters.hsm",
        "keybroker.cli",
        "keybroker.cli.main",
        "keybroker.core",
        "keybroker.core.broker",
    }
    assert violations(probe, "keybroker.core._probe") == [
        "keybroker.adapters.hsm",
        "keybroker.cli",
        "keybroker.cli.main",
    ]
    assert is_module("keybroker.cli.main") and not is_module("keybroker.cli.main.main")


@pytest.mark.parametrize("path", FILES, ids=module_name)
def test_module_imports_only_its_layers(path: Path) -> None:
    """Each module imports only the layers its own layer may (see the module docstring)."""
    assert violations(path) == [], f"{module_name(path)} ({layer(module_name(path))}) imports"


def test_nothing_outside_cli_imports_cli() -> None:
    """``cli`` is the top: the server, devenv, client and the rest never import it (so serving
    does not load the command line, and the command line can change freely)."""
    importers = {
        module_name(p): sorted(m for m in imported_keybroker_modules(p) if layer(m) == "cli")
        for p in FILES
        if layer(module_name(p)) != "cli"
    }
    assert {m: cli for m, cli in importers.items() if cli} == {}
