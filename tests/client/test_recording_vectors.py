"""Recording format v1 against the known-answer vectors of tests/vectors/recording_v1.json.

The vectors were written by a second, independent implementation
(tests/vectors/generate_recording_v1.py: struct + cryptography's HKDF and AESGCM, no keybroker).
keybroker's encrypt_stream must reproduce every valid file byte for byte, decrypt_stream must
recover every plaintext, and every expected failure must raise RecordingIntegrityError having
released no more than the segments that authenticated before the defect.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.client.recording import (
    MIN_SEGMENT_SIZE,
    NONCE_PREFIX_SIZE,
    SALT_SIZE,
    TAG_SIZE,
    RecordingHeader,
    decrypt_stream,
    encrypt_stream,
)
from keybroker.errors import RecordingIntegrityError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

ROOT = Path(__file__).resolve().parents[2]
VECTOR_DIR = ROOT / "tests" / "vectors"
VECTOR_FILE = VECTOR_DIR / "recording_v1.json"
GENERATOR = VECTOR_DIR / "generate_recording_v1.py"
DOC = ROOT / "docs" / "RECORDING_FORMAT.md"
WORKED_EXAMPLE = "one_byte"
MESSAGES = {
    "recording_integrity": "recording is damaged or has been tampered with",
    "not_a_recording": "not a keybroker recording",
}


# -- typed access to the vector file ---------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Where one segment sits in the plaintext and in the file, and its nonce."""

    index: int
    last: bool
    nonce: bytes
    plaintext_offset: int
    plaintext_length: int
    file_offset: int
    file_length: int


@dataclass(frozen=True)
class ValidVector:
    """Every input of one encryption, the intermediate values and the exact file."""

    id: str
    data_key: bytes
    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    recording_id: str
    wrapped_key: bytes
    plaintext: bytes
    header_length: int
    header_sha256: str
    file_key: bytes
    segments: tuple[Segment, ...]
    file: bytes

    def header(self) -> RecordingHeader:
        """The vector's header as keybroker's RecordingHeader."""
        return RecordingHeader(
            self.segment_size, self.salt, self.nonce_prefix, self.recording_id, self.wrapped_key
        )


@dataclass(frozen=True)
class InvalidVector:
    """A file that must be refused, assembled from its parts."""

    id: str
    description: str
    stage: str
    error: str
    data_key: bytes
    plaintext_of: str
    released: int
    file: bytes
    file_length: int
    file_sha256: str


def _valid(raw: dict[str, Any]) -> ValidVector:
    return ValidVector(
        id=raw["id"],
        data_key=bytes.fromhex(raw["data_key"]),
        segment_size=raw["segment_size"],
        salt=bytes.fromhex(raw["salt"]),
        nonce_prefix=bytes.fromhex(raw["nonce_prefix"]),
        recording_id=raw["recording_id"],
        wrapped_key=bytes.fromhex(raw["wrapped_key"]),
        plaintext=bytes.fromhex(raw["plaintext"]),
        header_length=raw["header_length"],
        header_sha256=raw["header_sha256"],
        file_key=bytes.fromhex(raw["file_key"]),
        segments=tuple(
            Segment(
                index=s["index"],
                last=s["last"],
                nonce=bytes.fromhex(s["nonce"]),
                plaintext_offset=s["plaintext_offset"],
                plaintext_length=s["plaintext_length"],
                file_offset=s["file_offset"],
                file_length=s["file_length"],
            )
            for s in raw["segments"]
        ),
        file=bytes.fromhex(raw["file"]),
    )


def _assemble(parts: list[dict[str, Any]], files: dict[str, bytes]) -> bytes:
    out = bytearray()
    for part in parts:
        if "copy" in part:
            out += files[part["copy"]][part["offset"] : part["offset"] + part["length"]]
        else:
            out += bytes.fromhex(part["hex"])
    return bytes(out)


def _invalid(raw: dict[str, Any], files: dict[str, bytes]) -> InvalidVector:
    return InvalidVector(
        id=raw["id"],
        description=raw["description"],
        stage=raw["stage"],
        error=raw["error"],
        data_key=bytes.fromhex(raw["data_key"]),
        plaintext_of=raw["plaintext_of"],
        released=raw["released"],
        file=_assemble(raw["parts"], files),
        file_length=raw["file_length"],
        file_sha256=raw["file_sha256"],
    )


