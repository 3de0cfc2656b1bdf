"""The user docs stay findable and self-contained: README.md is a short entry page that links the
references, every relative link in README.md and docs/ lands on a file (and heading) of the
repository, and no file of the repository cites a file outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^ *```.*?^ *```", re.MULTILINE | re.DOTALL)
#: Files other branches add; a link to one of them is checked once it exists.


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_readme_is_an_entry_page_of_at_most_10_kb() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024
    for page in ("CONFIGURATION", "OPERATIONS", "CONCURRENCY", "TROUBLESHOOTING", "API", "CLIENT"):
        assert f"](docs/{page}.md" in readme, page
    for section in ("## Quick start", "## Concepts", "## API summary", "## Documentation"):
        assert section in readme


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_land_on_a_file_and_heading(doc: Path) -> None:
    text = FENCE.sub("", doc.read_text())
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        name, _, anchor = target.partition("#")
        path = (doc.parent / name).resolve() if name else doc
        assert path.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: link to {target}: no such heading"


def test_no_file_cites_anything_outside_the_repository() -> None:
    """Notes kept beside the repository (the team's measured facts, style guide) are not shipped:
    a product file that cites them sends the reader nowhere."""
    outside = ("FACTS" + ".md", "../" + "shared", "STYLE" + ".md")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    cited = []
    for name in filter(None, listed.split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        cited += [f"{name}: {o}" for o in outside if o in text]
    assert cited == []
