"""Wrapped-key format v1: known-answer vectors, expected failures, tampering, fuzzing, bounds."""

from __future__ import annotations

import ast
import base64
import importlib.util
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keybroker.core import wrapped_key
from keybroker.core.broker import GeneratedKey, RewrappedKey, SecretBytes, UnwrappedKey
from keybroker.core.wrapped_key import (
    MAX_RETAIN_UNTIL,
    MAX_WRAPPED_KEY_SIZE,
    Bindings,
    KeyRef,
    WrappedKey,
)
from keybroker.errors import InvalidRequestError, InvalidWrappedKeyError

from ._vectors import (
    AUTH_FAILURES,
    CIPHERTEXT_SIZE,
    GENERATOR,
    INVALID,
    PARSE_FAILURES,
    VALID,
    VECTOR_FILE,
    InvalidVector,
    ValidVector,
    utf8_sorted,
    valid,
)

UNIFORM_MESSAGE = "wrapped key is invalid"
SMALL_VALID = [v for v in VALID if len(v.blob) < 1024]
DOCS_FORMAT = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def ids(vectors: list[ValidVector] | list[InvalidVector]) -> list[str]:
    return [v.id for v in vectors]


def kek_for(vector: InvalidVector) -> bytes:
    return valid(vector.kek_of).kek


def gcm_opens(kek: bytes, parsed: WrappedKey) -> bytes:
    return AESGCM(kek).decrypt(parsed.nonce, parsed.ciphertext, parsed.aad)


def assert_refused(blob: bytes) -> InvalidWrappedKeyError:
    """Parsing ``blob`` raises InvalidWrappedKeyError with the one uniform message."""
    with pytest.raises(InvalidWrappedKeyError) as info:
        WrappedKey.parse(blob)
    err = info.value
    assert str(err) == UNIFORM_MESSAGE
    assert err.message == UNIFORM_MESSAGE
    assert err.reason == "wrapped_key_invalid"
    return err


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_wrapped_key_v1", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


# -- the vector file itself -------------------------------------------------------------------


def test_vector_file_is_what_the_independent_generator_writes() -> None:
    """The committed JSON is exactly the output of generate_wrapped_key_v1.py (not hand-edited)."""
    generator = load_generator()
    assert generator.render() == VECTOR_FILE.read_text(encoding="utf-8")