_RAW: dict[str, Any] = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
VALID: list[ValidVector] = [_valid(v) for v in _RAW["valid"]]
VALID_BY_ID = {v.id: v for v in VALID}
INVALID: list[InvalidVector] = [
    _invalid(v, {k: x.file for k, x in VALID_BY_ID.items()}) for v in _RAW["invalid"]
]


def _ids(vectors: list[ValidVector] | list[InvalidVector]) -> list[str]:
    return [v.id for v in vectors]


# -- helpers --------------------------------------------------------------------------------


class _Trickle(io.BytesIO):
    """A source that hands out at most ``limit`` bytes per call, like a socket or a pipe."""

    def __init__(self, data: bytes, limit: int) -> None:
        super().__init__(data)
        self.limit = limit

    def read(self, size: int | None = -1, /) -> bytes:
        cap = self.limit if size is None or size < 0 else min(size, self.limit)
        return super().read(cap)

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        return super().readinto(memoryview(buffer)[: self.limit])


def _encrypt(vector: ValidVector, src: io.BytesIO | None = None) -> tuple[bytes, int]:
    out = io.BytesIO()
    source = io.BytesIO(vector.plaintext) if src is None else src
    written = encrypt_stream(source, out, vector.header(), vector.data_key)
    return out.getvalue(), written


def _decrypt(data: bytes | io.BytesIO, data_key: bytes) -> tuple[bytes, int, list[RecordingHeader]]:
    """Decrypt; return the plaintext, the returned count and the headers the key was asked for."""
    seen: list[RecordingHeader] = []

    def data_key_for(header: RecordingHeader) -> bytes:
        seen.append(header)
        return data_key

    out = io.BytesIO()
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    total = decrypt_stream(src, out, data_key_for)
    return out.getvalue(), total, seen


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_recording_v1", GENERATOR)
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
    """The committed JSON is exactly the output of generate_recording_v1.py (not hand-edited)."""
    generator = _load_generator()
    assert generator.render() == VECTOR_FILE.read_text(encoding="utf-8")


