"""The client SDK stands alone: it imports only the modules the keybroker-client distribution packs
(function-local imports included), and loading it pulls in no server dependency. That it imports
neither the server, the adapters nor the CLI is one of the layer rules of tests/test_layers.py."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from tests.support.imports import SRC, imported_modules
from tests.support.process import run_fresh

ROOT = SRC.parent.parent
CLIENT_FILES = [*sorted((SRC / "client").glob("*.py")), SRC / "wire.py"]
FORBIDDEN = ("keybroker.server", "keybroker.adapters", "keybroker.cli")


def _within(module: str, packages: tuple[str, ...]) -> bool:
    """``module`` is one of ``packages`` or inside one (``keybroker.client`` is not in ``.cli``)."""
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def shipped_modules() -> set[str]:
    """``package.module`` names that packaging/keybroker-client packs (``package.*`` = all)."""
    config = tomllib.loads((ROOT / "packaging/keybroker-client/pyproject.toml").read_text())
    modules: dict[str, list[str]] = config["tool"]["keybroker-client"]["modules"]
    return {
        package if name == "__init__" else f"{package}.{name}"
        for package, names in modules.items()
        for name in names
    }


def _is_shipped(module: str, shipped: set[str]) -> bool:
    return (
        any(module == s or (s.endswith(".*") and module.startswith(s[:-1])) for s in shipped)
        or f"{module}.__init__" in shipped
    )


@pytest.mark.parametrize("path", CLIENT_FILES, ids=lambda p: p.name)
def test_client_module_imports_only_what_the_client_distribution_ships(path: Path) -> None:
    """Every keybroker module the SDK imports is packed by keybroker-client (so the client
    distribution is complete), and none of them is a generated *_pb2_grpc stub."""
    shipped = shipped_modules()
    for module in imported_modules(path):
        if not module.startswith("keybroker.") or module == "keybroker":
            continue
        parent = module.rpartition(".")[0]
        # `from keybroker.client import recording` names a module; `... import KeyRef` a class
        assert _is_shipped(module, shipped) or _is_shipped(parent, shipped), (
            f"{path.name} imports {module}, which keybroker-client does not ship"
        )
        assert not module.endswith("_pb2_grpc"), f"{path.name} imports the generated stub {module}"


def test_shipped_modules_import_nothing_outside_the_distribution() -> None:
    """The shared modules the client distribution packs (errors, wire, core.wrapped_key) reach no
    further than the distribution either."""
    shipped = shipped_modules()
    for name in ("errors", "wire", "core/wrapped_key", "core/__init__", "__init__"):
        path = SRC / f"{name}.py"
        for module in imported_modules(path):
            if module.startswith("keybroker."):
                parent = module.rpartition(".")[0]
                assert _is_shipped(module, shipped) or _is_shipped(parent, shipped), (
                    f"{name} imports {module}"
                )


def test_importing_the_sdk_loads_no_server_dependency() -> None:
    """In a fresh interpreter, importing keybroker.client loads no server layer, no pkcs11,
    psycopg, PyJWT or OpenTelemetry SDK, and no generated *_pb2_grpc module."""
    out = run_fresh(
        "import json, sys\n"
        "import keybroker.client, keybroker.client.admin, keybroker.client.privacy\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    loaded = json.loads(out)
    unwanted = [
        m
        for m in loaded
        if _within(m, (*FORBIDDEN, "pkcs11", "psycopg", "jwt", "opentelemetry.sdk"))
        or m.endswith("_pb2_grpc")
    ]
    assert unwanted == []
    assert "keybroker.client" in loaded