def test_generator_is_independent_of_keybroker() -> None:
    """The second implementation must not borrow keybroker's encoder, or the vectors prove nothing."""
    tree = ast.parse(GENERATOR.read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported
    assert not {name for name in imported if name.split(".")[0] == "keybroker"}


def test_vectors_cover_minimal_unicode_and_maximal_bindings() -> None:
    """The valid vectors include the smallest bindings, Unicode ones and every bound at its max."""
    minimal = valid("minimal")
    assert (len(minimal.purposes), len(minimal.subject_ids), len(minimal.context)) == (1, 0, 0)
    unicode_many = valid("unicode_many")
    assert any(ord(c) > 0xFFFF for s in unicode_many.subject_ids for c in s)
    assert len(set(unicode_many.purposes)) < len(unicode_many.purposes)  # a duplicate to drop
    big = valid("max_lengths")
    assert len(big.key.name) == 64
    assert big.key.version == 0xFFFFFFFF
    assert len(big.recording_id.encode()) == 255
    assert big.retain_until == MAX_RETAIN_UNTIL
    assert [len(p) for p in big.purposes] == [64] * 16
    assert [len(s.encode()) for s in big.subject_ids] == [128] * 64
    assert [(len(k.encode()), len(v.encode())) for k, v in big.context.items()] == [(64, 1024)] * 16


def test_failure_vectors_cover_every_class_of_defect() -> None:
    """Expected failures include each defect the brief and FORMAT.md name."""
    names = set(ids(INVALID))
    for required in (
        "bad_magic",
        "format_version_2",
        "truncated_tag",
        "trailing_byte",
        "purposes_unsorted",
        "purpose_duplicate",
        "key_version_zero",
        "tag_flipped",
        "key_name_too_long",
        "bindings_length_overrun",
        "context_value_too_long",
        "oversized_blob",
    ):
        assert required in names


# -- valid vectors ----------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_encoder_reproduces_vector_aad(vector: ValidVector) -> None:
    """keybroker's encoder, fed the request values, writes the vector's AAD byte for byte."""
    header = WrappedKey.header(vector.key, vector.nonce, vector.bindings())
    assert header == vector.aad
    assert len(vector.blob) == vector.aad_length + CIPHERTEXT_SIZE


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_parse_round_trips_vector(vector: ValidVector) -> None:
    """parse() reads every field of the vector and encode() gives the same bytes back."""
    parsed = WrappedKey.parse(vector.blob)
    assert parsed.key == vector.key
    assert parsed.nonce == vector.nonce
    assert parsed.ciphertext == vector.ciphertext
    assert parsed.bindings == vector.expected_bindings()
    assert parsed.bindings == vector.bindings()
    assert parsed.bindings.context_map == vector.context
    assert parsed.aad == vector.aad
    assert parsed.encode() == vector.blob


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_vector_seals_and_opens_with_aesgcm(vector: ValidVector) -> None:
    """The vector's ciphertext is AES-256-GCM(kek, nonce, data key, AAD), both ways."""
    gcm = AESGCM(vector.kek)
    assert gcm.encrypt(vector.nonce, vector.data_key, vector.aad) == vector.ciphertext
    assert gcm_opens(vector.kek, WrappedKey.parse(vector.blob)) == vector.data_key


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_bindings_encoding_ignores_request_order_and_duplicates(vector: ValidVector) -> None:
    """Reversed and repeated request values give the same canonical bindings and AAD."""
    shuffled = Bindings.create(
        recording_id=vector.recording_id,
        purposes=[*reversed(vector.purposes), *vector.purposes],
        subject_ids=[*reversed(vector.subject_ids), *vector.subject_ids],
        retain_until=vector.retain_until,
        context=dict(reversed(list(vector.context.items()))),
    )
    assert shuffled == vector.bindings()
    assert WrappedKey.header(vector.key, vector.nonce, shuffled) == vector.aad


def test_format_doc_worked_example_matches_the_vector() -> None:
    """docs/FORMAT.md's v1 example shows the hex dump, KEK and data key of vector 'typical'."""
    doc = DOCS_FORMAT.read_text(encoding="utf-8")
    doc = doc[doc.index("## Worked example, v1") :]
    doc = doc[: doc.index("\n## ", 5)]
    vector = valid("typical")
    dump = "".join(
        line[6:].replace(" ", "")
        for line in doc.splitlines()
        if re.fullmatch(r"[0-9a-f]{4}  .*", line)
    )
    assert dump == vector.blob.hex()
    assert vector.kek.hex() in doc
    assert vector.data_key.hex() in doc


def test_format_doc_verification_snippet_opens_every_vector() -> None:
    """The independent verification code in docs/FORMAT.md opens every valid vector."""
    doc = DOCS_FORMAT.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, re.DOTALL)
    snippet = next(b for b in blocks if "def open_v1" in b)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, str(DOCS_FORMAT), "exec"), namespace)  # noqa: S102 - our own doc
    for vector in VALID:
        assert namespace["open_v1"](vector.blob, vector.kek) == vector.data_key
    with pytest.raises(InvalidTag):
        namespace["open_v1"](valid("typical").blob, valid("unicode_many").kek)


# -- expected failures ------------------------------------------------------------------------


@pytest.mark.parametrize("vector", PARSE_FAILURES, ids=ids(PARSE_FAILURES))
def test_parse_failure_vector_is_refused(vector: InvalidVector) -> None:
    """Every blob of stage 'parse' is refused by the parser with the uniform error."""
    assert_refused(vector.blob)


@pytest.mark.parametrize("vector", AUTH_FAILURES, ids=ids(AUTH_FAILURES))
def test_authenticate_failure_vector_parses_but_fails_gcm(vector: InvalidVector) -> None:
    """Every blob of stage 'authenticate' is well formed, and AES-GCM refuses it."""
    parsed = WrappedKey.parse(vector.blob)
    assert parsed.encode() == vector.blob
    with pytest.raises(InvalidTag):
        gcm_opens(kek_for(vector), parsed)