def test_generator_check_mode_passes_with_keybroker_unimportable() -> None:
    """`generate_recording_v1.py --check` succeeds in a fresh interpreter in which importing
    keybroker fails, so the generator cannot be borrowing keybroker's code at run time."""
    script = (
        "import runpy, sys\n"
        "sys.modules['keybroker'] = None  # any import of keybroker now raises ImportError\n"
        f"sys.argv = [{str(GENERATOR)!r}, '--check']\n"
        f"runpy.run_path({str(GENERATOR)!r}, run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr


def test_generator_is_independent_of_keybroker() -> None:
    """The second implementation must not import keybroker, or the vectors prove nothing."""
    tree = ast.parse(GENERATOR.read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported
    assert not {name for name in imported if name.split(".")[0] == "keybroker"}


def test_vectors_cover_the_boundary_sizes() -> None:
    """Plaintexts of 0, 1, segment-1, segment, segment+1 and several segments at the minimum
    segment size, and one header with every field at its upper bound."""
    sizes = {len(v.plaintext) for v in VALID if v.segment_size == MIN_SEGMENT_SIZE}
    seg = MIN_SEGMENT_SIZE
    assert {0, 1, seg - 1, seg, seg + 1, 2 * seg} <= sizes
    assert any(len(v.segments) >= 4 for v in VALID)
    big = VALID_BY_ID["max_header"]
    assert big.segment_size == 16 * 1024 * 1024
    assert len(big.recording_id.encode("utf-8")) == 255
    assert len(big.wrapped_key) == 32768
    small = VALID_BY_ID["empty"]
    assert (len(small.recording_id), len(small.wrapped_key)) == (1, 1)


def test_failure_vectors_cover_every_tampering_kind() -> None:
    """Expected failures include each kind of damage docs/RECORDING_FORMAT.md says is detected."""
    names = set(_ids(INVALID))
    required = {
        # header
        "bad_magic",
        "version_2",
        "segment_size_4095",
        "segment_size_16mib_plus_one",
        "recording_id_empty",
        "recording_id_256",
        "recording_id_invalid_utf8",
        "wrapped_key_empty",
        "wrapped_key_32769",
        "truncated_in_wrapped_key",
        "header_segment_size_changed",
        "header_salt_changed",
        "header_nonce_prefix_changed",
        "header_recording_id_changed",
        "header_wrapped_key_bit_flipped",
        # segments
        "segment_ciphertext_flipped",
        "segment_tag_flipped",
        "reordered_first_two",
        "dropped_middle",
        "duplicated",
        "header_only",
        "truncated_at_boundary",
        "truncated_inside_full_segment",
        "truncated_inside_final_segment",
        "appended_byte",
        "appended_segment",
        "wrong_data_key",
        # sealed with the right key against the rules
        "last_flag_on_middle_segment",
        "final_segment_without_last_flag",
        "empty_final_segment_after_full",
        "short_non_final_segment",
        "file_key_without_header_hash",
    }
    assert required <= names
    assert len(names) == len(INVALID)


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_failure_vector_assembles_to_its_checksum(vector: InvalidVector) -> None:
    """The parts of each expected failure assemble to the file the generator hashed."""
    assert len(vector.file) == vector.file_length
    assert hashlib.sha256(vector.file).hexdigest() == vector.file_sha256


# -- valid vectors: keybroker reproduces them -------------------------------------------------


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_header_encoding_matches_the_vector(vector: ValidVector) -> None:
    """RecordingHeader.encode writes the vector's header bytes, and read() parses them back,
    consuming exactly the header."""
    header = vector.header()
    encoded = header.encode()
    assert encoded == vector.file[: vector.header_length]
    assert hashlib.sha256(encoded).hexdigest() == vector.header_sha256
    src = io.BytesIO(vector.file)
    assert RecordingHeader.read(src) == header
    assert src.tell() == vector.header_length


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_nonces_and_file_key_match_the_vector(vector: ValidVector) -> None:
    """Every segment's nonce is keybroker's, and keybroker's cipher is AES-GCM under the
    vector's file key: both seal the same probe to the same bytes."""
    header = vector.header()
    cipher = header.cipher(vector.data_key)
    reference = AESGCM(vector.file_key)
    for seg in vector.segments:
        assert header.nonce(seg.index, seg.last) == seg.nonce
        probe = b"probe %d" % seg.index
        assert cipher.encrypt(seg.nonce, probe, None) == reference.encrypt(seg.nonce, probe, None)
        sealed = vector.file[seg.file_offset : seg.file_offset + seg.file_length]
        plain = vector.plaintext[seg.plaintext_offset : seg.plaintext_offset + seg.plaintext_length]
        assert reference.decrypt(seg.nonce, sealed, None) == plain
    assert vector.segments[-1].last
    assert not any(seg.last for seg in vector.segments[:-1])


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_encrypt_stream_reproduces_the_vector(vector: ValidVector) -> None:
    """encrypt_stream with the vector's header and data key writes the file byte for byte and
    returns the plaintext length."""
    blob, written = _encrypt(vector)
    assert written == len(vector.plaintext)
    assert blob == vector.file
    segments = max(1, -(-len(vector.plaintext) // vector.segment_size))
    assert len(blob) == vector.header_length + len(vector.plaintext) + segments * TAG_SIZE


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_encrypt_stream_reproduces_the_vector_from_short_reads(vector: ValidVector) -> None:
    """A source that returns 1000 bytes at a time (a pipe) gives the same file."""
    blob, written = _encrypt(vector, _Trickle(vector.plaintext, 1000))
    assert (blob, written) == (vector.file, len(vector.plaintext))


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_decrypt_stream_recovers_the_plaintext(vector: ValidVector) -> None:
    """decrypt_stream returns the vector's plaintext and asks for the key exactly once, with the
    vector's header."""
    plaintext, total, seen = _decrypt(vector.file, vector.data_key)
    assert plaintext == vector.plaintext
    assert total == len(vector.plaintext)
    assert seen == [vector.header()]


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_decrypt_stream_recovers_the_plaintext_from_short_reads(vector: ValidVector) -> None:
    """Reading the file 997 bytes at a time (segment and header boundaries fall mid-read)
    decrypts the same."""
    plaintext, total, _ = _decrypt(_Trickle(vector.file, 997), vector.data_key)
    assert (plaintext, total) == (vector.plaintext, len(vector.plaintext))


# -- expected failures: keybroker refuses them ------------------------------------------------


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_failure_vector_is_refused(vector: InvalidVector) -> None:
    """decrypt_stream raises RecordingIntegrityError with the vector's reason and its one public
    message; what it wrote first is exactly the segments that authenticated before the defect
    (a genuine plaintext prefix, never unauthenticated bytes); a header defect is found before
    the data key is asked for."""
    seen: list[RecordingHeader] = []

    def data_key_for(header: RecordingHeader) -> bytes:
        seen.append(header)
        return vector.data_key

    out = io.BytesIO()
    with pytest.raises(RecordingIntegrityError) as info:
        decrypt_stream(io.BytesIO(vector.file), out, data_key_for)
    assert info.value.reason == vector.error
    assert info.value.message == MESSAGES[vector.error]
    assert out.getvalue() == VALID_BY_ID[vector.plaintext_of].plaintext[: vector.released]
    assert len(seen) == (0 if vector.stage == "header" else 1)


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_failure_vector_is_refused_from_short_reads(vector: InvalidVector) -> None:
    """The same refusal when the file arrives 997 bytes at a time."""
    out = io.BytesIO()
    with pytest.raises(RecordingIntegrityError) as info:
        decrypt_stream(_Trickle(vector.file, 997), out, lambda _h: vector.data_key)
    assert info.value.reason == vector.error
    assert out.getvalue() == VALID_BY_ID[vector.plaintext_of].plaintext[: vector.released]


# -- the document -----------------------------------------------------------------------------


def _worked_example_dump() -> bytes:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Worked example", 1)[1]
    block = section.split("```", 2)[1]
    hex_bytes: list[str] = []
    for line in block.splitlines():
        match = re.fullmatch(r"([0-9a-f]{4})  ((?:[0-9a-f]{2} ?)+)", line.strip())
        if match:
            assert int(match.group(1), 16) == len(hex_bytes)
            hex_bytes += match.group(2).split()
    return bytes.fromhex("".join(hex_bytes))


def test_format_doc_worked_example_matches_the_vector() -> None:
    """The hex dump and the intermediate values in docs/RECORDING_FORMAT.md are the vector's."""
    vector = VALID_BY_ID[WORKED_EXAMPLE]
    assert _worked_example_dump() == vector.file
    text = DOC.read_text(encoding="utf-8")
    for value in (
        vector.data_key.hex(),
        vector.header_sha256,
        vector.file_key.hex(),
        vector.segments[0].nonce.hex(),
    ):
        assert value in text
    assert f"* `invalid`: {len(INVALID)} files a decryptor must refuse" in text
    assert f"* `valid`: {len(VALID)} files" in text.replace("eight files", "8 files")


def test_format_doc_decryption_snippet_agrees_with_every_vector() -> None:
    """The independent decryptor in docs/RECORDING_FORMAT.md opens every valid vector and
    refuses every expected failure."""
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    snippet = next(b for b in blocks if "def decrypt_v1" in b)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, str(DOC), "exec"), namespace)  # noqa: S102 - our own document
    decrypt_v1 = namespace["decrypt_v1"]
    for valid in VALID:
        assert decrypt_v1(valid.file, valid.data_key) == valid.plaintext, valid.id
    for invalid in INVALID:
        with pytest.raises((ValueError, InvalidTag)):
            decrypt_v1(invalid.file, invalid.data_key)


# -- bounds keybroker must enforce when it writes ---------------------------------------------


@pytest.mark.parametrize(
    ("salt_size", "prefix_size"),
    [
        (SALT_SIZE - 1, NONCE_PREFIX_SIZE),
        (SALT_SIZE + 1, NONCE_PREFIX_SIZE),
        (SALT_SIZE, NONCE_PREFIX_SIZE - 1),
        (SALT_SIZE, NONCE_PREFIX_SIZE + 1),
    ],
)
def test_header_refuses_a_salt_or_nonce_prefix_of_the_wrong_length(
    salt_size: int, prefix_size: int
) -> None:
    """A header whose salt is not 32 bytes or whose nonce prefix is not 7 is refused before
    anything is written. (The layout has no room for other lengths: struct's "32s"/"7s" would
    silently pad or cut them, and the file written would not be the one encrypted: with an
    8-byte prefix every nonce is 13 bytes, which AES-GCM accepts, and the recording can never be
    decrypted.)"""
    header = RecordingHeader(MIN_SEGMENT_SIZE, b"s" * salt_size, b"p" * prefix_size, "r", b"w")
    with pytest.raises(ValueError, match=r"salt|nonce prefix"):
        header.encode()
    out = io.BytesIO()
    with pytest.raises(ValueError, match=r"salt|nonce prefix"):
        encrypt_stream(io.BytesIO(b"audio"), out, header, bytes(32))
    assert out.getvalue() == b""
