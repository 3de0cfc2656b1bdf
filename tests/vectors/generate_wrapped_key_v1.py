"""Generate ``wrapped_key_v1.json``: known-answer vectors for the wrapped-key format v1.

This is a second, independent implementation of the format: the byte layout below is written from
docs/FORMAT.md with :mod:`struct`, and sealed with ``cryptography``'s ``AESGCM``. It imports nothing
from keybroker, so the tests that compare keybroker's encoder with these vectors compare two
implementations, not one with itself.

Every value is derived deterministically (SHA-256 of a label), so running the script again writes
the same file byte for byte::

    .venv/bin/python tests/vectors/generate_wrapped_key_v1.py          # (re)write the file
    .venv/bin/python tests/vectors/generate_wrapped_key_v1.py --check  # exit 1 if it is stale

The test KEKs are extractable and public: they exist only to make these vectors checkable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

OUTPUT = Path(__file__).with_name("wrapped_key_v1.json")

MAGIC = b"KBW"
FORMAT_VERSION = 0x01
NONCE_SIZE = 12
DATA_KEY_SIZE = 32
TAG_SIZE = 16
CIPHERTEXT_SIZE = DATA_KEY_SIZE + TAG_SIZE
MAX_WRAPPED_KEY_SIZE = 32 * 1024
MAX_RETAIN_UNTIL = 253402300799  # 9999-12-31T23:59:59Z


def derive(label: str, size: int = 32) -> bytes:
    """Deterministic test bytes: the first ``size`` bytes of SHA-256 of a label."""
    return hashlib.sha256(f"keybroker test vector: {label}".encode()).digest()[:size]


def test_kek(name: str, version: int) -> bytes:
    """The (public, extractable) AES-256 test KEK for ``kek:<name>:v<version>``."""
    return derive(f"kek {name} v{version}")


def utf8_order(values: list[str]) -> list[str]:
    """Sorted by UTF-8 bytes, duplicates removed: the canonical order of a list."""
    return sorted(set(values), key=lambda v: v.encode("utf-8"))


# -- encoding: no validation on purpose, so that invalid blobs can be written as well ------------


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def short_bytes(raw: bytes) -> bytes:
    """A u8 length prefix and the bytes."""
    return u8(len(raw)) + raw


@dataclass(frozen=True)
class Fields:
    """Every field of a wrapped key, as raw as the layout allows."""

    key_name: bytes
    key_version: int
    nonce: bytes
    recording_id: bytes
    retain_until: int
    purposes: list[bytes]
    subject_ids: list[bytes]
    context: list[tuple[bytes, bytes]]
    magic: bytes = MAGIC
    format_version: int = FORMAT_VERSION
    bindings_trailer: bytes = b""
    """Bytes appended inside the bindings (counted by the bindings length): must be refused."""
    bindings_length_delta: int = 0
    """Added to the true bindings length when it is written: a lying length field."""


def encode_bindings(f: Fields) -> bytes:
    """The bindings exactly in the order given (canonical only if the caller sorted them)."""
    out = bytearray()
    out += short_bytes(f.recording_id)
    out += u64(f.retain_until)
    out += u8(len(f.purposes))
    for purpose in f.purposes:
        out += short_bytes(purpose)
    out += u8(len(f.subject_ids))
    for subject in f.subject_ids:
        out += short_bytes(subject)
    out += u8(len(f.context))
    for key, value in f.context:
        out += short_bytes(key) + u16(len(value)) + value
    out += f.bindings_trailer
    return bytes(out)


def encode_aad(f: Fields) -> bytes:
    """Everything before the ciphertext (the GCM additional data)."""
    bindings = encode_bindings(f)
    return b"".join(
        (
            f.magic,
            u8(f.format_version),
            short_bytes(f.key_name),
            u32(f.key_version),
            f.nonce,
            u16(len(bindings) + f.bindings_length_delta),
            bindings,
        )
    )


def seal(kek: bytes, nonce: bytes, data_key: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ciphertext || 16-byte tag."""
    return AESGCM(kek).encrypt(nonce, data_key, aad)


