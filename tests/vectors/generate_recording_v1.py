"""Generate ``recording_v1.json``: known-answer vectors for the recording encryption format v1.

This is a second, independent implementation of the format: the header below is written from
docs/RECORDING_FORMAT.md with :mod:`struct`, the file key is derived with ``cryptography``'s
``HKDF`` and every segment is sealed with its ``AESGCM``. It imports nothing from keybroker, so the
tests that compare keybroker's encoder with these vectors compare two implementations, not one
with itself.

Every value is derived deterministically (SHA-256 of a label), so running the script again writes
the same file byte for byte::

    .venv/bin/python tests/vectors/generate_recording_v1.py          # (re)write the file
    .venv/bin/python tests/vectors/generate_recording_v1.py --check  # exit 1 if it is stale

The data keys are public: they exist only to make these vectors checkable.

Expected failures are stored as *parts* (byte ranges copied from a valid vector's file, and
literal bytes) rather than as whole files, which keeps the JSON small; ``file_sha256`` checks the
assembly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

OUTPUT = Path(__file__).with_name("recording_v1.json")

MAGIC = b"KBREC"
FORMAT_VERSION = 0x01
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16
DATA_KEY_SIZE = 32
FILE_KEY_SIZE = 32
MIN_SEGMENT_SIZE = 4096
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
MAX_RECORDING_ID = 255
MAX_WRAPPED_KEY = 32 * 1024
INFO_PREFIX = b"keybroker recording v1\x00"
SEG = MIN_SEGMENT_SIZE  # the segment size of every vector but one


def derive(label: str, size: int = 32) -> bytes:
    """Deterministic test bytes: SHA-256 of a label, in counter mode for more than 32 bytes."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.sha256(f"keybroker test vector: {label} #{block}".encode()).digest()
        block += 1
    return bytes(out[:size])


# -- encoding: no validation on purpose, so that invalid files can be written as well ----------


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


@dataclass(frozen=True)
class Header:
    """Every header field, as raw as the layout allows."""

    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    recording_id: bytes
    wrapped_key: bytes
    magic: bytes = MAGIC
    version: int = FORMAT_VERSION
    recording_id_length: int | None = None
    """Written instead of the true length when set: a lying length field."""
    wrapped_key_length: int | None = None

    def encode(self) -> bytes:
        rid_len = self.recording_id_length
        wk_len = self.wrapped_key_length
        return b"".join(
            (
                self.magic,
                u8(self.version),
                u32(self.segment_size),
                self.salt,
                self.nonce_prefix,
                u16(len(self.recording_id) if rid_len is None else rid_len),
                self.recording_id,
                u16(len(self.wrapped_key) if wk_len is None else wk_len),
                self.wrapped_key,
            )
        )


def file_key(data_key: bytes, header: bytes, salt: bytes) -> bytes:
    """HKDF-SHA256(ikm = data key, salt = salt, info = prefix || SHA-256(header)), 32 bytes."""
    info = INFO_PREFIX + hashlib.sha256(header).digest()
    return HKDF(algorithm=hashes.SHA256(), length=FILE_KEY_SIZE, salt=salt, info=info).derive(
        data_key
    )


def nonce(prefix: bytes, index: int, last: bool) -> bytes:
    """nonce prefix (7) || u32 segment index || last flag (1): 12 bytes."""
    return prefix + u32(index) + u8(1 if last else 0)


def seal(key: bytes, prefix: bytes, index: int, last: bool, plaintext: bytes) -> bytes:
    """One segment: AES-256-GCM ciphertext || 16-byte tag, no additional data."""
    return AESGCM(key).encrypt(nonce(prefix, index, last), plaintext, None)


def split(plaintext: bytes, segment_size: int) -> list[bytes]:
    """Segments of exactly ``segment_size`` bytes and a final one of 1..segment_size (or one
    empty segment for an empty plaintext)."""
    if not plaintext:
        return [b""]
    return [plaintext[i : i + segment_size] for i in range(0, len(plaintext), segment_size)]


