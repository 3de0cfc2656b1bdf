"""Wrapped-key format v2 (the IV is the one the HSM used; the AAD is everything before it):
known-answer vectors from the independent generator, expected failures, tampering, fuzzing, and
v1 still readable beside it."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keybroker.core.wrapped_key import (
    FORMAT_V1,
    FORMAT_V2,
    FORMAT_VERSION,
    NONCE_SIZE,
    KeyRef,
    WrappedKey,
)
from keybroker.errors import InvalidWrappedKeyError

from ._vectors import (
    CIPHERTEXT_SIZE,
    GENERATOR_V2,
    VECTOR_FILE_V2,
    InvalidVector,
    ValidVector,
    load,
)
from ._vectors import VALID as VALID_V1

VALID, INVALID = load(VECTOR_FILE_V2)
PARSE_FAILURES = [v for v in INVALID if v.stage == "parse"]
AUTH_FAILURES = [v for v in INVALID if v.stage == "authenticate"]
SMALL_VALID = [v for v in VALID if len(v.blob) < 1024]
UNIFORM_MESSAGE = "wrapped key is invalid"
DOCS_FORMAT = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def ids(vectors: list[ValidVector] | list[InvalidVector]) -> list[str]:
    return [v.id for v in vectors]


def valid(vector_id: str) -> ValidVector:
    return next(v for v in VALID if v.id == vector_id)


def gcm_opens(kek: bytes, parsed: WrappedKey) -> bytes:
    return AESGCM(kek).decrypt(parsed.nonce, parsed.ciphertext, parsed.aad)


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_wrapped_key_v2", GENERATOR_V2)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


# -- the vector file itself -------------------------------------------------------------------


def test_vector_file_is_what_the_independent_generator_writes() -> None:
    """The committed JSON is exactly the output of generate_wrapped_key_v2.py (not hand-edited)."""
    assert load_generator().render() == VECTOR_FILE_V2.read_text(encoding="utf-8")


def test_generator_is_independent_of_keybroker() -> None:
    """The v2 generator imports nothing of keybroker (it borrows only the v1 generator, itself
    checked independent, by file path)."""
    tree = ast.parse(GENERATOR_V2.read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported
    assert not {name for name in imported if name.split(".")[0] in ("keybroker", "tests")}
    assert "generate_wrapped_key_v1.py" in GENERATOR_V2.read_text(encoding="utf-8")


def test_new_wraps_write_v2() -> None:
    """The format new wraps write is v2; v1 stays a known version."""
    assert (FORMAT_V1, FORMAT_V2, FORMAT_VERSION) == (1, 2, 2)


def test_failure_vectors_cover_the_v2_specific_defects() -> None:
    """The nonce outside the AAD, cross-version relabelling and an unknown version are covered."""
    names = set(ids(INVALID))
    assert {
        "nonce_flipped",
        "nonce_changed",
        "v1_relabelled_as_v2",
        "v2_relabelled_as_v1",
        "format_version_3",
        "truncated_to_nonce",
        "bindings_length_overrun",
        "tag_flipped",
    } <= names


# -- valid vectors ----------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_encoder_reproduces_vector(vector: ValidVector) -> None:
    """keybroker's encoder, fed the request values, writes the vector's AAD byte for byte, and
    joining it with the HSM's nonce and ciphertext gives the vector's blob."""
    aad = WrappedKey.aad_v2(vector.key, vector.bindings())
    assert aad == vector.aad
    assert WrappedKey.join_v2(aad, vector.nonce, vector.ciphertext) == vector.blob
    assert len(vector.blob) == vector.aad_length + NONCE_SIZE + CIPHERTEXT_SIZE


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_parse_round_trips_vector(vector: ValidVector) -> None:
    """parse() reads every field and encode() gives the same bytes back."""
    parsed = WrappedKey.parse(vector.blob)
    assert parsed.format_version == FORMAT_V2
    assert parsed.key == vector.key
    assert parsed.nonce == vector.nonce
    assert parsed.ciphertext == vector.ciphertext
    assert parsed.bindings == vector.expected_bindings()
    assert parsed.aad == vector.aad
    assert parsed.encode() == vector.blob
    rebuilt = WrappedKey(parsed.key, parsed.nonce, parsed.bindings, parsed.ciphertext)
    assert rebuilt.aad == vector.aad
    assert rebuilt.encode() == vector.blob


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_vector_seals_and_opens_with_aesgcm(vector: ValidVector) -> None:
    """The ciphertext is AES-256-GCM(kek, nonce, data key, AAD without the nonce), both ways."""
    gcm = AESGCM(vector.kek)
    assert gcm.encrypt(vector.nonce, vector.data_key, vector.aad) == vector.ciphertext
    assert gcm_opens(vector.kek, WrappedKey.parse(vector.blob)) == vector.data_key


@pytest.mark.parametrize("vector", VALID_V1, ids=[v.id for v in VALID_V1])
def test_v1_vectors_still_parse_as_v1(vector: ValidVector) -> None:
    """Every v1 blob parses as format 1 with its v1 AAD (nonce included) and opens."""
    parsed = WrappedKey.parse(vector.blob)
    assert parsed.format_version == FORMAT_V1
    assert parsed.aad == vector.aad
    assert parsed.encode() == vector.blob
    assert gcm_opens(vector.kek, parsed) == vector.data_key


def test_join_refuses_a_wrong_sized_nonce_or_ciphertext() -> None:
    """An HSM answer of the wrong size never becomes a blob."""
    vector = valid("typical")
    with pytest.raises(ValueError, match="wrong size"):
        WrappedKey.join_v2(vector.aad, vector.nonce[:-1], vector.ciphertext)
    with pytest.raises(ValueError, match="wrong size"):
        WrappedKey.join_v2(vector.aad, vector.nonce, vector.ciphertext + b"\x00")


# -- expected failures ------------------------------------------------------------------------


@pytest.mark.parametrize("vector", PARSE_FAILURES, ids=ids(PARSE_FAILURES))
def test_parse_failure_vector_is_refused(vector: InvalidVector) -> None:
    """Every blob of stage 'parse' is refused by the parser with the uniform error."""
    with pytest.raises(InvalidWrappedKeyError) as info:
        WrappedKey.parse(vector.blob)
    assert str(info.value) == UNIFORM_MESSAGE


@pytest.mark.parametrize("vector", AUTH_FAILURES, ids=ids(AUTH_FAILURES))
def test_authenticate_failure_vector_parses_but_fails_gcm(vector: InvalidVector) -> None:
    """Every blob of stage 'authenticate' is well formed (v1 or v2), and AES-GCM refuses it."""
    parsed = WrappedKey.parse(vector.blob)
    assert parsed.encode() == vector.blob
    with pytest.raises(InvalidTag):
        gcm_opens(valid(vector.kek_of).kek, parsed)


# -- tampering --------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", SMALL_VALID, ids=ids(SMALL_VALID))
def test_every_single_byte_change_is_caught(vector: ValidVector) -> None:
    """Every change of every byte (AAD, nonce, ciphertext, tag) either fails to parse or fails
    GCM: the nonce, outside the AAD, is authenticated as GCM's IV."""
    accepted = 0
    for pos in range(len(vector.blob)):
        for delta in range(1, 256):
            mutated = bytearray(vector.blob)
            mutated[pos] ^= delta
            try:
                parsed = WrappedKey.parse(bytes(mutated))
            except InvalidWrappedKeyError:
                continue
            accepted += 1
            with pytest.raises(InvalidTag):
                gcm_opens(vector.kek, parsed)
    assert accepted > 0


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_every_truncation_is_refused(vector: ValidVector) -> None:
    """Every proper prefix of a valid blob (including the empty one) fails to parse."""
    for length in range(len(vector.blob)):
        with pytest.raises(InvalidWrappedKeyError):
            WrappedKey.parse(vector.blob[:length])


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_bytes_after_a_valid_v2_prefix(tail: bytes) -> None:
    """Arbitrary bytes after a v2 magic, version and key reference only ever raise
    InvalidWrappedKeyError, and whatever parses re-encodes to itself."""
    blob = b"KBW\x02\x0arecordings\x00\x00\x00\x01" + tail
    try:
        parsed = WrappedKey.parse(blob)
    except InvalidWrappedKeyError:
        return
    assert parsed.encode() == blob