# -- valid vectors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """Binding values as a caller hands them over: any order, duplicates allowed."""

    recording_id: str
    retain_until: int
    purposes: list[str]
    subject_ids: list[str]
    context: dict[str, str]


def canonical_fields(key_name: str, key_version: int, nonce: bytes, req: Request) -> Fields:
    """Fields with every list in canonical order (sorted by UTF-8 bytes, de-duplicated)."""
    context_keys = utf8_order(list(req.context))
    return Fields(
        key_name=key_name.encode("ascii"),
        key_version=key_version,
        nonce=nonce,
        recording_id=req.recording_id.encode("utf-8"),
        retain_until=req.retain_until,
        purposes=[p.encode("ascii") for p in utf8_order(req.purposes)],
        subject_ids=[s.encode("utf-8") for s in utf8_order(req.subject_ids)],
        context=[(k.encode("utf-8"), req.context[k].encode("utf-8")) for k in context_keys],
    )


@dataclass(frozen=True)
class Valid:
    id: str
    description: str
    key_name: str
    key_version: int
    request: Request

    @property
    def kek(self) -> bytes:
        return test_kek(self.key_name, self.key_version)

    @property
    def nonce(self) -> bytes:
        return derive(f"nonce {self.id}", NONCE_SIZE)

    @property
    def data_key(self) -> bytes:
        return derive(f"data key {self.id}", DATA_KEY_SIZE)

    @property
    def fields(self) -> Fields:
        return canonical_fields(self.key_name, self.key_version, self.nonce, self.request)


def max_request() -> Request:
    """Every field at its upper bound (lengths counted in UTF-8 bytes, not characters)."""
    recording_id = "é" * 127 + "x"  # 254 + 1 = 255 bytes
    purposes = [f"{i:02d}:" + "p" * 61 for i in range(16)]  # 16 purposes of 64 characters
    subjects = [f"s{i:02d}-" + "ü" * 62 for i in range(64)]  # 64 subjects of 4 + 124 bytes
    context = {
        f"k{i:02d}" + "é" * 30 + "x": "€" * 341 + "v"  # keys 64 bytes, values 1023 + 1 bytes
        for i in range(16)
    }
    return Request(recording_id, MAX_RETAIN_UNTIL, purposes, subjects, context)


VALID = [
    Valid(
        id="minimal",
        description="Smallest bindings: 1-byte recording id, retain_until 1, one 1-character "
        "purpose, no subjects, no context.",
        key_name="recordings",
        key_version=1,
        request=Request("r", 1, ["a"], [], {}),
    ),
    Valid(
        id="typical",
        description="What a storage service sends: two purposes, two subjects, one context "
        "entry, retention to 2027-01-01T00:00:00Z. The worked example of docs/FORMAT.md.",
        key_name="recordings",
        key_version=1,
        request=Request(
            recording_id="rec-0001",
            retain_until=1798761600,
            purposes=["support", "quality"],
            subject_ids=["agent:42", "customer:7"],
            context={"tenant": "acme"},
        ),
    ),
    Valid(
        id="unicode_many",
        description="Many purposes (request order shuffled, one duplicate), Unicode subject ids "
        "and context (request order unsorted, an empty value), key version 2. The blob holds "
        "every list sorted by UTF-8 bytes and de-duplicated.",
        key_name="recordings",
        key_version=2,
        request=Request(
            recording_id="rec-ünïcødé-録音-0042",
            retain_until=1893456000,
            purposes=[
                "support",
                "quality",
                "legal:hold",
                "billing",
                "support",
                "training.ml",
                "fraud-review",
                "0day",
                "a_b",
                "qa:tier-2",
                "analytics",
            ],
            subject_ids=[
                "customer:Zoë",
                "agent:張伟",
                "customer: Jane Doe",
                "agent:ångström",
                "customer:😀",
                "agent:Åsa",
                "customer:zoe",
            ],
            context={
                "tenant": "acme",
                "région": "île-de-France",
                "note": "",
                "Case": "upper first",
                "emoji": "🎧",
                "ticket": "#4711",
            },
        ),
    ),
    Valid(
        id="max_lengths",
        description="Every bound at its maximum: 64-character key name, key version 2^32-1, "
        "255-byte recording id, retain_until 9999-12-31T23:59:59Z, 16 purposes of 64 "
        "characters, 64 subjects of 128 bytes, 16 context entries with 64-byte keys and "
        "1024-byte values.",
        key_name="kek.max_" + "z" * 56,
        key_version=0xFFFFFFFF,
        request=max_request(),
    ),
]


