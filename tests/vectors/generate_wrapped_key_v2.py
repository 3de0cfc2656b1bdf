"""Generate ``wrapped_key_v2.json``: known-answer vectors for the wrapped-key format v2.

Like the v1 generator this is a second, independent implementation, written from docs/FORMAT.md
with :mod:`struct` and ``cryptography``'s ``AESGCM``; it imports nothing from keybroker. The
bindings encoding is the same in both formats, so it is taken from the v1 generator (loaded from
the file beside this one); everything v2 changes (the version byte, the nonce after the bindings,
the AAD without the nonce) is written here.

In v2 the nonce is the IV the HSM chose; here it is derived from the vector's id, as an HSM's
would be unpredictable. Every value is deterministic, so running the script again writes the same
file byte for byte::

    .venv/bin/python tests/vectors/generate_wrapped_key_v2.py          # (re)write the file
    .venv/bin/python tests/vectors/generate_wrapped_key_v2.py --check  # exit 1 if it is stale

The test KEKs are extractable and public: they exist only to make these vectors checkable.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "wrapped_key_v2.json"
FORMAT_VERSION = 0x02


def _load_v1() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "generate_wrapped_key_v1_for_v2", HERE / "generate_wrapped_key_v1.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


v1 = _load_v1()
MAGIC: bytes = v1.MAGIC
NONCE_SIZE: int = v1.NONCE_SIZE
MAX_WRAPPED_KEY_SIZE: int = v1.MAX_WRAPPED_KEY_SIZE
MAX_RETAIN_UNTIL: int = v1.MAX_RETAIN_UNTIL
derive = v1.derive
seal = v1.seal
u8, u16, u32 = v1.u8, v1.u16, v1.u32
Fields = v1.Fields


def encode_aad(f: Any) -> bytes:
    """v2 AAD: magic, version, key name, key version, bindings length, bindings (no nonce)."""
    bindings = v1.encode_bindings(f)
    return b"".join(
        (
            f.magic,
            u8(f.format_version),
            v1.short_bytes(f.key_name),
            u32(f.key_version),
            u16(len(bindings) + f.bindings_length_delta),
            bindings,
        )
    )


def encode_blob(f: Any, kek: bytes, data_key: bytes) -> bytes:
    """AAD || nonce || AES-256-GCM(kek, nonce, data key, AAD)."""
    aad = encode_aad(f)
    nonce: bytes = f.nonce
    sealed: bytes = seal(kek, nonce, data_key, aad)
    return aad + nonce + sealed


def fields_of(v: Any) -> Any:
    """The v1 generator's canonical fields of a valid vector, as v2 with a v2 nonce."""
    return dataclasses.replace(
        v.fields, format_version=FORMAT_VERSION, nonce=derive(f"v2 nonce {v.id}", NONCE_SIZE)
    )


def valid_vector(v: Any) -> dict[str, Any]:
    f = fields_of(v)
    aad = encode_aad(f)
    ciphertext = seal(v.kek, f.nonce, v.data_key, aad)
    return {
        "id": v.id,
        "description": v.description,
        "kek": v.kek.hex(),
        "key_name": v.key_name,
        "key_version": v.key_version,
        "nonce": f.nonce.hex(),
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
        "blob": (aad + f.nonce + ciphertext).hex(),
    }