# -- valid vectors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Valid:
    id: str
    description: str
    plaintext_length: int
    recording_id: str = "rec-0001"
    wrapped_key_length: int = 24
    segment_size: int = SEG

    @property
    def data_key(self) -> bytes:
        return derive(f"recording data key {self.id}", DATA_KEY_SIZE)

    @property
    def salt(self) -> bytes:
        return derive(f"recording salt {self.id}", SALT_SIZE)

    @property
    def nonce_prefix(self) -> bytes:
        return derive(f"recording nonce prefix {self.id}", NONCE_PREFIX_SIZE)

    @property
    def wrapped_key(self) -> bytes:
        """Opaque bytes: the format never looks inside (in practice a wrapped key v1 blob)."""
        return derive(f"recording wrapped key {self.id}", self.wrapped_key_length)

    @property
    def plaintext(self) -> bytes:
        return derive(f"recording plaintext {self.id}", self.plaintext_length)

    @property
    def header(self) -> Header:
        return Header(
            segment_size=self.segment_size,
            salt=self.salt,
            nonce_prefix=self.nonce_prefix,
            recording_id=self.recording_id.encode("utf-8"),
            wrapped_key=self.wrapped_key,
        )

    @property
    def header_bytes(self) -> bytes:
        return self.header.encode()

    @property
    def header_length(self) -> int:
        return len(self.header_bytes)

    @property
    def file_key(self) -> bytes:
        return file_key(self.data_key, self.header_bytes, self.salt)

    @property
    def segments(self) -> list[bytes]:
        """The sealed segments, in order."""
        parts = split(self.plaintext, self.segment_size)
        key = self.file_key
        return [
            seal(key, self.nonce_prefix, i, i == len(parts) - 1, part)
            for i, part in enumerate(parts)
        ]

    @property
    def file(self) -> bytes:
        return self.header_bytes + b"".join(self.segments)


VALID = [
    Valid(
        id="empty",
        description="Empty plaintext: the file is the header and one empty final segment (the tag "
        "only). Smallest header: 1-byte recording id, 1-byte wrapped key.",
        plaintext_length=0,
        recording_id="r",
        wrapped_key_length=1,
    ),
    Valid(
        id="one_byte",
        description="One plaintext byte: one final segment of 1 + 16 bytes. The worked example of "
        "docs/RECORDING_FORMAT.md.",
        plaintext_length=1,
    ),
    Valid(
        id="segment_minus_one",
        description="4095 bytes: one short final segment.",
        plaintext_length=SEG - 1,
    ),
    Valid(
        id="one_segment",
        description="Exactly one segment (4096 bytes): one full final segment, no empty segment "
        "after it.",
        plaintext_length=SEG,
    ),
    Valid(
        id="segment_plus_one",
        description="4097 bytes: one full segment, then a 1-byte final segment.",
        plaintext_length=SEG + 1,
    ),
    Valid(
        id="two_segments_exact",
        description="8192 bytes: two full segments, the second one final.",
        plaintext_length=2 * SEG,
    ),
    Valid(
        id="several_segments",
        description="13288 bytes: three full segments and a 1000-byte final segment. The base of "
        "most expected failures.",
        plaintext_length=3 * SEG + 1000,
    ),
    Valid(
        id="max_header",
        description="Largest header: 16 MiB segment size, a 255-byte recording id (127 times 'é' + "
        "'x', 128 characters) and a 32768-byte wrapped key; 5 plaintext bytes.",
        plaintext_length=5,
        recording_id="é" * 127 + "x",
        wrapped_key_length=MAX_WRAPPED_KEY,
        segment_size=MAX_SEGMENT_SIZE,
    ),
]
VALID_BY_ID = {v.id: v for v in VALID}