def valid_vector(v: Valid) -> dict[str, Any]:
    aad = encode_aad(v.fields)
    ciphertext = seal(v.kek, v.nonce, v.data_key, aad)
    return {
        "id": v.id,
        "description": v.description,
        "kek": v.kek.hex(),
        "key_name": v.key_name,
        "key_version": v.key_version,
        "nonce": v.nonce.hex(),
        "bindings": {
            "recording_id": v.request.recording_id,
            "retain_until": v.request.retain_until,
            "purposes": v.request.purposes,
            "subject_ids": v.request.subject_ids,
            "context": v.request.context,
        },
        "data_key": v.data_key.hex(),
        "aad_length": len(aad),
        "ciphertext": ciphertext.hex(),
        "blob": (aad + ciphertext).hex(),
    }


# -- invalid vectors --------------------------------------------------------------------------


def invalid_vectors() -> list[dict[str, Any]]:
    base = next(v for v in VALID if v.id == "typical")
    good = base.fields
    good_aad = encode_aad(good)
    good_ct = seal(base.kek, base.nonce, base.data_key, good_aad)
    good_blob = good_aad + good_ct
    out: list[dict[str, Any]] = []

    def add(vid: str, description: str, blob: bytes, stage: str = "parse") -> None:
        out.append(
            {
                "id": vid,
                "description": description,
                "stage": stage,
                "kek_of": base.id,
                "blob": blob.hex(),
            }
        )

    def sealed(vid: str, description: str, **changes: Any) -> None:
        """A blob with a *valid* GCM tag over its (bad) header: only the parser can stop it."""
        f = dataclasses.replace(good, **changes)
        aad = encode_aad(f)
        add(
            vid,
            description + " (GCM tag valid over the bad header)",
            aad + seal(base.kek, f.nonce, base.data_key, aad),
        )

    def reseal(vid: str, description: str, stage: str, **changes: Any) -> None:
        """A well-formed header with the original ciphertext: only GCM can stop it."""
        f = dataclasses.replace(good, **changes)
        add(vid, description, encode_aad(f) + good_ct, stage)

    b = good.purposes  # [b"quality", b"support"]
    s = good.subject_ids  # [b"agent:42", b"customer:7"]

    # framing
    add("empty", "Zero bytes.", b"")
    add("magic_only", "Only the magic.", MAGIC)
    sealed("bad_magic", "Magic 'KBX' instead of 'KBW'.", magic=b"KBX")
    sealed("lowercase_magic", "Magic 'kbw'.", magic=b"kbw")
    sealed("format_version_0", "Format version 0x00.", format_version=0)
    sealed("format_version_2", "Format version 0x02 (unknown future version).", format_version=2)
    add("truncated_header", "The first 20 bytes of a valid blob.", good_blob[:20])
    add("truncated_tag", "A valid blob without its last byte.", good_blob[:-1])
    add("truncated_to_aad", "A valid blob without its ciphertext and tag.", good_aad)
    add("trailing_byte", "A valid blob followed by one zero byte.", good_blob + b"\x00")
    add(
        "oversized_blob",
        f"{MAX_WRAPPED_KEY_SIZE + 1} bytes: a valid blob padded past the size limit.",
        good_blob + b"\x00" * (MAX_WRAPPED_KEY_SIZE + 1 - len(good_blob)),
    )
    # key reference
    sealed("key_name_empty", "Key name of length 0.", key_name=b"")
    sealed("key_name_uppercase", "Key name 'Recordings' (upper case).", key_name=b"Recordings")
    sealed("key_name_leading_dash", "Key name '-recordings'.", key_name=b"-recordings")
    sealed("key_name_too_long", "Key name of 65 characters.", key_name=b"k" * 65)
    sealed("key_name_invalid_utf8", "Key name bytes ff fe.", key_name=b"\xff\xfe")
    sealed("key_version_zero", "Key version 0 (versions start at 1).", key_version=0)
    # bindings length
    sealed(
        "bindings_length_overrun",
        "Bindings length one more than the bindings (eats into the ciphertext).",
        bindings_length_delta=1,
    )
    sealed(
        "bindings_length_short",
        "Bindings length one less than the bindings.",
        bindings_length_delta=-1,
    )
    add(
        "bindings_length_max",
        "Bindings length 0xffff on a short blob.",
        good_aad[: 5 + len(good.key_name) + 4 + NONCE_SIZE]
        + u16(0xFFFF)
        + encode_bindings(good)
        + good_ct,
    )
    sealed(
        "bindings_trailing_byte",
        "One extra byte at the end of the bindings, counted by the bindings length.",
        bindings_trailer=b"\x00",
    )
    # recording id
    sealed("recording_id_empty", "Recording id of length 0.", recording_id=b"")
    sealed("recording_id_newline", "Recording id with a line feed.", recording_id=b"rec\n0001")
    sealed("recording_id_nul", "Recording id with a NUL byte.", recording_id=b"rec\x000001")
    sealed("recording_id_del", "Recording id with DEL (0x7f).", recording_id=b"rec\x7f0001")
    sealed(
        "recording_id_c1_control",
        "Recording id with U+0085 NEXT LINE, a C1 control character (c2 85).",
        recording_id="rec\u00850001".encode(),
    )
    sealed("recording_id_invalid_utf8", "Recording id bytes ff.", recording_id=b"rec-\xff")
    sealed(
        "recording_id_overlong_utf8",
        "Recording id with an overlong UTF-8 encoding of '/' (c0 af).",
        recording_id=b"rec-\xc0\xaf",
    )
    sealed(
        "recording_id_surrogate",
        "Recording id with a UTF-8-encoded surrogate (ed a0 80).",
        recording_id=b"rec-\xed\xa0\x80",
    )
    # retention
    sealed("retain_until_zero", "retain_until 0.", retain_until=0)
    sealed(
        "retain_until_after_9999",
        "retain_until 10000-01-01T00:00:00Z, past the largest allowed value.",
        retain_until=MAX_RETAIN_UNTIL + 1,
    )
    sealed("retain_until_u64_max", "retain_until 2^64-1.", retain_until=2**64 - 1)
    # purposes
    sealed("purposes_none", "Zero purposes.", purposes=[])
    sealed("purposes_unsorted", "Purposes out of order (support, quality).", purposes=b[::-1])
    sealed(
        "purpose_duplicate",
        "The same purpose twice (quality, quality, support).",
        purposes=[b[0], b[0], b[1]],
    )
    sealed(
        "purposes_count_17",
        "17 purposes (the limit is 16).",
        purposes=[f"p{i:02d}".encode() for i in range(17)],
    )
    sealed("purpose_empty", "A purpose of length 0.", purposes=[b"", *b])
    sealed("purpose_too_long", "A purpose of 65 characters.", purposes=[b"p" * 65])
    sealed("purpose_uppercase", "Purpose 'Support'.", purposes=[b"Support", b"quality"])
    sealed("purpose_space", "Purpose 'legal hold'.", purposes=[b"legal hold"])
    sealed("purpose_non_ascii", "Purpose 'qualité'.", purposes=["qualité".encode()])
    # subjects
    sealed("subjects_unsorted", "Subject ids out of order.", subject_ids=s[::-1])
    sealed("subject_duplicate", "The same subject id twice.", subject_ids=[s[0], s[0], s[1]])
    sealed(
        "subjects_count_65",
        "65 subject ids (the limit is 64).",
        subject_ids=[f"s{i:02d}".encode() for i in range(65)],
    )
    sealed("subject_empty", "A subject id of length 0.", subject_ids=[b"", *s])
    sealed("subject_too_long", "A subject id of 129 bytes.", subject_ids=[b"s" * 129])
    sealed("subject_control", "A subject id with a tab.", subject_ids=[b"agent:\t42"])
    # context
    ctx = good.context  # [(b"tenant", b"acme")]
    sealed(
        "context_unsorted",
        "Context keys out of order (tenant, region).",
        context=[*ctx, (b"region", b"eu")],
    )
    sealed(
        "context_duplicate_key",
        "The same context key twice.",
        context=[(b"tenant", b"acme"), (b"tenant", b"evil")],
    )
    sealed(
        "context_count_17",
        "17 context entries (the limit is 16).",
        context=[(f"k{i:02d}".encode(), b"v") for i in range(17)],
    )
    sealed("context_key_empty", "A context key of length 0.", context=[(b"", b"v")])
    sealed("context_key_too_long", "A context key of 65 bytes.", context=[(b"k" * 65, b"v")])
    sealed(
        "context_value_too_long",
        "A context value of 1025 bytes.",
        context=[(b"tenant", b"v" * 1025)],
    )
    sealed(
        "context_value_c1_control",
        "A context value with U+009B CONTROL SEQUENCE INTRODUCER (c2 9b).",
        context=[(b"tenant", "\u009b31macme".encode())],
    )
    sealed(
        "context_value_control",
        "A context value with an escape character (0x1b).",
        context=[(b"tenant", b"\x1b[31macme")],
    )

    # Well-formed, canonical headers whose GCM check must fail.
    tampered_tag = bytearray(good_blob)
    tampered_tag[-1] ^= 0x01
    add("tag_flipped", "Last tag bit flipped.", bytes(tampered_tag), "authenticate")
    tampered_ct = bytearray(good_blob)
    tampered_ct[len(good_aad)] ^= 0x80
    add("ciphertext_flipped", "First ciphertext byte changed.", bytes(tampered_ct), "authenticate")
    reseal(
        "nonce_changed",
        "Another nonce in the header, original ciphertext.",
        "authenticate",
        nonce=derive("another nonce", NONCE_SIZE),
    )
    reseal(
        "retain_until_extended",
        "Retention moved to 9999-12-31 (canonical), original ciphertext.",
        "authenticate",
        retain_until=MAX_RETAIN_UNTIL,
    )
    reseal(
        "purpose_added",
        "Purpose 'billing' added (canonical), original ciphertext.",
        "authenticate",
        purposes=[b"billing", *b],
    )
    reseal(
        "recording_id_changed",
        "Recording id 'rec-0002', original ciphertext.",
        "authenticate",
        recording_id=b"rec-0002",
    )
    reseal(
        "key_version_changed",
        "Key version 2 in the header, ciphertext made under version 1.",
        "authenticate",
        key_version=2,
    )
    minimal = next(v for v in VALID if v.id == "minimal")
    other_ct = seal(minimal.kek, minimal.nonce, minimal.data_key, encode_aad(minimal.fields))
    add(
        "ciphertext_swapped",
        "Header of 'typical' with the ciphertext of 'minimal'.",
        good_aad + other_ct,
        "authenticate",
    )
    return out


def build() -> dict[str, Any]:
    """The whole vector file as a JSON-ready dict."""
    return {
        "format": "keybroker wrapped key v1",
        "spec": "docs/FORMAT.md",
        "generator": "tests/vectors/generate_wrapped_key_v1.py",
        "notes": [
            "All binary values are lowercase hex. The test KEKs are public: never use them.",
            "bindings are request values in the order a caller sends them (duplicates "
            "allowed); the blob holds each list sorted by UTF-8 bytes and de-duplicated, and "
            "the context sorted by key.",
            "The AAD is the first aad_length bytes of blob; ciphertext is ciphertext || tag "
            "(48 bytes) and ends the blob.",
            "invalid[].stage 'parse': the parser must refuse the blob. 'authenticate': the blob "
            "parses but AES-256-GCM under the KEK of vector kek_of must fail.",
        ],
        "valid": [valid_vector(v) for v in VALID],
        "invalid": invalid_vectors(),
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
