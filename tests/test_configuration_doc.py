"""docs/CONFIGURATION.md cannot drift from the settings code: every key of every settings section
is documented, under its section, with its type, its default and its environment variable, and
every documented key exists."""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from keybroker import settings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "CONFIGURATION.md"
SECTION = re.compile(r"^## `\[(\w+)\]`", re.MULTILINE)
ROW = re.compile(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \| `(\w+)` \| (.+) \|$")


def _sections() -> dict[str, type[Any]]:
    """Settings' sections as the code declares them: each field of ``Settings`` but ``source``."""
    hints = get_type_hints(settings.Settings)
    return {f.name: hints[f.name] for f in fields(settings.Settings) if f.name != "source"}


def _default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    assert f.default_factory is not MISSING
    return f.default_factory()


_SIMPLE = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _type_name(section: str, key: str, hint: Any) -> str:
    text = str(hint)
    if f"{section}.{key}" in settings._DURATION_KEYS:
        return "duration"
    if "Path" in text:
        return "path"
    if text.startswith("tuple"):
        return "list of strings"
    if "Mapping" in text:
        return "table of strings"
    assert hint in _SIMPLE, f"[{section}] {key}: a type this test does not know: {text}"
    return _SIMPLE[hint]


def _documented() -> dict[str, dict[str, tuple[str, str, str, str]]]:
    """``{section: {key: (type, default cell, env variable, meaning)}}`` from the doc's tables."""
    text = DOC.read_text()
    found: dict[str, dict[str, tuple[str, str, str, str]]] = {}
    heads = list(SECTION.finditer(text))
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        rows = found.setdefault(head[1], {})
        for line in text[head.end() : end].splitlines():
            if m := ROW.match(line):
                assert m[1] not in rows, f"[{head[1]}] {m[1]} documented twice"
                rows[m[1]] = (m[2].strip(), m[3].strip(), m[4], m[5].strip())
    return found


def _parse_default(cell: str, type_name: str, where: str) -> Any:
    """A documented default: ``none`` (unset) or a TOML value in backticks, then any remark."""
    if cell.startswith("none"):
        return None
    m = re.match(r"`([^`]+)`", cell)
    assert m, f"{where}: default {cell!r} is neither `VALUE` nor none"
    value = tomllib.loads(f"v = {m[1]}")["v"]
    if type_name == "duration":
        return settings.parse_duration(value, where)
    if type_name == "list of strings":
        return tuple(value)
    return value


def test_every_section_of_the_code_is_documented_and_no_other() -> None:
    assert sorted(_documented()) == sorted(_sections())


@pytest.mark.parametrize("section", sorted(_sections()))
def test_every_key_is_documented_with_its_type_default_and_variable(section: str) -> None:
    cls = _sections()[section]
    hints = get_type_hints(cls)
    documented = _documented().get(section, {})
    code = {f.name: f for f in fields(cls)}
    assert sorted(documented) == sorted(code), (
        f"[{section}]: missing from the doc {sorted(set(code) - set(documented))}, "
        f"documented but not in the code {sorted(set(documented) - set(code))}"
    )
    for key, f in code.items():
        where = f"[{section}] {key}"
        type_name, default, env, meaning = documented[key]
        assert type_name == _type_name(section, key, hints[key]), where
        assert _parse_default(default, type_name, where) == _default(f), where
        assert env == f"{settings.ENV_PREFIX}{section.upper()}_{key.upper()}", where
        assert len(meaning) > 10, f"{where}: say what it means"


def test_documented_variables_are_the_ones_the_loader_accepts() -> None:
    """The documented name, set in the environment, reaches the key it names (a default value,
    so that no validation rule stands in the way)."""
    for section, rows in _documented().items():
        for key, (type_name, _, env, _) in rows.items():
            if type_name in {"path", "table of strings"}:
                continue  # no default an environment variable can spell
            value = getattr(getattr(settings.load(None, {}), section), key)
            if type_name == "list of strings":
                text = ",".join(value)
            elif type_name == "boolean":
                text = "true" if value else "false"
            else:
                text = str(value)
            loaded = settings.load(None, {env: text})
            assert getattr(getattr(loaded, section), key) == value, env


def test_the_config_variable_and_the_readme_link_are_documented() -> None:
    text = DOC.read_text()
    assert "KEYBROKER_CONFIG" in text
    readme = (ROOT / "README.md").read_text()
    assert "docs/CONFIGURATION.md" in readme
    assert "docs/OPERATIONS.md" in readme
