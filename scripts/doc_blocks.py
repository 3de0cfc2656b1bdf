#!/usr/bin/env python3
"""Run the command blocks of README.md and docs/*.md as a user would type them.

Every fenced ``sh`` block in those files carries a marker on the line just before its fence:

* ``<!-- runnable -->``: run it with bash (``set -euo pipefail``) from the repository's root
  folder, as written; it must exit 0.
* ``<!-- runnable: background -->``: start it (e.g. ``make run``), leave it running for the
  blocks after it, wait until its output says ``listening on port``, and stop it at the end
  with SIGINT, as Ctrl-C in its terminal would; its output must hold no traceback.
* ``<!-- not-runnable: REASON -->``: shown but not run, and the reason says why (a synopsis,
  a benchmark that takes a quarter of an hour, the test suite itself, ...).

An unmarked ``sh`` block, or a command listing hidden in a fence without ``sh``, is an error:
every command a reader may copy is either run or explained. README.md runs first, then
docs/*.md in name order, in one working copy: later blocks use what earlier ones made (the
dev environment, tokens, files).

Usage: ``python3 scripts/doc_blocks.py check`` (markers only) or ``python3 scripts/doc_blocks.py
run [--listen HOST:PORT]`` (from the root of a working copy: a fresh clone, since blocks write
.keybroker/ and files). ``--listen`` moves the broker off 127.0.0.1:50051 (sets ``LISTEN`` for
``make run`` and rewrites the address in the blocks), so a test run never meets a broker of yours.
Standard library only: the first-hour script runs it before any venv exists.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:50051"
MARKER = re.compile(r"<!--\s*(runnable(?::\s*background)?|not-runnable:\s*(?P<why>.*?))\s*-->")
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[\w+-]*)\s*$")
SHELL = {"sh", "bash", "shell", "console"}
COMMAND_START = re.compile(r"^\s*(\$ )?(keybroker|make|\.venv/|python3?|curl|grpcurl|export) ")
READY = re.compile(r"listening on port (\d+)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    """Line of the opening fence (1-based)."""
    kind: str
    """``run``, ``background`` or ``skip``."""
    reason: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


class MarkerError(Exception):
    pass


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The shell blocks of one Markdown file, with their markers; MarkerError for a shell block
    without one, or a command listing in a fence that does not say ``sh``."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = "\n".join(line[len(m["indent"]) :] for line in lines[i + 1 : end])
        info = m["info"]
        previous = lines[i - 1].strip() if i else ""
        marker = MARKER.fullmatch(previous)
        where = f"{path.name}:{i + 1}"
        if info in SHELL:
            if marker is None:
                raise MarkerError(
                    f"{where}: shell block without <!-- runnable --> or "
                    "<!-- not-runnable: REASON --> on the line before its fence"
                )
            if marker["why"] is not None:
                if not marker["why"].strip():
                    raise MarkerError(f"{where}: not-runnable needs a reason")
                kind = "skip"
            else:
                kind = "background" if "background" in marker[1] else "run"
            found.append(Block(path, i + 1, kind, (marker["why"] or "").strip(), body + "\n"))
        elif not info and body.strip() and COMMAND_START.match(body.splitlines()[0]):
            raise MarkerError(f"{where}: a command listing in a fence without 'sh': mark it")
        i = end + 1
    return found


def all_blocks(root: Path) -> list[Block]:
    return [b for path in doc_files(root) for b in blocks(path)]


def _environment(listen: str) -> dict[str, str]:
    """The user's environment minus keybroker settings (a user starting out has none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    env.pop("VIRTUAL_ENV", None)
    if listen != DEFAULT_LISTEN:
        env["LISTEN"] = listen
    return env


class Background:
    """A block left running (``make run``), in its own process group so Ctrl-C reaches it all."""

    def __init__(self, block: Block, script: str, root: Path, env: dict[str, str]) -> None:
        self.block = block
        self.log = root / f".doc-block-{block.line}.log"
        self._fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=root, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY.search(self.output()):
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.block.where}: exited early:\n{self.output()}")
            time.sleep(0.2)
        raise SystemExit(f"{self.block.where}: not ready after {timeout:.0f}s:\n{self.output()}")

    def interrupt(self, timeout: float = 60) -> int:
        """SIGINT to the block's process group (Ctrl-C); its exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        self._fh.close()
        return code


def run(root: Path, listen: str = DEFAULT_LISTEN, ready_timeout: float = 300) -> int:
    """Run every runnable block in order; 0 when all succeeded (and the background ones stopped
    cleanly), else 1 after printing the failing block and its output."""
    env = _environment(listen)
    background: list[Background] = []
    failed = False
    try:
        for block in all_blocks(root):
            if block.kind == "skip":
                print(f"-- {block.where}: not run ({block.reason})", flush=True)
                continue
            script = block.text.replace(DEFAULT_LISTEN, listen)
            print(f"-- {block.where}: {block.kind}\n{script}", end="", flush=True)
            if block.kind == "background":
                started = Background(block, script, root, env)
                background.append(started)
                started.wait_ready(ready_timeout)
                continue
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=root, env=env, capture_output=True, text=True, check=False, timeout=900,
            )  # fmt: skip
            sys.stdout.write(done.stdout + done.stderr)
            if done.returncode != 0:
                print(f"-- {block.where}: FAILED with exit code {done.returncode}", flush=True)
                failed = True
                break
    finally:
        for started in reversed(background):
            code = started.interrupt()
            output = started.output()
            tail = "\n".join(output.splitlines()[-3:])
            print(f"-- {started.block.where}: stopped (exit {code})\n{tail}", flush=True)
            # Ctrl-C ends `make` with its own code (or by the signal): what counts is that the
            # broker stopped by itself, without a traceback.
            if "Traceback" in output:
                print(f"-- {started.block.where}: FAILED: a traceback in its output", flush=True)
                failed = True
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["check", "run"], help="check markers, or run")
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"broker address (default {DEFAULT_LISTEN})"
    )
    parser.add_argument("--root", type=Path, default=Path(), help="working copy (default .)")
    args = parser.parse_args()
    try:
        found = all_blocks(args.root)
    except MarkerError as exc:
        print(f"doc_blocks: {exc}", file=sys.stderr)
        return 2
    if args.action == "check":
        for block in found:
            print(f"{block.where}: {block.kind} {block.reason}".rstrip())
        return 0
    return run(args.root.resolve(), args.listen)


if __name__ == "__main__":
    sys.exit(main())
