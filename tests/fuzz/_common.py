"""What every harness shares: the failure type, typed fuzzer input, the seed corpus folder.

A harness module ``tests/fuzz/fuzz_<name>.py`` defines ``test_one_input(data: bytes) -> None``;
``python -m tests.fuzz.run <name> [libFuzzer flags] [corpus folders]`` imports it with atheris'
coverage instrumentation of the code under test and fuzzes it. ``test_one_input`` raises
:class:`FuzzFailure` (or lets any unexpected exception escape) when the code under test
misbehaves; atheris then stops, prints the traceback and writes the input to ``crash-<sha1>``
(under ``-artifact_prefix``).

Command line: libFuzzer's flags (``-runs=N``, ``-max_total_time=S``, ``-seed=N``,
``-artifact_prefix=DIR/``) followed by corpus folders; atheris adds new inputs to the first
folder only, so a run that must not change the committed corpus passes a scratch folder first and
``tests/fuzz/corpus/<harness>`` after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, TypeVar, cast

import atheris  # type: ignore[import-untyped]

T = TypeVar("T")
CORPUS = Path(__file__).resolve().parent / "corpus"

HARNESSES = ("wrapped_key", "recording", "tokens", "settings", "rpc")
"""Every harness, in the order the campaign runs them."""

#: Per harness, the packages whose Python code atheris instruments for coverage feedback. The RPC
#: harness leaves the adapters (database, journal, HSM) uninstrumented: they are not what it
#: explores, and instrumenting them costs it half its speed.
INSTRUMENTED = {
    "wrapped_key": ("keybroker",),
    "recording": ("keybroker",),
    "tokens": ("keybroker", "jwt"),
    "settings": ("keybroker", "tomllib"),
    "rpc": ("keybroker.server", "keybroker.core"),
}

#: For ``Provider.ConsumeBytes``: everything left.
ALL_REMAINING: int = atheris.ALL_REMAINING


class FuzzFailure(AssertionError):
    """The code under test broke a property the harness checks."""


def corpus_dir(harness: str) -> Path:
    return CORPUS / harness


class Provider(Protocol):
    """The part of ``atheris.FuzzedDataProvider`` the harnesses use (atheris ships no types)."""

    def ConsumeBytes(self, count: int) -> bytes: ...
    def ConsumeUnicode(self, count: int) -> str: ...
    def ConsumeUnicodeNoSurrogates(self, count: int) -> str: ...
    def ConsumeIntInRange(self, low: int, high: int) -> int: ...
    def ConsumeBool(self) -> bool: ...
    def ConsumeFloat(self) -> float: ...
    def ConsumeRegularFloat(self) -> float: ...
    def PickValueInList(self, values: list[T]) -> T: ...
    def remaining_bytes(self) -> int: ...


def provider(data: bytes) -> Provider:
    """Typed values drawn from fuzzer bytes (``atheris.FuzzedDataProvider``)."""
    return cast(Provider, atheris.FuzzedDataProvider(data))
