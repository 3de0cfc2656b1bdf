"""An AST scan of the imports of keybroker's own modules: every ``import`` and ``from … import``
anywhere in a file (top level, inside functions, under ``TYPE_CHECKING``), relative ones resolved.
Used by the layer, cycle and client-distribution tests."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import keybroker

SRC = Path(keybroker.__file__).resolve().parent
GENERATED = "keybroker.v1"


def module_name(path: Path) -> str:
    """``keybroker.x.y`` for ``src/keybroker/x/y.py`` (a package's ``__init__`` is the package)."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(*, generated: bool = False) -> list[Path]:
    """Every module of the package (the generated protobuf code only with ``generated``)."""
    return [
        p
        for p in sorted(SRC.rglob("*.py"))
        if generated or not module_name(p).startswith(GENERATED)
    ]


def is_module(name: str) -> bool:
    """``name`` is a module or package of keybroker (not a class or function in one)."""
    if name == "keybroker":
        return True
    if not name.startswith("keybroker."):
        return False
    rel = Path(*name.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def imported_modules(path: Path, module: str | None = None) -> Iterator[str]:
    """Every module ``path`` (the module named ``module``, by default from its place under src/)
    imports, anywhere in the file; ``from a import b`` yields ``a`` and ``a.b``."""
    package = module or module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def imported_keybroker_modules(path: Path, module: str | None = None) -> set[str]:
    """The keybroker modules ``path`` imports: ``from keybroker.a import B`` counts as
    ``keybroker.a``, ``from keybroker import a`` as ``keybroker.a`` (a submodule)."""
    found = set()
    for name in imported_modules(path, module):
        if name == "keybroker" or name.startswith("keybroker."):
            target = name
            while not is_module(target):
                target = target.rpartition(".")[0]
            found.add(target)
    return found


def private_imports(path: Path, module: str | None = None) -> list[str]:
    """``module.name`` for every private name (``_x``, not ``__x__``) ``path`` imports from
    another keybroker module, or through a private module (``keybroker.client._base``)."""
    own = module or module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if not name.startswith("keybroker.") or name.startswith(own + "."):
                continue
            if any(_private(part) for part in name.split(".")):
                found.append(name)
    return found


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def import_graph() -> dict[str, set[str]]:
    """module → the keybroker modules it imports (anywhere in the file), for every module."""
    graph = {}
    for path in source_files():
        module = module_name(path)
        # a package is always initialised before its submodules: `from keybroker.client import
        # _calls` inside keybroker.client.x does not make the package depend on x
        ancestors = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)}
        graph[module] = imported_keybroker_modules(path) - {module} - ancestors
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: each strongly connected component of more than one module
    (Tarjan), sorted, as a sorted list of names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)