def valid_vector(v: Valid) -> dict[str, Any]:
    header = v.header_bytes
    plain = split(v.plaintext, v.segment_size)
    segments = []
    file_offset = len(header)
    for i, (part, sealed) in enumerate(zip(plain, v.segments, strict=True)):
        last = i == len(plain) - 1
        segments.append(
            {
                "index": i,
                "last": last,
                "nonce": nonce(v.nonce_prefix, i, last).hex(),
                "plaintext_offset": i * v.segment_size,
                "plaintext_length": len(part),
                "file_offset": file_offset,
                "file_length": len(sealed),
            }
        )
        file_offset += len(sealed)
    blob = v.file
    assert file_offset == len(blob)
    return {
        "id": v.id,
        "description": v.description,
        "data_key": v.data_key.hex(),
        "segment_size": v.segment_size,
        "salt": v.salt.hex(),
        "nonce_prefix": v.nonce_prefix.hex(),
        "recording_id": v.recording_id,
        "wrapped_key": v.wrapped_key.hex(),
        "plaintext_length": v.plaintext_length,
        "plaintext": v.plaintext.hex(),
        "header_length": len(header),
        "header_sha256": hashlib.sha256(header).hexdigest(),
        "file_key": v.file_key.hex(),
        "segments": segments,
        "file_length": len(blob),
        "file": blob.hex(),
    }


# -- expected failures ------------------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """Bytes ``offset .. offset + length`` of the file of valid vector ``of``."""

    of: str
    offset: int
    length: int

    def bytes(self) -> bytes:
        return VALID_BY_ID[self.of].file[self.offset : self.offset + self.length]

    def json(self) -> dict[str, Any]:
        return {"copy": self.of, "offset": self.offset, "length": self.length}


@dataclass(frozen=True)
class Literal:
    raw: bytes

    def bytes(self) -> bytes:
        return self.raw

    def json(self) -> dict[str, Any]:
        return {"hex": self.raw.hex()}


Part = Copy | Literal


@dataclass(frozen=True)
class Invalid:
    id: str
    description: str
    stage: str
    """"header": refused while reading the header, before the data key is needed;
    "segments": the header is well formed, a segment (or the end of the file) is refused."""
    parts: list[Part]
    released: int
    """Plaintext bytes (a prefix of ``plaintext_of``'s plaintext) a decryptor that writes each
    segment as soon as it authenticates has written before it fails."""
    plaintext_of: str = "several_segments"
    data_key_of: str = "several_segments"
    error: str = "recording_integrity"

    @property
    def file(self) -> bytes:
        return b"".join(p.bytes() for p in self.parts)

    def json(self) -> dict[str, Any]:
        blob = self.file
        return {
            "id": self.id,
            "description": self.description,
            "stage": self.stage,
            "error": self.error,
            "data_key": VALID_BY_ID[self.data_key_of].data_key.hex(),
            "plaintext_of": self.plaintext_of,
            "released": self.released,
            "parts": [p.json() for p in self.parts],
            "file_length": len(blob),
            "file_sha256": hashlib.sha256(blob).hexdigest(),
        }


def copy_range(of: str, start: int, end: int | None = None) -> Copy:
    blob = VALID_BY_ID[of].file
    stop = len(blob) if end is None else end
    return Copy(of, start, stop - start)