def test_every_refusal_looks_the_same() -> None:
    """All parse failures carry identical type, message, reason and repr: no oracle."""
    seen: set[tuple[type[Exception], str, str, str]] = set()
    for vector in PARSE_FAILURES:
        try:
            WrappedKey.parse(vector.blob)
        except Exception as err:
            reason = err.reason if isinstance(err, InvalidWrappedKeyError) else ""
            seen.add((type(err), str(err), reason, repr(err)))
    assert seen == {
        (
            InvalidWrappedKeyError,
            UNIFORM_MESSAGE,
            "wrapped_key_invalid",
            repr(InvalidWrappedKeyError()),
        )
    }


def test_invalid_wrapped_key_is_an_invalid_request() -> None:
    """InvalidWrappedKeyError is a request error (INVALID_ARGUMENT), with no caller-set text."""
    err = InvalidWrappedKeyError()
    assert isinstance(err, InvalidRequestError)
    assert str(err) == UNIFORM_MESSAGE


# -- tampering --------------------------------------------------------------------------------


def _single_byte_changes(
    blob: bytes, positions: range | list[int], deltas: tuple[int, ...]
) -> Iterator[bytes]:
    for pos in positions:
        for delta in deltas:
            mutated = bytearray(blob)
            mutated[pos] ^= delta
            yield bytes(mutated)


def _aad_positions(vector: ValidVector) -> range | list[int]:
    """Every AAD byte of the small vectors; for the 27 KB one every header byte, then every
    7th bindings byte (7 is prime to the 64-, 128- and 1024-byte field sizes, so the positions
    walk through every field and every offset within a field)."""
    if len(vector.blob) < 1024:
        return range(vector.aad_length)
    header = 23 + len(vector.key.name)
    return [*range(header), *range(header, vector.aad_length, 7)]


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_every_single_byte_change_of_the_aad_is_caught(vector: ValidVector) -> None:
    """Changing any one header or bindings byte either fails to parse or changes the AAD.

    A changed AAD means GCM fails, which is checked too. The small vectors get all 255 changes of
    every byte; the 27 KB vector gets its low bit flipped (the change most likely to keep text
    valid, so the most likely to parse) at the positions of :func:`_aad_positions`.
    """
    deltas = tuple(range(1, 256)) if len(vector.blob) < 1024 else (0x01,)
    original = (vector.key, vector.nonce, vector.expected_bindings())
    accepted = 0
    for mutated in _single_byte_changes(vector.blob, _aad_positions(vector), deltas):
        try:
            parsed = WrappedKey.parse(mutated)
        except InvalidWrappedKeyError:
            continue
        accepted += 1
        aad = parsed.aad
        assert aad == mutated[: len(aad)]
        assert aad != vector.aad
        assert (parsed.key, parsed.nonce, parsed.bindings) != original
        with pytest.raises(InvalidTag):
            AESGCM(vector.kek).decrypt(parsed.nonce, parsed.ciphertext, aad)
    assert accepted > 0  # nonce and text bytes do parse: the GCM half of the check ran


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_every_ciphertext_or_tag_change_fails_gcm(vector: ValidVector) -> None:
    """Changing any ciphertext or tag byte leaves a parseable blob that GCM refuses."""
    positions = range(vector.aad_length, len(vector.blob))
    for mutated in _single_byte_changes(vector.blob, positions, (0x01, 0x80)):
        with pytest.raises(InvalidTag):
            gcm_opens(vector.kek, WrappedKey.parse(mutated))


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_every_truncation_is_refused(vector: ValidVector) -> None:
    """Every proper prefix of a valid blob (including the empty one) fails to parse."""
    for length in range(len(vector.blob)):
        assert_refused(vector.blob[:length])


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
@pytest.mark.parametrize("suffix", [b"\x00", b"\xff", b"KBW\x01", b"\x00" * 48])
def test_every_extension_is_refused(vector: ValidVector, suffix: bytes) -> None:
    """Bytes after the tag are refused."""
    assert_refused(vector.blob + suffix)


