"""Fuzz one harness: ``python -m tests.fuzz.run <harness> [libFuzzer flags] [corpus folders]``.

The harness module is imported inside atheris' import hook, so the code under test (keybroker,
PyJWT, tomllib) is instrumented for coverage; nothing of it may be imported before that. A libFuzzer dictionary ``tests/fuzz/<harness>.dict``
is passed when it exists.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from tests.fuzz._common import HARNESSES, INSTRUMENTED


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in HARNESSES:
        raise SystemExit(
            f"usage: python -m tests.fuzz.run {{{','.join(HARNESSES)}}} [flags] [dirs]"
        )
    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports(include=list(INSTRUMENTED[argv[1]])):
        module = importlib.import_module(f"tests.fuzz.fuzz_{argv[1]}")
    flags = argv[2:]
    dictionary = Path(__file__).with_name(f"{argv[1]}.dict")
    if dictionary.exists() and not any(f.startswith("-dict=") for f in flags):
        flags = [f"-dict={dictionary}", *flags]
    atheris.Setup([argv[0], *flags], module.test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
