"""A small ``kustomize build`` for the subset deploy/kubernetes uses, so the tests need no binary.

Supported: ``resources`` (YAML files and directories with a kustomization.yaml, recursively),
``namespace`` (set on every namespaced object), ``images`` (``name`` -> ``newName``/``newTag``/
``digest``, on containers and init containers) and ``patches`` given as a ``path`` to a JSON 6902
operation list (add, replace, remove) with a ``target`` of ``kind`` and ``name``. Anything else in
a kustomization.yaml raises, so a manifest cannot silently use a feature this renderer ignores.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterIssuer"}


class UnsupportedKustomization(ValueError):
    pass


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build directory`` would print (in resource order)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{directory}: unsupported fields {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += build(path) if path.is_dir() else load_documents(path)
    objects = [copy.deepcopy(o) for o in objects]
    for patch in kustomization.get("patches", []):
        _patch(directory, objects, patch)
    if "namespace" in kustomization:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for o in objects:
            for container in _containers(o):
                _set_image(container, image)
    return objects


def _patch(directory: Path, objects: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    if set(patch) != {"path", "target"} or set(patch["target"]) - {"kind", "name"}:
        raise UnsupportedKustomization(f"{directory}: patch form {patch}")
    operations = yaml.safe_load((directory / patch["path"]).read_text())
    want = patch["target"]
    targets = [
        o
        for o in objects
        if o.get("kind") == want.get("kind", o.get("kind"))
        and o["metadata"]["name"] == want.get("name", o["metadata"]["name"])
    ]
    if not targets:
        raise UnsupportedKustomization(f"{directory}: patch {patch['path']} matches nothing")
    for target in targets:
        for op in operations:
            apply_operation(target, op)


def _set_image(container: dict[str, Any], image: dict[str, str]) -> None:
    name = container["image"].partition("@")[0].partition(":")[0]
    if name != image["name"]:
        return
    new = image.get("newName", image["name"])
    if "digest" in image:
        container["image"] = f"{new}@{image['digest']}"
    else:
        container["image"] = f"{new}:{image.get('newTag', 'latest')}"


def _containers(o: dict[str, Any]) -> list[dict[str, Any]]:
    spec = o.get("spec", {})
    pod = spec.get("template", {}).get("spec") if "template" in spec else None
    if o.get("kind") == "CronJob":
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    if pod is None:
        return []
    return [*pod.get("containers", []), *pod.get("initContainers", [])]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise UnsupportedKustomization(f"JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_operation(document: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove), in place."""
    *parents, last = _pointer(op["path"])
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op["op"] not in {"add", "replace", "remove"}:
        raise UnsupportedKustomization(f"op {op['op']!r}")
    if isinstance(node, list):
        _list_operation(node, op, last)
    elif op["op"] == "add":
        node[last] = copy.deepcopy(op["value"])
    elif last not in node:
        raise UnsupportedKustomization(f"{op['path']}: no such member")
    elif op["op"] == "replace":
        node[last] = copy.deepcopy(op["value"])
    else:
        del node[last]


def _list_operation(node: list[Any], op: dict[str, Any], last: str) -> None:
    if op["op"] == "add":
        index = len(node) if last == "-" else int(last)
        node.insert(index, copy.deepcopy(op["value"]))
        return
    index = int(last)
    if not 0 <= index < len(node):
        raise UnsupportedKustomization(f"{op['path']}: index out of range")
    if op["op"] == "replace":
        node[index] = copy.deepcopy(op["value"])
    else:
        del node[index]
