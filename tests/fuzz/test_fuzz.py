"""The fuzzing harnesses inside ``make test``: a short seeded run of each, the inputs of every past
finding replayed, and proof that each harness's checks can fail.

The long campaign is ``make fuzz`` (tests/fuzz/campaign.py); its figures are in docs/SECURITY.md.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keybroker import settings as settings_mod
from keybroker.client.recording import RecordingHeader
from keybroker.core.identity import Principal
from keybroker.core.wrapped_key import WrappedKey
from tests.fuzz import fuzz_recording, fuzz_settings, fuzz_tokens, fuzz_wrapped_key
from tests.fuzz._common import CORPUS, HARNESSES, FuzzFailure

ROOT = Path(__file__).resolve().parents[2]
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
VECTORS = ROOT / "tests" / "vectors"

#: Executions of the seeded run per harness: a few seconds each on a loaded 2-core machine.
SEEDED_RUNS = {
    "wrapped_key": 20_000,
    "recording": 5_000,
    "tokens": 2_000,
    "settings": 2_000,
    "rpc": 300,
}


def _fuzz(harness: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", harness, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
        check=False,
    )


def test_every_harness_has_seeds_and_a_planned_run() -> None:
    """Each harness in the list has a seed corpus and a seeded run here."""
    assert set(SEEDED_RUNS) == set(HARNESSES)
    for harness in HARNESSES:
        assert any((CORPUS / harness).iterdir()), harness


@pytest.mark.slow
@pytest.mark.parametrize("harness", HARNESSES)
def test_seeded_run(harness: str, tmp_path: Path) -> None:
    """A bounded, deterministic (seed 1) atheris run from the committed seeds finds nothing."""
    scratch = tmp_path / "corpus"
    scratch.mkdir()
    runs = SEEDED_RUNS[harness]
    done = _fuzz(
        harness,
        [
            f"-runs={runs}",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            str(scratch),
            str(CORPUS / harness),
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Done {runs} runs" in done.stderr


@pytest.mark.parametrize("harness", sorted(p.name for p in REGRESSIONS.iterdir()))
def test_past_findings_stay_fixed(harness: str, tmp_path: Path) -> None:
    """Every input that once broke a harness (tests/fuzz/regressions/<harness>/, named after what
    it found) is replayed through it and passes."""
    inputs = sorted(str(p) for p in (REGRESSIONS / harness).iterdir())
    done = _fuzz(harness, [f"-artifact_prefix={tmp_path}/", *inputs], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Executed ") == len(inputs)


# -- the checks of each harness can fail ---------------------------------------------------------


def _valid_blob() -> bytes:
    vectors = json.loads((VECTORS / "wrapped_key_v2.json").read_text())
    return bytes.fromhex(vectors["valid"][0]["blob"])


def test_wrapped_key_harness_refuses_a_lenient_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parser that ignored a trailing byte would be caught: the blob is not canonical."""
    blob = _valid_blob()
    assert fuzz_wrapped_key.check_blob(blob) is not None
    strict = WrappedKey.parse
    monkeypatch.setattr(WrappedKey, "parse", staticmethod(lambda b: strict(b[:-1])))
    with pytest.raises(FuzzFailure, match="non-canonical"):
        fuzz_wrapped_key.check_blob(blob + b"\0")


def test_recording_harness_refuses_a_reader_that_skips_authentication(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader that returned without checking the segments would be caught."""
    vector = json.loads((VECTORS / "recording_v1.json").read_text())["valid"][2]
    key, blob = bytes.fromhex(vector["data_key"]), bytes.fromhex(vector["file"])
    fuzz_recording.check_raw(key, blob)  # genuine: accepted, and what encrypt_stream makes

    def unauthenticated(src: io.BytesIO, dst: io.BytesIO, key_for: object) -> int:
        header = RecordingHeader.read(src)
        key_for(header)  # type: ignore[operator]
        return 0

    monkeypatch.setattr(fuzz_recording, "decrypt_stream", unauthenticated)
    with pytest.raises(FuzzFailure, match="would not make"):
        fuzz_recording.check_raw(key, blob[:-1] + bytes([blob[-1] ^ 1]))


def test_token_harness_refuses_a_verifier_that_accepts_forgeries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A verifier accepting a token with a wrong signature would be caught (the harness checks
    the signature and claims itself); a genuine token passes."""
    alg = "ES256"
    header, claims = fuzz_tokens.valid_header(alg), fuzz_tokens.valid_claims()
    token = fuzz_tokens.sign(fuzz_tokens._json(header), fuzz_tokens._json(claims), alg)
    assert fuzz_tokens.check(token) is not None
    forged = token[: token.rindex(".") + 1] + "A" * 86

    class Credulous:
        def verify(self, _token: str) -> Principal:
            return Principal("s", "j", 0, frozenset(), frozenset())

    monkeypatch.setattr(fuzz_tokens, "verifier", Credulous)
    with pytest.raises(FuzzFailure, match="must be refused"):
        fuzz_tokens.check(forged)


def test_settings_harness_refuses_non_finite_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings holding NaN would be caught even when load() raised nothing."""
    broken = settings_mod.Settings(state=settings_mod.StateSettings(refresh_interval=float("nan")))
    monkeypatch.setattr(settings_mod, "load", lambda *_a, **_k: broken)
    with pytest.raises(FuzzFailure, match="refresh_interval"):
        fuzz_settings.check(b"", {})