def invalid_vectors() -> list[Invalid]:
    base = VALID_BY_ID["several_segments"]
    b = base.id
    head = base.header_bytes
    h = len(head)
    chunk = SEG + TAG_SIZE
    blob = base.file
    segs = base.segments  # 4 segments: 3 of 4112 bytes, then 1016 bytes
    seg_at = [h + i * chunk for i in range(len(segs))]
    end = len(blob)
    out: list[Invalid] = []

    def seg(i: int) -> Copy:
        return Copy(b, seg_at[i], len(segs[i]))

    def body() -> Copy:
        return copy_range(b, h)

    def add(
        id: str,
        description: str,
        stage: str,
        parts: list[Part],
        released: int,
        **kw: str,
    ) -> None:
        out.append(Invalid(id, description, stage, parts, released, **kw))

    def flipped(offset: int, bit: int = 0x01) -> list[Part]:
        return [
            copy_range(b, 0, offset),
            Literal(bytes([blob[offset] ^ bit])),
            copy_range(b, offset + 1),
        ]

    def with_header(stage: str, **changes: Any) -> Callable[[str, str], None]:
        """A changed header followed by the original segments."""
        new_head = dataclasses.replace(base.header, **changes).encode()

        def emit(id: str, description: str) -> None:
            add(id, description, stage, [Literal(new_head), body()], 0)

        return emit

    # -- not a recording at all --------------------------------------------------------------
    add(
        "bad_magic",
        "Magic 'KBRED' instead of 'KBREC'.",
        "header",
        flipped(4),
        0,
        error="not_a_recording",
    )
    add(
        "wav_file",
        "The first 16 bytes of a WAV file.",
        "header",
        [Literal(b"RIFF\x24\x08\x00\x00WAVEfmt ")],
        0,
        error="not_a_recording",
    )
    add("empty_file", "A file of 0 bytes.", "header", [], 0, error="not_a_recording")

    # -- header bounds (refused before the data key is needed) -------------------------------
    with_header("header", version=0)("version_0", "Format version 0.")
    with_header("header", version=2)("version_2", "Format version 2.")
    with_header("header", segment_size=0)("segment_size_0", "Segment size 0.")
    with_header("header", segment_size=MIN_SEGMENT_SIZE - 1)(
        "segment_size_4095", "Segment size 4095 (the minimum is 4096)."
    )
    with_header("header", segment_size=MAX_SEGMENT_SIZE + 1)(
        "segment_size_16mib_plus_one", "Segment size 16 MiB + 1 (the maximum is 16 MiB)."
    )
    with_header("header", segment_size=0xFFFFFFFF)("segment_size_u32_max", "Segment size 2^32-1.")
    with_header("header", recording_id=b"")("recording_id_empty", "Recording id of length 0.")
    with_header("header", recording_id=b"r" * (MAX_RECORDING_ID + 1))(
        "recording_id_256", "Recording id of 256 bytes (the maximum is 255)."
    )
    with_header("header", recording_id=b"rec-\xff")(
        "recording_id_invalid_utf8", "Recording id bytes 72 65 63 2d ff (ff is never UTF-8)."
    )
    with_header("header", recording_id=b"rec-\xc0\xaf")(
        "recording_id_overlong_utf8", "Recording id with an overlong UTF-8 '/' (c0 af)."
    )
    with_header("header", recording_id=b"rec-\xed\xa0\x80")(
        "recording_id_surrogate", "Recording id with a UTF-8-encoded surrogate (ed a0 80)."
    )
    with_header("header", recording_id=b"rec-\xe9\x8c")(
        "recording_id_truncated_utf8",
        "Recording id ending in a truncated 3-byte sequence (e9 8c).",
    )
    with_header("header", wrapped_key=b"")("wrapped_key_empty", "Wrapped key of length 0.")
    big = VALID_BY_ID["max_header"]
    big_head = big.header_bytes
    big_wk_at = len(big_head) - MAX_WRAPPED_KEY
    over = Header(
        segment_size=SEG,
        salt=base.salt,
        nonce_prefix=base.nonce_prefix,
        recording_id=base.recording_id.encode(),
        wrapped_key=b"",
        wrapped_key_length=MAX_WRAPPED_KEY + 1,
    ).encode()
    add(
        "wrapped_key_32769",
        "Wrapped key of 32769 bytes (the maximum is 32768): the wrapped key of max_header and "
        "one more byte, then the segments of several_segments.",
        "header",
        [
            Literal(over),
            Copy(big.id, big_wk_at, MAX_WRAPPED_KEY),
            Literal(b"\x00"),
            body(),
        ],
        0,
    )
    with_header("header", wrapped_key_length=0xFFFF)(
        "wrapped_key_length_u16_max",
        "Wrapped-key length 0xffff followed by the 24-byte wrapped key and the segments.",
    )
    rid_at = 5 + 1 + 4 + SALT_SIZE + NONCE_PREFIX_SIZE
    add(
        "truncated_in_fixed_header",
        "The first 30 bytes only (inside the salt).",
        "header",
        [copy_range(b, 0, 30)],
        0,
    )
    add(
        "truncated_in_recording_id_length",
        "The file ends after the first byte of the recording-id length.",
        "header",
        [copy_range(b, 0, rid_at + 1)],
        0,
    )
    add(
        "truncated_in_recording_id",
        "The file ends inside the recording id.",
        "header",
        [copy_range(b, 0, rid_at + 2 + 4)],
        0,
    )
    add(
        "truncated_in_wrapped_key",
        "The file ends one byte before the end of the wrapped key.",
        "header",
        [copy_range(b, 0, h - 1)],
        0,
    )
    # -- header changed, segments kept: the file key changes, the first segment fails --------
    with_header("segments", segment_size=2 * SEG)(
        "header_segment_size_changed", "Segment size 8192 in the header, segments of 4096."
    )
    with_header("segments", salt=derive("another salt", SALT_SIZE))(
        "header_salt_changed", "Another salt."
    )
    with_header("segments", nonce_prefix=derive("another nonce prefix", NONCE_PREFIX_SIZE))(
        "header_nonce_prefix_changed", "Another nonce prefix."
    )
    with_header("segments", recording_id=b"rec-0002")(
        "header_recording_id_changed", "Recording id 'rec-0002' (same length)."
    )
    with_header("segments", wrapped_key=VALID_BY_ID["one_byte"].wrapped_key)(
        "header_wrapped_key_swapped",
        "The wrapped key of one_byte (same length), original segments.",
    )
    add(
        "header_wrapped_key_bit_flipped",
        "Last bit of the wrapped key flipped (the last header byte).",
        "segments",
        flipped(h - 1),
        0,
    )
    add(
        "header_salt_bit_flipped",
        "One bit of the salt flipped.",
        "segments",
        flipped(10, 0x80),
        0,
    )
    add(
        "header_of_other_recording",
        "The header of two_segments_exact followed by the segments of several_segments.",
        "segments",
        [
            copy_range("two_segments_exact", 0, VALID_BY_ID["two_segments_exact"].header_length),
            body(),
        ],
        0,
    )
    # -- segments changed ---------------------------------------------------------------------
    add(
        "segment_ciphertext_flipped",
        "First ciphertext byte of segment 0 flipped.",
        "segments",
        flipped(h),
        0,
    )
    add(
        "segment_tag_flipped",
        "Last tag byte of segment 1 flipped.",
        "segments",
        flipped(seg_at[2] - 1),
        SEG,
    )
    add(
        "final_segment_flipped",
        "A ciphertext byte of the final segment flipped.",
        "segments",
        flipped(seg_at[3] + 500),
        3 * SEG,
    )
    add(
        "reordered_first_two",
        "Segments 1, 0, 2, 3.",
        "segments",
        [copy_range(b, 0, h), seg(1), seg(0), seg(2), seg(3)],
        0,
    )
    add(
        "reordered_middle",
        "Segments 0, 2, 1, 3.",
        "segments",
        [copy_range(b, 0, h), seg(0), seg(2), seg(1), seg(3)],
        SEG,
    )
    add(
        "dropped_first",
        "Segment 0 removed.",
        "segments",
        [copy_range(b, 0, h), seg(1), seg(2), seg(3)],
        0,
    )
    add(
        "dropped_middle",
        "Segment 1 removed.",
        "segments",
        [copy_range(b, 0, h), seg(0), seg(2), seg(3)],
        SEG,
    )
    add(
        "duplicated",
        "Segment 0 twice: 0, 0, 1, 2, 3.",
        "segments",
        [copy_range(b, 0, h), seg(0), seg(0), seg(1), seg(2), seg(3)],
        SEG,
    )
    add(
        "duplicated_final",
        "The final segment twice.",
        "segments",
        [copy_range(b, 0, end), seg(3)],
        3 * SEG,
    )
    add(
        "header_only",
        "The header and no segment at all (truncated at the first boundary).",
        "segments",
        [copy_range(b, 0, h)],
        0,
    )
    add(
        "truncated_at_boundary",
        "The final segment removed: the file ends after segment 2, which is not marked last.",
        "segments",
        [copy_range(b, 0, seg_at[3])],
        2 * SEG,
    )
    add(
        "truncated_after_first_segment",
        "Only segment 0 kept.",
        "segments",
        [copy_range(b, 0, seg_at[1])],
        0,
    )
    add(
        "truncated_inside_full_segment",
        "The file ends 100 bytes into segment 2.",
        "segments",
        [copy_range(b, 0, seg_at[2] + 100)],
        2 * SEG,
    )
    add(
        "truncated_inside_final_segment",
        "The last 50 bytes removed (inside the final segment's ciphertext).",
        "segments",
        [copy_range(b, 0, end - 50)],
        3 * SEG,
    )
    add(
        "truncated_in_final_tag",
        "The last byte removed (inside the final tag).",
        "segments",
        [copy_range(b, 0, end - 1)],
        3 * SEG,
    )
    add(
        "final_segment_shorter_than_tag",
        "Only 10 bytes of the final segment kept.",
        "segments",
        [copy_range(b, 0, seg_at[3] + 10)],
        3 * SEG,
    )
    add(
        "appended_byte",
        "One zero byte after the final segment.",
        "segments",
        [copy_range(b, 0), Literal(b"\x00")],
        3 * SEG,
    )
    add(
        "appended_segment",
        "A copy of segment 0 after the final segment.",
        "segments",
        [copy_range(b, 0), seg(0)],
        3 * SEG,
    )
    other = VALID_BY_ID["one_segment"]
    add(
        "segment_from_other_recording",
        "Segment 0 replaced by the (same-sized) segment of one_segment.",
        "segments",
        [copy_range(b, 0, h), copy_range(other.id, other.header_length), seg(1), seg(2), seg(3)],
        0,
    )
    add(
        "wrong_data_key",
        "The intact file of several_segments with the data key of one_segment.",
        "segments",
        [copy_range(b, 0)],
        0,
        data_key_of=other.id,
    )

    # -- sealed with the right key but against the rules (only the data key's holder can make
    #    these; they catch decryptors that skip a check) -----------------------------------------
    key = base.file_key
    prefix = base.nonce_prefix
    plain = split(base.plaintext, SEG)
    add(
        "last_flag_on_middle_segment",
        "Segment 1 sealed with the last flag set (nonce ... 00 00 00 01 01), segments 2 and 3 "
        "follow.",
        "segments",
        [
            copy_range(b, 0, seg_at[1]),
            Literal(seal(key, prefix, 1, True, plain[1])),
            seg(2),
            seg(3),
        ],
        SEG,
    )
    add(
        "final_segment_without_last_flag",
        "The final segment sealed with the last flag clear: looks like a truncated file.",
        "segments",
        [copy_range(b, 0, seg_at[3]), Literal(seal(key, prefix, 3, False, plain[3]))],
        3 * SEG,
    )
    add(
        "index_out_of_order",
        "Segment 2 sealed with index 3 (and the final one with index 4): a gap in the counter.",
        "segments",
        [
            copy_range(b, 0, seg_at[2]),
            Literal(seal(key, prefix, 3, False, plain[2])),
            Literal(seal(key, prefix, 4, True, plain[3])),
        ],
        2 * SEG,
    )
    two = VALID_BY_ID["two_segments_exact"]
    tkey, tprefix, tplain = two.file_key, two.nonce_prefix, split(two.plaintext, SEG)
    th = two.header_length
    add(
        "empty_final_segment_after_full",
        "two_segments_exact with segment 1 sealed as not last and an empty final segment "
        "(index 2, last) after it: an empty segment is valid only as the only segment.",
        "segments",
        [
            copy_range(two.id, 0, th + SEG + TAG_SIZE),
            Literal(seal(tkey, tprefix, 1, False, tplain[1])),
            Literal(seal(tkey, tprefix, 2, True, b"")),
        ],
        2 * SEG,
        plaintext_of=two.id,
        data_key_of=two.id,
    )
    add(
        "short_non_final_segment",
        "several_segments' header, then its first 100 plaintext bytes sealed as segment 0 (not "
        "last) and the next 4096 as segment 1 (last): a non-final segment must be full.",
        "segments",
        [
            copy_range(b, 0, h),
            Literal(seal(key, prefix, 0, False, base.plaintext[:100])),
            Literal(seal(key, prefix, 1, True, base.plaintext[100 : 100 + SEG])),
        ],
        0,
    )
    single = base.plaintext[:1000]
    add(
        "file_key_without_header_hash",
        "A one-segment file sealed under HKDF with info = 'keybroker recording v1' || 00 only "
        "(the header hash left out).",
        "segments",
        [
            copy_range(b, 0, h),
            Literal(
                seal(
                    HKDF(
                        algorithm=hashes.SHA256(), length=32, salt=base.salt, info=INFO_PREFIX
                    ).derive(base.data_key),
                    prefix,
                    0,
                    True,
                    single,
                )
            ),
        ],
        0,
    )
    add(
        "file_key_without_salt",
        "A one-segment file sealed under HKDF with no salt (the header's salt left out).",
        "segments",
        [
            copy_range(b, 0, h),
            Literal(
                seal(
                    HKDF(
                        algorithm=hashes.SHA256(),
                        length=32,
                        salt=None,
                        info=INFO_PREFIX + hashlib.sha256(head).digest(),
                    ).derive(base.data_key),
                    prefix,
                    0,
                    True,
                    single,
                )
            ),
        ],
        0,
    )
    add(
        "data_key_used_directly",
        "A one-segment file sealed under the data key itself (no HKDF).",
        "segments",
        [copy_range(b, 0, h), Literal(seal(base.data_key, prefix, 0, True, single))],
        0,
    )
    return out