def test_blob_over_the_size_limit_is_refused_unread() -> None:
    """Input longer than MAX_WRAPPED_KEY_SIZE is refused, whatever it starts with."""
    assert_refused(valid("typical").blob.ljust(MAX_WRAPPED_KEY_SIZE + 1, b"\x00"))
    assert_refused(b"KBW\x01" * (MAX_WRAPPED_KEY_SIZE // 4 + 1))


# -- fuzzing ----------------------------------------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_or_refuse(blob: bytes) -> WrappedKey | None:
    """Parse; InvalidWrappedKeyError is the only acceptable failure (anything else propagates)."""
    try:
        parsed = WrappedKey.parse(blob)
    except InvalidWrappedKeyError as err:
        message = str(err)
    else:
        assert parsed.encode() == blob  # whatever parses is canonical: it re-encodes to itself
        return parsed
    assert message == UNIFORM_MESSAGE
    return None


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(blob: bytes) -> None:
    """Arbitrary bytes only ever raise InvalidWrappedKeyError."""
    _parse_or_refuse(blob)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_bytes_after_a_valid_prefix(tail: bytes) -> None:
    """Arbitrary bytes after a correct magic, version and key reference reach the bindings parser
    and still only raise InvalidWrappedKeyError."""
    _parse_or_refuse(b"KBW\x01\x0arecordings\x00\x00\x00\x01" + b"\x00" * 12 + tail)


_MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**16), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 8)),
    st.tuples(st.just("set"), st.integers(0, 2**16), st.sampled_from([0, 1, 0x7F, 0x80, 0xFF])),
)


def _mutate(blob: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(blob)
    for op, where, arg in mutations:
        pos = where % (len(data) + 1)
        if op == "insert":
            data.insert(pos, arg)
        elif not data:
            continue
        elif op == "delete":
            del data[pos : pos + arg]
        elif op == "flip":
            data[pos % len(data)] ^= arg
        else:
            data[pos % len(data)] = arg
    return bytes(data)


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(_MUTATIONS, min_size=1, max_size=6),
)
def test_fuzz_mutated_valid_blobs(
    vector: ValidVector, mutations: list[tuple[str, int, int]]
) -> None:
    """Flipped, inserted, deleted and overwritten bytes in valid blobs only ever raise
    InvalidWrappedKeyError; a mutated blob that still parses has a different AAD or ciphertext."""
    mutated = _mutate(vector.blob, mutations)
    parsed = _parse_or_refuse(mutated)
    if parsed is not None and mutated != vector.blob:
        with pytest.raises(InvalidTag):
            gcm_opens(vector.kek, parsed)


_TEXT = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
_PURPOSE = st.from_regex(r"[a-z0-9][a-z0-9._:-]{0,63}", fullmatch=True)


def _utf8_text(max_bytes: int, *, min_size: int = 1) -> st.SearchStrategy[str]:
    return st.text(_TEXT, min_size=min_size, max_size=max_bytes // 2).filter(
        lambda s: len(s.encode()) <= max_bytes
    )


@settings(max_examples=200, deadline=None)
@given(
    recording_id=_utf8_text(255),
    retain_until=st.integers(1, MAX_RETAIN_UNTIL),
    purposes=st.lists(_PURPOSE, min_size=1, max_size=16),
    subject_ids=st.lists(_utf8_text(128), max_size=8),
    context=st.dictionaries(_utf8_text(64), _utf8_text(200, min_size=0), max_size=6),
    nonce=st.binary(min_size=12, max_size=12),
    version=st.integers(1, 0xFFFFFFFF),
)
def test_fuzz_any_valid_bindings_round_trip(
    recording_id: str,
    retain_until: int,
    purposes: list[str],
    subject_ids: list[str],
    context: dict[str, str],
    nonce: bytes,
    version: int,
) -> None:
    """Any bindings within bounds encode, parse back equal, and are stored in canonical order."""
    bindings = Bindings.create(
        recording_id=recording_id,
        purposes=purposes,
        subject_ids=subject_ids,
        retain_until=retain_until,
        context=context,
    )
    assert bindings.purposes == utf8_sorted(purposes)
    assert bindings.subject_ids == utf8_sorted(subject_ids)
    key = KeyRef("recordings", version)
    blob = WrappedKey.header(key, nonce, bindings) + bytes(CIPHERTEXT_SIZE)
    parsed = WrappedKey.parse(blob)
    assert (parsed.key, parsed.nonce, parsed.bindings) == (key, nonce, bindings)


# -- Bindings.create bounds -------------------------------------------------------------------

BASE: dict[str, Any] = {
    "recording_id": "rec-1",
    "purposes": ["support"],
    "subject_ids": ["agent:1"],
    "retain_until": 1_800_000_000,
    "context": {"tenant": "acme"},
}