@FUZZ
@given(st.binary(min_size=12, max_size=12), st.integers(1, 0xFFFFFFFF))
def test_fuzz_any_nonce_and_version_round_trip(nonce: bytes, version: int) -> None:
    """Any 12-byte nonce and key version survive a v2 round trip."""
    bindings = valid("typical").bindings()
    key = KeyRef("recordings", version)
    blob = WrappedKey.join_v2(WrappedKey.aad_v2(key, bindings), nonce, bytes(CIPHERTEXT_SIZE))
    parsed = WrappedKey.parse(blob)
    assert (parsed.key, parsed.nonce, parsed.bindings) == (key, nonce, bindings)


def test_repr_shows_neither_nonce_nor_ciphertext() -> None:
    """A v2 WrappedKey's repr names the format, key and recording, nothing secret."""
    vector = valid("typical")
    text = repr(WrappedKey.parse(vector.blob))
    assert text == "WrappedKey(v2, key=recordings/v1, recording_id='rec-0001')"
    for secret in (vector.nonce, vector.ciphertext, vector.data_key):
        assert secret.hex() not in text


# -- the documentation ------------------------------------------------------------------------


def test_format_doc_worked_example_v2_matches_the_vector() -> None:
    """docs/FORMAT.md shows the hex dump of v2 vector 'typical' unchanged."""
    doc = DOCS_FORMAT.read_text(encoding="utf-8")
    section = doc[doc.index("## Worked example, v2") :]
    section = section[: section.index("\n## ", 5)]
    dump = "".join(
        line[6:].replace(" ", "")
        for line in section.splitlines()
        if re.fullmatch(r"[0-9a-f]{4}  .*", line)
    )
    assert dump == valid("typical").blob.hex()


