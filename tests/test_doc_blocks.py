"""Every command block of README.md and docs/ runs as written (scripts/doc_blocks.py): in a fresh
copy of the repository, from its root folder, with `make run` started in the background as the
README says, `make demo` among the blocks. Blocks that cannot run unattended say why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.process import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import doc_blocks  # noqa: E402


def test_every_shell_block_is_marked_runnable_or_explained() -> None:
    """No shell block without a marker, no command listing outside a `sh` fence, a reason for
    every block that is not run, and the quick start's `make run` is the one background block."""
    found = doc_blocks.all_blocks(ROOT)
    assert all(b.reason for b in found if b.kind == "skip")
    background = [b for b in found if b.kind == "background"]
    assert [(b.path.name, b.text.split()[:2]) for b in background] == [
        ("README.md", ["make", "run"])
    ]
    runnable = "".join(b.text for b in found if b.kind == "run")
    for command in ("make demo", "keybroker encrypt", "keybroker decrypt", "dev token"):
        assert command in runnable


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("```sh\nmake run\n```\n", "without <!-- runnable -->"),
        ("<!-- not-runnable: -->\n```sh\nmake run\n```\n", "needs a reason"),
        ("```\nkeybroker serve --config x.toml\n```\n", "fence without 'sh'"),
    ],
)
def test_unmarked_blocks_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    """The checker itself: each way of hiding a command from the runner is an error."""
    doc = tmp_path / "README.md"
    doc.write_text("# t\n\n" + text)
    with pytest.raises(doc_blocks.MarkerError, match=problem):
        doc_blocks.blocks(doc)


def _copy_of_the_repository(dest: Path) -> None:
    """The files a clone would have: the tracked ones, as they are in this working copy (not
    untracked files, such as what these blocks leave behind when a user runs them here)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if not source.is_file():
            continue  # deleted in the working copy
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        target.chmod(source.stat().st_mode & 0o777)


def test_readme_and_docs_blocks_run_as_written(tmp_path: Path) -> None:
    """`make run` in the background, then each block in order; each exits 0 and the broker
    stops on Ctrl-C. The venv is this one (made by `make venv`), linked in, so no block
    reinstalls it."""
    venv = Path(sys.prefix)
    installed = venv / "bin" / ".installed"
    assert installed.exists(), "run the suite through `make test` (or `make venv` first)"
    clone = tmp_path / "keybroker"
    _copy_of_the_repository(clone)
    (clone / ".venv").symlink_to(venv)
    stamp = installed.stat().st_mtime - 60  # make sees the venv up to date with pyproject.toml
    os.utime(clone / "pyproject.toml", (stamp, stamp))
    listen = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "scripts/doc_blocks.py", "run", "--listen", listen],
        cwd=clone, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "FAILED" not in out
    assert "the same bytes" in out  # encrypt, decrypt, compare
    erased = out.index("EraseRecording   allow")  # make demo ends with the privacy plane
    assert out.index("EraseRecording   deny     legal_hold") < erased
    assert out.index("UnwrapDataKey    deny     erased") > erased
    (make_run,) = [b for b in doc_blocks.all_blocks(clone) if b.kind == "background"]
    log = (clone / f".doc-block-{make_run.line}.log").read_text()
    assert "listening on port" in log
    assert "signal 2: stopping" in log  # the broker itself got the Ctrl-C, and stopped
    assert (clone / ".keybroker" / "client.token").stat().st_mode & 0o777 == 0o600