def create(**changes: Any) -> Bindings:
    return Bindings.create(**{**BASE, **changes})


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("recording_id_empty", {"recording_id": ""}, "bad_recording_id"),
    ("recording_id_256_bytes", {"recording_id": "x" * 256}, "bad_recording_id"),
    ("recording_id_256_utf8_bytes", {"recording_id": "é" * 128}, "bad_recording_id"),
    ("recording_id_nul", {"recording_id": "rec\x00"}, "bad_recording_id"),
    ("recording_id_newline", {"recording_id": "rec\n1"}, "bad_recording_id"),
    ("recording_id_unit_separator", {"recording_id": "rec\x1f"}, "bad_recording_id"),
    ("recording_id_del", {"recording_id": "rec\x7f"}, "bad_recording_id"),
    ("retain_until_zero", {"retain_until": 0}, "bad_retain_until"),
    ("retain_until_negative", {"retain_until": -1}, "bad_retain_until"),
    ("retain_until_after_9999", {"retain_until": MAX_RETAIN_UNTIL + 1}, "bad_retain_until"),
    ("purposes_empty", {"purposes": []}, "bad_purposes"),
    ("purposes_17", {"purposes": [f"p{i}" for i in range(17)]}, "bad_purposes"),
    ("purpose_65_chars", {"purposes": ["p" * 65]}, "bad_purposes"),
    ("purpose_empty_string", {"purposes": [""]}, "bad_purposes"),
    ("purpose_uppercase", {"purposes": ["Support"]}, "bad_purposes"),
    ("purpose_leading_dash", {"purposes": ["-support"]}, "bad_purposes"),
    ("purpose_leading_dot", {"purposes": [".support"]}, "bad_purposes"),
    ("purpose_space", {"purposes": ["legal hold"]}, "bad_purposes"),
    ("purpose_slash", {"purposes": ["legal/hold"]}, "bad_purposes"),
    ("purpose_non_ascii", {"purposes": ["qualité"]}, "bad_purposes"),
    ("purpose_trailing_newline", {"purposes": ["support\n"]}, "bad_purposes"),
    ("subjects_65", {"subject_ids": [f"s{i}" for i in range(65)]}, "bad_subject_ids"),
    ("subject_129_bytes", {"subject_ids": ["s" * 129]}, "bad_subject_ids"),
    ("subject_130_utf8_bytes", {"subject_ids": ["ü" * 65]}, "bad_subject_ids"),
    ("subject_empty", {"subject_ids": [""]}, "bad_subject_ids"),
    ("subject_tab", {"subject_ids": ["agent:\t1"]}, "bad_subject_ids"),
    ("context_17", {"context": {f"k{i}": "v" for i in range(17)}}, "bad_context"),
    ("context_key_65_bytes", {"context": {"k" * 65: "v"}}, "bad_context"),
    ("context_key_empty", {"context": {"": "v"}}, "bad_context"),
    ("context_key_newline", {"context": {"a\nb": "v"}}, "bad_context"),
    ("context_value_1025_bytes", {"context": {"k": "v" * 1025}}, "bad_context"),
    ("context_value_1026_utf8_bytes", {"context": {"k": "€" * 342}}, "bad_context"),
    ("context_value_escape", {"context": {"k": "\x1b[31m"}}, "bad_context"),
]