def test_format_doc_verification_snippet_opens_every_vector() -> None:
    """The independent open_wrapped_key in docs/FORMAT.md opens every v1 and v2 vector."""
    doc = DOCS_FORMAT.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, re.DOTALL)
    snippet = next(b for b in blocks if "def open_wrapped_key" in b)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, str(DOCS_FORMAT), "exec"), namespace)  # noqa: S102 - our own doc
    for vector in [*VALID, *VALID_V1]:
        assert namespace["open_wrapped_key"](vector.blob, vector.kek) == vector.data_key
    with pytest.raises(InvalidTag):
        namespace["open_wrapped_key"](valid("typical").blob, valid("unicode_many").kek)


def test_format_doc_v2_field_table_matches_the_blob() -> None:
    """Every row of the v2 worked example's field table shows the bytes at its offset (rows
    abbreviated with an ellipsis are checked at both ends)."""
    doc = DOCS_FORMAT.read_text(encoding="utf-8")
    section = doc[doc.index("## Worked example, v2") :]
    section = section[: section.index("\n## ", 5)]
    blob = valid("typical").blob
    rows = re.findall(r"^\| 0x([0-9a-f]+) \| `([0-9a-f …]+)`", section, re.MULTILINE)
    assert len(rows) >= 9
    for offset_hex, shown in rows:
        offset = int(offset_hex, 16)
        head, _, tail = shown.partition("…")
        head_bytes, tail_bytes = bytes.fromhex(head), bytes.fromhex(tail)
        assert blob[offset : offset + len(head_bytes)] == head_bytes, offset_hex
        if tail_bytes:
            assert tail_bytes in blob[offset:], offset_hex
