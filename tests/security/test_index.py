"""Every entry of a "Security" section of CHANGELOG.md has a regression test in tests/security/
that names it, and every name points at an entry that exists (tests/security/README.md).

A test names the entry it guards in the first line(s) of its docstring::

    \"\"\"Unreleased, Security: "The JWKS fetch no longer follows a redirect to another scheme,
    host or port".

``<version>, <section>: "<the entry's opening words>"``: the version as its ``## [...]`` heading
spells it, the ``###`` section, and a quote the entry (white space folded) starts with and no
other entry of that section does. Fixes described in other sections (Fixed, Changed, Added) may be
named the same way; only Security entries must be."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
_HEADER = re.compile(r'^(?P<version>[^\s,]+), (?P<section>[A-Z][a-z]+): "(?P<quote>[^"]+)"')


@dataclass(frozen=True)
class Entry:
    version: str
    section: str
    text: str


@dataclass(frozen=True)
class Guard:
    test: str
    version: str
    section: str
    quote: str


def _fold(text: str) -> str:
    return " ".join(text.split())


def changelog_entries(text: str) -> list[Entry]:
    """Every ``- `` entry of a Keep a Changelog file, with its version and section."""
    entries: list[Entry] = []
    version = section = ""
    current: list[str] | None = None

    def close() -> None:
        nonlocal current
        if current is not None:
            entries.append(Entry(version, section, _fold(" ".join(current))))
        current = None

    for line in text.splitlines():
        if line.startswith("## "):
            close()
            found = re.match(r"## \[([^\]]+)\]", line)
            version, section = (found.group(1) if found else line[3:].strip()), ""
        elif line.startswith("### "):
            close()
            section = line[4:].strip()
        elif line.startswith("- ") and section:
            close()
            current = [line[2:]]
        elif current is not None and line.startswith("  "):
            current.append(line)
        else:
            close()
    close()
    return entries


def guards(folder: Path) -> tuple[list[Guard], list[str]]:
    """The entries the tests of ``folder`` name, and the tests that name none."""
    found: list[Guard] = []
    unnamed: list[str] = []
    for path in sorted(folder.glob("test_*.py")):
        if path.name == "test_index.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                where = f"{path.name}::{node.name}"
                header = _HEADER.match(_fold(ast.get_docstring(node) or ""))
                if header is None:
                    unnamed.append(where)
                else:
                    found.append(
                        Guard(where, header["version"], header["section"], _fold(header["quote"]))
                    )
    return found, unnamed


def check(entries: list[Entry], named: list[Guard]) -> list[str]:
    """What is wrong: Security entries no test names, names matching no entry (or several)."""
    problems: list[str] = []
    covered: set[Entry] = set()
    for guard in named:
        matches = [
            e
            for e in entries
            if (e.version, e.section) == (guard.version, guard.section)
            and e.text.startswith(guard.quote)
        ]
        if len(matches) != 1:
            problems.append(
                f"{guard.test} names {guard.version}, {guard.section}: {guard.quote!r}, which "
                f"matches {len(matches)} CHANGELOG entries (it must match exactly one)"
            )
        covered.update(matches)
    for entry in entries:
        if entry.section == "Security" and entry not in covered:
            problems.append(
                f"no regression test in tests/security/ names [{entry.version}] Security: "
                f"{entry.text[:100]!r}"
            )
    return problems


def test_every_security_entry_has_a_regression_test() -> None:
    """The project's CHANGELOG against the tests of this folder."""
    entries = changelog_entries((ROOT / "CHANGELOG.md").read_text())
    assert sum(e.section == "Security" for e in entries) >= 24
    named, unnamed = guards(HERE)
    assert unnamed == [], "each test here names the CHANGELOG entry it guards"
    assert check(entries, named) == []


SAMPLE = """# Changelog

## [Unreleased]

### Security
- Tokens are checked
  twice now.
- A new fix nobody tested.
- Tokens are checked by key id.

### Fixed
- Tokens are checked once more.

## [1.0.0] - 2026-01-01

### Security
- Tokens are checked at all.
"""


@pytest.mark.parametrize(
    ("named", "problem"),
    [
        ([("Unreleased", "Security", "Tokens are checked twice")], "A new fix nobody tested"),
        ([("Unreleased", "Security", "Tokens are checked")], "matches 2"),
        ([("Unreleased", "Security", "Tokens are checked thrice")], "matches 0"),
        ([("1.0.0", "Fixed", "Tokens are checked at all")], "matches 0"),
    ],
)
def test_the_index_finds_what_is_missing_or_stale(
    named: list[tuple[str, str, str]], problem: str
) -> None:
    """A Security entry without a test, a name that matches no entry (another wording, another
    section) and one that matches several are reported."""
    entries = changelog_entries(SAMPLE)
    assert [(e.version, e.section) for e in entries] == [
        ("Unreleased", "Security"),
        ("Unreleased", "Security"),
        ("Unreleased", "Security"),
        ("Unreleased", "Fixed"),
        ("1.0.0", "Security"),
    ]
    assert entries[0].text == "Tokens are checked twice now."
    guards_ = [Guard(f"t{i}", *n) for i, n in enumerate(named)]
    assert any(problem in p for p in check(entries, guards_))


def test_a_fully_covered_changelog_passes() -> None:
    entries = changelog_entries(SAMPLE)
    named = [
        Guard("a", "Unreleased", "Security", "Tokens are checked twice"),
        Guard("b", "Unreleased", "Security", "A new fix"),
        Guard("b2", "Unreleased", "Security", "Tokens are checked by"),
        Guard("c", "1.0.0", "Security", "Tokens are checked at all"),
        Guard("d", "Unreleased", "Fixed", "Tokens are checked once more"),
    ]
    assert check(entries, named) == []