# Header and bindings defects, each sealed with a *valid* GCM tag over the bad AAD: only the
# parser can stop them. (id, description, field changes)
_SEALED_DEFECTS: list[tuple[str, str, dict[str, Any]]] = [
    ("bad_magic", "Magic 'KBX' instead of 'KBW'.", {"magic": b"KBX"}),
    ("lowercase_magic", "Magic 'kbw'.", {"magic": b"kbw"}),
    ("format_version_0", "Format version 0x00.", {"format_version": 0}),
    ("format_version_3", "Format version 0x03 (unknown future version).", {"format_version": 3}),
    ("key_name_empty", "Key name of length 0.", {"key_name": b""}),
    ("key_name_uppercase", "Key name 'Recordings' (upper case).", {"key_name": b"Recordings"}),
    ("key_name_too_long", "Key name of 65 characters.", {"key_name": b"k" * 65}),
    ("key_name_invalid_utf8", "Key name bytes ff fe.", {"key_name": b"\xff\xfe"}),
    ("key_version_zero", "Key version 0 (versions start at 1).", {"key_version": 0}),
    (
        "bindings_length_overrun",
        "Bindings length one more than the bindings (eats into the nonce).",
        {"bindings_length_delta": 1},
    ),
    (
        "bindings_length_short",
        "Bindings length one less than the bindings.",
        {"bindings_length_delta": -1},
    ),
    (
        "bindings_trailing_byte",
        "One extra byte at the end of the bindings, counted by the bindings length.",
        {"bindings_trailer": b"\x00"},
    ),
    ("recording_id_empty", "Recording id of length 0.", {"recording_id": b""}),
    ("recording_id_newline", "Recording id with a line feed.", {"recording_id": b"rec\n0001"}),
    (
        "recording_id_c1_control",
        "Recording id with U+0085 NEXT LINE (c2 85).",
        {"recording_id": "rec\u00850001".encode()},
    ),
    (
        "recording_id_overlong_utf8",
        "Recording id with an overlong UTF-8 encoding of '/' (c0 af).",
        {"recording_id": b"rec-\xc0\xaf"},
    ),
    ("retain_until_zero", "retain_until 0.", {"retain_until": 0}),
    (
        "retain_until_after_9999",
        "retain_until past 9999-12-31T23:59:59Z.",
        {"retain_until": MAX_RETAIN_UNTIL + 1},
    ),
    ("purposes_none", "Zero purposes.", {"purposes": []}),
    ("purposes_unsorted", "Purposes out of order.", {"purposes": [b"support", b"quality"]}),
    (
        "purpose_duplicate",
        "The same purpose twice.",
        {"purposes": [b"quality", b"quality", b"support"]},
    ),
    ("purpose_uppercase", "Purpose 'Support'.", {"purposes": [b"Support", b"quality"]}),
    (
        "subjects_unsorted",
        "Subject ids out of order.",
        {"subject_ids": [b"customer:7", b"agent:42"]},
    ),
    ("subject_control", "A subject id with a tab.", {"subject_ids": [b"agent:\t42"]}),
    (
        "context_unsorted",
        "Context keys out of order (tenant, region).",
        {"context": [(b"tenant", b"acme"), (b"region", b"eu")]},
    ),
    (
        "context_duplicate_key",
        "The same context key twice.",
        {"context": [(b"tenant", b"acme"), (b"tenant", b"evil")]},
    ),
    (
        "context_value_too_long",
        "A context value of 1025 bytes.",
        {"context": [(b"tenant", b"v" * 1025)]},
    ),
]


