"""The canary for grpcio's private layer: every private name the server uses goes through
keybroker.server.grpc_private, and each of them exists in the installed grpcio. A grpcio upgrade
that moves one fails here, naming it."""

from __future__ import annotations

import ast

import grpc
import pytest
from grpc._cython import cygrpc  # type: ignore[attr-defined]

from keybroker.server import grpc_private
from tests.support.imports import SRC, module_name, source_files

pytestmark = pytest.mark.loop_only(
    reason="the canary for grpcio's private layer, which only the loop engine uses"
)


DOOR = "keybroker.server.grpc_private"


@pytest.mark.parametrize("name", grpc_private.NAMES)
def test_each_private_name_exists_in_the_installed_grpcio(name: str) -> None:
    """``cygrpc.<name>`` exists and is what the door binds."""
    assert hasattr(cygrpc, name), f"grpcio {grpc.__version__} has no cygrpc.{name}"
    assert getattr(grpc_private, name) is getattr(cygrpc, name)


@pytest.mark.parametrize(
    ("cls", "attribute"),
    [(c, a) for c, attrs in grpc_private.ATTRIBUTES.items() for a in attrs],
)
def test_each_attribute_the_loop_reads_exists(cls: str, attribute: str) -> None:
    """The methods and fields the loop uses on gRPC core's objects (events, calls, the server,
    the completion queue) exist on the installed grpcio's Cython classes."""
    owner = getattr(cygrpc, cls, None)
    assert owner is not None, f"grpcio {grpc.__version__} has no cygrpc.{cls}"
    assert hasattr(owner, attribute), f"grpcio {grpc.__version__}: no cygrpc.{cls}.{attribute}"


def test_core_credentials_unwraps_public_credentials() -> None:
    """The public ServerCredentials still wrap gRPC core's credentials where the door reads them."""
    core = grpc_private.core_credentials(grpc.local_server_credentials())
    assert isinstance(core, cygrpc.ServerCredentials)


def _private_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("grpc._")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grpc"):
            module = node.module or ""
            if module.startswith("grpc._"):
                found.append(module)
            found += [f"{module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr == "_credentials":
            found.append("._credentials")
    return found


def test_the_scan_sees_private_uses() -> None:
    """Not vacuous: the three ways of reaching grpcio's private layer are each seen."""
    tree = ast.parse(
        "import grpc._channel\nfrom grpc._cython import cygrpc\nx = creds._credentials\n"
    )
    assert _private_uses(tree) == ["grpc._channel", "grpc._cython", "._credentials"]


def test_no_module_but_the_door_touches_grpcio_private_layer() -> None:
    """No other module of src/keybroker imports ``grpc._*`` or unwraps ``_credentials``."""
    uses = {
        module_name(p): found
        for p in source_files()
        if module_name(p) != DOOR and (found := _private_uses(ast.parse(p.read_text())))
    }
    assert uses == {}


def test_the_loop_uses_only_names_the_door_binds() -> None:
    """Every ``cy.<name>`` the loop uses is one the canary checks (or the credentials helper),
    so a private name cannot slip in unchecked."""
    tree = ast.parse((SRC / "server" / "loop.py").read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "cy"
    }
    assert used, "the loop no longer reaches gRPC core through the door as `cy`"
    assert used <= {*grpc_private.NAMES, "core_credentials"}