def build() -> dict[str, Any]:
    """The whole vector file as a JSON-ready dict."""
    return {
        "format": "keybroker recording v1",
        "spec": "docs/RECORDING_FORMAT.md",
        "generator": "tests/vectors/generate_recording_v1.py",
        "notes": [
            "All binary values are lowercase hex. The data keys are public: never use them.",
            "valid[]: encrypting plaintext with data_key and a header of segment_size, salt, "
            "nonce_prefix, recording_id (UTF-8) and wrapped_key must give exactly file; "
            "decrypting file must give plaintext. header_sha256, file_key and segments[] "
            "(nonce, offsets and lengths) are intermediate values for debugging.",
            "invalid[]: the file is the concatenation of parts, each either bytes offset .. "
            "offset+length of the file of valid vector 'copy', or literal 'hex'; file_sha256 "
            "checks the assembly. Decrypting it with data_key must fail.",
            "invalid[].error: 'not_a_recording' (the file does not start with the magic) or "
            "'recording_integrity' (anything else).",
            "invalid[].stage 'header': refused while reading the header, before the data key "
            "is needed. 'segments': the header is well formed; a segment or the end of the "
            "file is refused.",
            "invalid[].released: plaintext bytes (a prefix of the plaintext of vector "
            "plaintext_of) that a decryptor writing each segment as soon as it authenticates "
            "has written before it fails. The consumer must discard them; a decryptor that "
            "buffers may write fewer, never more.",
        ],
        "valid": [valid_vector(v) for v in VALID],
        "invalid": [v.json() for v in invalid_vectors()],
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            sys.stderr.write(f"{OUTPUT} is stale: run {Path(__file__).name}\n")
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