def invalid_vectors() -> list[dict[str, Any]]:
    base = next(v for v in v1.VALID if v.id == "typical")
    good = fields_of(base)
    good_aad = encode_aad(good)
    good_ct = seal(base.kek, good.nonce, base.data_key, good_aad)
    good_blob = good_aad + good.nonce + good_ct
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

    # framing
    add("empty", "Zero bytes.", b"")
    add("magic_only", "Only the magic and the version.", MAGIC + u8(FORMAT_VERSION))
    add("truncated_header", "The first 20 bytes of a valid blob.", good_blob[:20])
    add("truncated_tag", "A valid blob without its last byte.", good_blob[:-1])
    add("truncated_to_aad", "A valid blob without its nonce, ciphertext and tag.", good_aad)
    add(
        "truncated_to_nonce",
        "A valid blob without its ciphertext and tag.",
        good_aad + good.nonce,
    )
    add("trailing_byte", "A valid blob followed by one zero byte.", good_blob + b"\x00")
    add(
        "oversized_blob",
        f"{MAX_WRAPPED_KEY_SIZE + 1} bytes: a valid blob padded past the size limit.",
        good_blob + b"\x00" * (MAX_WRAPPED_KEY_SIZE + 1 - len(good_blob)),
    )
    add(
        "bindings_length_max",
        "Bindings length 0xffff on a short blob.",
        good_aad[: 5 + len(good.key_name) + 4]
        + u16(0xFFFF)
        + v1.encode_bindings(good)
        + good.nonce
        + good_ct,
    )
    for vid, description, changes in _SEALED_DEFECTS:
        f = dataclasses.replace(good, **changes)
        add(
            vid,
            description + " (GCM tag valid over the bad AAD)",
            encode_blob(f, base.kek, base.data_key),
        )

    # Well-formed, canonical blobs whose GCM check must fail.
    def tampered(vid: str, description: str, position: int, mask: int) -> None:
        blob = bytearray(good_blob)
        blob[position] ^= mask
        add(vid, description, bytes(blob), "authenticate")

    tampered("tag_flipped", "Last tag bit flipped.", len(good_blob) - 1, 0x01)
    tampered(
        "ciphertext_flipped",
        "First ciphertext byte changed.",
        len(good_aad) + NONCE_SIZE,
        0x80,
    )
    tampered(
        "nonce_flipped",
        "First nonce byte changed (the nonce is not in the AAD; GCM authenticates it as its IV).",
        len(good_aad),
        0x01,
    )

    def reseal(vid: str, description: str, **changes: Any) -> None:
        """A well-formed AAD with the original nonce and ciphertext: only GCM can stop it."""
        f = dataclasses.replace(good, **changes)
        add(vid, description, encode_aad(f) + f.nonce + good_ct, "authenticate")

    reseal(
        "nonce_changed",
        "Another nonce, original ciphertext.",
        nonce=derive("another nonce", NONCE_SIZE),
    )
    reseal(
        "retain_until_extended",
        "Retention moved to 9999-12-31 (canonical), original ciphertext.",
        retain_until=MAX_RETAIN_UNTIL,
    )
    reseal(
        "purpose_added",
        "Purpose 'billing' added (canonical), original ciphertext.",
        purposes=[b"billing", *good.purposes],
    )
    reseal(
        "recording_id_changed",
        "Recording id 'rec-0002', original ciphertext.",
        recording_id=b"rec-0002",
    )
    reseal(
        "key_version_changed",
        "Key version 2 in the header, ciphertext made under version 1.",
        key_version=2,
    )
    minimal = next(v for v in v1.VALID if v.id == "minimal")
    mf = fields_of(minimal)
    other_ct = seal(minimal.kek, good.nonce, minimal.data_key, encode_aad(mf))
    add(
        "ciphertext_swapped",
        "AAD and nonce of 'typical' with a ciphertext made under another AAD.",
        good_aad + good.nonce + other_ct,
        "authenticate",
    )
    # Cross-version relabelling: the same nonce and ciphertext moved into the other layout.
    v1_fields = dataclasses.replace(good, format_version=0x01)
    v1_aad = v1.encode_aad(v1_fields)
    v1_ct = seal(base.kek, good.nonce, base.data_key, v1_aad)
    add(
        "v1_relabelled_as_v2",
        "A valid v1 blob's nonce and ciphertext in the v2 layout with version byte 02.",
        good_aad + good.nonce + v1_ct,
        "authenticate",
    )
    add(
        "v2_relabelled_as_v1",
        "This blob's nonce and ciphertext in the v1 layout with version byte 01 (a v1 "
        "parser accepts it; GCM refuses it).",
        v1_aad + good_ct,
        "authenticate",
    )
    return out


def build() -> dict[str, Any]:
    """The whole vector file as a JSON-ready dict."""
    return {
        "format": "keybroker wrapped key v2",
        "spec": "docs/FORMAT.md",
        "generator": "tests/vectors/generate_wrapped_key_v2.py",
        "notes": [
            "All binary values are lowercase hex. The test KEKs are public: never use them.",
            "bindings are request values in the order a caller sends them (duplicates "
            "allowed); the blob holds each list sorted by UTF-8 bytes and de-duplicated, and "
            "the context sorted by key.",
            "The AAD is the first aad_length bytes of blob; the 12-byte nonce follows it; "
            "ciphertext is ciphertext || tag (48 bytes) and ends the blob.",
            "invalid[].stage 'parse': the parser must refuse the blob. 'authenticate': the blob "
            "parses but AES-256-GCM under the KEK of vector kek_of must fail.",
        ],
        "valid": [valid_vector(v) for v in v1.VALID],
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