@pytest.mark.parametrize(
    ("changes", "reason"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_bindings_bound_is_refused(changes: dict[str, Any], reason: str) -> None:
    """Each out-of-bounds or malformed value raises InvalidRequestError naming the field."""
    with pytest.raises(InvalidRequestError) as info:
        create(**changes)
    assert type(info.value) is InvalidRequestError  # a request error, not a wrapped-key error
    assert info.value.reason == reason


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("recording_id_255_bytes", {"recording_id": "x" * 255}),
    ("recording_id_255_utf8_bytes", {"recording_id": "é" * 127 + "x"}),
    ("recording_id_unicode_and_space", {"recording_id": "録音 0001"}),
    ("retain_until_one", {"retain_until": 1}),
    ("retain_until_max", {"retain_until": MAX_RETAIN_UNTIL}),
    ("purposes_16", {"purposes": [f"p{i}" for i in range(16)]}),
    ("purposes_17_with_a_duplicate", {"purposes": [f"p{i}" for i in range(16)] + ["p0"]}),
    ("purpose_64_chars", {"purposes": ["p" * 64]}),
    ("purpose_every_allowed_char", {"purposes": ["0a.b_c:d-e9"]}),
    ("subjects_none", {"subject_ids": []}),
    ("subjects_64", {"subject_ids": [f"s{i}" for i in range(64)]}),
    ("subject_128_utf8_bytes", {"subject_ids": ["ü" * 64]}),
    ("context_none", {"context": {}}),
    ("context_16", {"context": {f"k{i}": "v" for i in range(16)}}),
    ("context_key_64_bytes", {"context": {"k" * 64: "v"}}),
    ("context_value_1024_bytes", {"context": {"k": "€" * 341 + "v"}}),
    ("context_value_empty", {"context": {"k": ""}}),
]


@pytest.mark.parametrize("changes", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_bindings_at_bound_are_accepted(changes: dict[str, Any]) -> None:
    """Values exactly at each bound are accepted and survive a parse."""
    bindings = create(**changes)
    blob = WrappedKey.header(KeyRef("k", 1), bytes(12), bindings) + bytes(CIPHERTEXT_SIZE)
    assert WrappedKey.parse(blob).bindings == bindings


@pytest.mark.parametrize(
    "changes",
    [
        {"recording_id": "rec\u00850001"},
        {"subject_ids": ["agent:\u009b1"]},
        {"context": {"tenant": "\u009b31macme"}},
        {"context": {"\u0080key": "v"}},
    ],
    ids=["recording_id_nel", "subject_csi", "context_value_csi", "context_key_pad"],
)
def test_bindings_refuse_c1_control_characters(changes: dict[str, Any]) -> None:
    """C1 controls (U+0080..U+009F) are control characters too and are refused.

    They are Unicode category Cc like C0 and DEL; U+0085 splits lines in str.splitlines() and
    U+009B starts terminal escape sequences, so they could forge lines in logs and audit trails.
    """
    with pytest.raises(InvalidRequestError):
        create(**changes)


@pytest.mark.parametrize(
    ("key", "nonce"),
    [
        (KeyRef("", 1), bytes(12)),
        (KeyRef("Recordings", 1), bytes(12)),
        (KeyRef("k" * 65, 1), bytes(12)),
        (KeyRef("recordings", 0), bytes(12)),
        (KeyRef("recordings", 2**32), bytes(12)),
        (KeyRef("recordings", 1), bytes(11)),
        (KeyRef("recordings", 1), bytes(13)),
    ],
    ids=[
        "name_empty",
        "name_upper",
        "name_65",
        "version_0",
        "version_2_32",
        "nonce_11",
        "nonce_13",
    ],
)
def test_header_refuses_bad_key_reference(key: KeyRef, nonce: bytes) -> None:
    """The encoder refuses key names, versions and nonces the parser would refuse."""
    with pytest.raises(InvalidRequestError) as info:
        WrappedKey.header(key, nonce, create())
    assert type(info.value) is InvalidRequestError


# -- no key material in reprs -----------------------------------------------------------------


def _forms(secret: bytes) -> list[str]:
    """Ways a secret could leak into text: hex (both cases), bytes repr, base64, base64url."""
    return [
        secret.hex(),
        secret.hex().upper(),
        secret.hex()[:16],
        repr(secret),
        repr(secret)[2:18],
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
    ]


def _assert_hidden(obj: object, *secrets: bytes) -> None:
    texts = [repr(obj), str(obj), f"{obj}", f"{obj!r}", repr([obj]), repr({"k": obj})]
    for secret in secrets:
        for form in _forms(secret):
            for text in texts:
                assert form not in text


def test_reprs_never_show_key_material() -> None:
    """repr/str of WrappedKey, GeneratedKey, UnwrappedKey, RewrappedKey and SecretBytes hide every
    byte of data keys, nonces and ciphertexts."""
    vector = valid("typical")
    parsed = WrappedKey.parse(vector.blob)
    key = vector.key
    secret = SecretBytes(vector.data_key)
    _assert_hidden(parsed, vector.nonce, vector.ciphertext, vector.data_key)
    _assert_hidden(secret, vector.data_key)
    _assert_hidden(GeneratedKey(secret, vector.blob, key), vector.data_key, vector.ciphertext)
    _assert_hidden(UnwrappedKey(secret, key), vector.data_key)
    _assert_hidden(RewrappedKey(vector.blob, key), vector.ciphertext, vector.nonce)
    assert secret.reveal() == vector.data_key
    assert len(secret) == 32


# -- the hot-path bindings parser against the straightforward one -----------------------------


class Reader:
    """Bounded reader over a byte string; any overrun or bad value is an invalid wrapped key."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise InvalidWrappedKeyError
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack(">Q", self.take(8))[0]
        return value

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidWrappedKeyError from None

    @property
    def pos(self) -> int:
        return self._pos

    def at_end(self) -> bool:
        return self._pos == len(self._data)


def reference_parse_bindings(raw: bytes) -> Bindings:
    """The straightforward parser: read, then re-encode and compare (the oracle the hot-path
    parser in keybroker.core.wrapped_key is checked against)."""
    r = Reader(raw)
    recording_id = r.text(r.u8())
    retain_until = r.u64()
    purposes = tuple(r.text(r.u8()) for _ in range(r.u8()))
    subject_ids = tuple(r.text(r.u8()) for _ in range(r.u8()))
    context = tuple((r.text(r.u8()), r.text(r.u16())) for _ in range(r.u8()))
    if not r.at_end():
        raise InvalidWrappedKeyError
    if len({k for k, _ in context}) != len(context):
        raise InvalidWrappedKeyError  # a repeated context key would collapse in a mapping
    try:
        bindings, canonical = Bindings.canonical(
            recording_id=recording_id,
            purposes=purposes,
            subject_ids=subject_ids,
            retain_until=retain_until,
            context=dict(context),
        )
    except InvalidRequestError:
        raise InvalidWrappedKeyError from None
    if canonical != raw:  # unsorted, duplicated or otherwise non-canonical
        raise InvalidWrappedKeyError
    return bindings


def _both_parsers(raw: bytes) -> None:
    """The index-based parser accepts exactly what read-then-re-encode accepts, with equal
    bindings; anything else is the uniform InvalidWrappedKeyError from both."""
    try:
        expected = reference_parse_bindings(raw)
    except InvalidWrappedKeyError:
        with pytest.raises(InvalidWrappedKeyError):
            wrapped_key._parse_bindings(raw)
        return
    assert wrapped_key._parse_bindings(raw) == expected


def _bindings_of(vector: ValidVector) -> bytes:
    return WrappedKey.parse(vector.blob).bindings.encode()


@FUZZ
@given(st.binary(max_size=300))
def test_fast_bindings_parser_matches_reference_on_arbitrary_bytes(raw: bytes) -> None:
    _both_parsers(raw)


@FUZZ
@given(st.sampled_from(VALID), st.lists(_MUTATIONS, min_size=1, max_size=4))
def test_fast_bindings_parser_matches_reference_on_mutated_bindings(
    vector: ValidVector, mutations: list[tuple[str, int, int]]
) -> None:
    _both_parsers(_mutate(_bindings_of(vector), mutations))


@settings(max_examples=300, deadline=None)
@given(
    recording_id=_utf8_text(40),
    retain_until=st.sampled_from([0, 1, MAX_RETAIN_UNTIL, MAX_RETAIN_UNTIL + 1, 2**64 - 1]),
    purposes=st.lists(st.sampled_from(["a", "b", "B", "support", "x" * 65, ""]), max_size=3),
    subject_ids=st.lists(st.sampled_from(["s", "t", "\x85", "é", ""]), max_size=3),
    context=st.lists(
        st.tuples(st.sampled_from(["k", "l", "", "\x01"]), st.sampled_from(["", "v", "\x9f"])),
        max_size=3,
    ),
)
def test_fast_bindings_parser_matches_reference_on_near_canonical_encodings(
    recording_id: str,
    retain_until: int,
    purposes: list[str],
    subject_ids: list[str],
    context: list[tuple[str, str]],
) -> None:
    """Hand-built encodings in any order, with duplicates, empty and out-of-bound values and
    control characters: what the canonical rules are about."""

    def short(text: str) -> bytes:
        raw = text.encode()
        return bytes([len(raw)]) + raw

    raw = short(recording_id) + min(retain_until, 2**64 - 1).to_bytes(8, "big")
    raw += bytes([len(purposes)]) + b"".join(short(p) for p in purposes)
    raw += bytes([len(subject_ids)]) + b"".join(short(s) for s in subject_ids)
    raw += bytes([len(context)])
    for key, value in context:
        raw += short(key) + len(value.encode()).to_bytes(2, "big") + value.encode()
    _both_parsers(raw)
