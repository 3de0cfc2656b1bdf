"""Packs only the client modules of ../../src/keybroker (listed in pyproject.toml)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
MODULES: dict[str, list[str]] = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"][
    "keybroker-client"
]["modules"]


class ClientOnly(build_py):
    """build_py that keeps, per package, only the listed modules (and their .pyi stubs)."""

    def find_package_modules(self, package: str, package_dir: str) -> list[Any]:
        keep = MODULES[package]
        found = super().find_package_modules(package, package_dir)
        return [m for m in found if "*" in keep or m[1] in keep]

    def find_data_files(self, package: str, src_dir: str) -> list[str]:
        keep = MODULES[package]
        files = super().find_data_files(package, src_dir)
        return [f for f in files if "*" in keep or Path(f).stem in keep or f.endswith("py.typed")]


setup(
    packages=list(MODULES),
    package_dir={p: "../../src/" + p.replace(".", "/") for p in MODULES},
    package_data={"keybroker": ["py.typed"], "keybroker.v1": ["*.pyi"]},
    cmdclass={"build_py": ClientOnly},
    # a fresh build directory when asked (the distribution test), so no stale module is packed
    options={"build": {"build_base": os.environ.get("KEYBROKER_CLIENT_BUILD_BASE", "build")}},
)
