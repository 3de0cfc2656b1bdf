"""The core stays pure: importing it loads no gRPC, PKCS#11, JWT, OTel SDK or database driver."""

from __future__ import annotations

import json

import pytest

from tests.support.process import run_fresh

FORBIDDEN = (
    "grpc",
    "pkcs11",
    "jwt",
    "opentelemetry.sdk",
    "psycopg",
    "psycopg2",
    "sqlite3",
    "_sqlite3",
)

_SCRIPT = """
import importlib, json, pkgutil, sys
import keybroker.core
names = [m.name for m in pkgutil.walk_packages(keybroker.core.__path__, "keybroker.core.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""


@pytest.fixture(scope="module")
def fresh_import() -> dict[str, list[str]]:
    """Import every keybroker.core submodule in a fresh interpreter; report sys.modules."""
    result: dict[str, list[str]] = json.loads(run_fresh(_SCRIPT))
    return result


def test_every_core_module_was_imported(fresh_import: dict[str, list[str]]) -> None:
    """The check covers the whole core package, not just its __init__."""
    for name in ("broker", "decision", "identity", "policy", "ports", "wrapped_key"):
        assert f"keybroker.core.{name}" in fresh_import["imported"]


@pytest.mark.parametrize("forbidden", FORBIDDEN)
def test_core_does_not_load(fresh_import: dict[str, list[str]], forbidden: str) -> None:
    """Neither the package nor any of its submodules is in sys.modules after importing the core."""
    loaded = [m for m in fresh_import["modules"] if m == forbidden or m.startswith(forbidden + ".")]
    assert loaded == []
