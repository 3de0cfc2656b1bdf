"""Wrapped-key formats v1 and v2: self-describing, versioned, every length bounded before use.

Layouts (all integers big-endian; documented byte by byte in docs/FORMAT.md)::

    v2 (written by every new wrap):
    magic "KBW" | format version 0x02
    key name length u8 (1..64) | key name (ASCII [a-z0-9._-])
    key version u32 (>= 1)
    bindings length u16 | bindings (canonical encoding, see :meth:`Bindings.encode`)
    nonce (12 bytes: the IV the HSM actually used)
    ciphertext || tag (32 + 16 bytes)

    v1 (read forever, never written): the same fields with the nonce between the key version
    and the bindings length, and format version 0x01.

v2's AAD is everything before the nonce, so it is fixed before the HSM is asked to encrypt and
the HSM may choose the IV (AWS CloudHSM, Luna in FIPS mode). The nonce is still authenticated:
it is GCM's IV, and a changed IV fails the tag check like a changed AAD byte. v1's AAD is
everything before the ciphertext, nonce included. The format version is the fourth AAD byte of
both, so a blob cannot be relabelled from one version to the other. The bindings encoding is
canonical: lists are sorted and free of duplicates, and the parser refuses any other byte
string, so one set of bindings has exactly one encoding.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from keybroker.errors import InvalidRequestError, InvalidWrappedKeyError

MAGIC = b"KBW"
FORMAT_V1 = 1
FORMAT_V2 = 2
#: The format new wraps write.
FORMAT_VERSION = FORMAT_V2
NONCE_SIZE = 12
DATA_KEY_SIZE = 32
TAG_SIZE = 16
CIPHERTEXT_SIZE = DATA_KEY_SIZE + TAG_SIZE

MAX_KEY_NAME = 64
MAX_RECORDING_ID = 255
MAX_PURPOSES = 16
MAX_PURPOSE = 64
MAX_SUBJECTS = 64
MAX_SUBJECT_ID = 128
MAX_CONTEXT_ENTRIES = 16
MAX_CONTEXT_KEY = 64
MAX_CONTEXT_VALUE = 1024
MAX_RETAIN_UNTIL = 253402300799  # 9999-12-31T23:59:59Z
#: Upper bound of an encoded wrapped key; larger input is refused before parsing.
MAX_WRAPPED_KEY_SIZE = 32 * 1024

_KEY_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_PURPOSE_RE = re.compile(r"[a-z0-9][a-z0-9._:-]{0,63}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 controls


@dataclass(frozen=True, slots=True, order=True)
class KeyRef:
    """One version of a key-encryption key."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}/v{self.version}"


def validate_key_name(name: str) -> str:
    """Return ``name`` if it is a valid key name, else raise InvalidRequestError."""
    if not _KEY_NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            "key_name must be 1..64 characters of a-z, 0-9, '.', '_', '-'", reason="bad_key_name"
        )
    return name


def _text(value: str, field: str, max_bytes: int, *, allow_empty: bool = False) -> bytes:
    raw = value.encode("utf-8")
    if (not raw and not allow_empty) or len(raw) > max_bytes or _CONTROL_RE.search(value):
        lower = 0 if allow_empty else 1
        raise InvalidRequestError(
            f"{field} must be {lower}..{max_bytes} bytes of UTF-8 without control characters",
            reason=f"bad_{field}",
        )
    return raw


def _sorted_unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(values), key=lambda v: v.encode("utf-8")))


@dataclass(frozen=True, slots=True)
class Bindings:
    """What a data key is bound to; clear text in the blob and authenticated as GCM AAD."""

    recording_id: str
    purposes: tuple[str, ...]
    subject_ids: tuple[str, ...]
    retain_until: int
    """Unix seconds after which the key is refused."""
    context: tuple[tuple[str, str], ...]

    @classmethod
    def create(
        cls,
        *,
        recording_id: str,
        purposes: Iterable[str],
        subject_ids: Iterable[str],
        retain_until: int,
        context: Mapping[str, str],
    ) -> Bindings:
        """Validate request values and build canonical bindings (sorted, de-duplicated)."""
        return cls.canonical(
            recording_id=recording_id,
            purposes=purposes,
            subject_ids=subject_ids,
            retain_until=retain_until,
            context=context,
        )[0]

    @classmethod
    def canonical(
        cls,
        *,
        recording_id: str,
        purposes: Iterable[str],
        subject_ids: Iterable[str],
        retain_until: int,
        context: Mapping[str, str],
    ) -> tuple[Bindings, bytes]:
        """Like :meth:`create`, also returning the canonical encoding (validated once)."""
        bindings = cls(
            recording_id=recording_id,
            purposes=_sorted_unique(purposes),
            subject_ids=_sorted_unique(subject_ids),
            retain_until=retain_until,
            context=tuple(sorted(context.items(), key=lambda kv: kv[0].encode("utf-8"))),
        )
        return bindings, bindings.encode()  # encode() validates every bound

    @property
    def context_map(self) -> dict[str, str]:
        return dict(self.context)

    def encode(self) -> bytes:
        """The canonical encoding. Raises InvalidRequestError if a value is out of bounds."""
        out = bytearray()
        rid = _text(self.recording_id, "recording_id", MAX_RECORDING_ID)
        out += bytes([len(rid)]) + rid
        if not 0 < self.retain_until <= MAX_RETAIN_UNTIL:
            raise InvalidRequestError("retain_until is out of range", reason="bad_retain_until")
        out += struct.pack(">Q", self.retain_until)
        if not 1 <= len(self.purposes) <= MAX_PURPOSES:
            raise InvalidRequestError(
                f"purposes must hold 1..{MAX_PURPOSES} entries", reason="bad_purposes"
            )
        out.append(len(self.purposes))
        for purpose in self.purposes:
            if not _PURPOSE_RE.fullmatch(purpose):
                raise InvalidRequestError(
                    "each purpose must be 1..64 characters of a-z, 0-9, '.', '_', ':', '-'",
                    reason="bad_purposes",
                )
            out += bytes([len(purpose)]) + purpose.encode("ascii")
        if len(self.subject_ids) > MAX_SUBJECTS:
            raise InvalidRequestError(
                f"subject_ids must hold at most {MAX_SUBJECTS} entries", reason="bad_subject_ids"
            )
        out.append(len(self.subject_ids))
        for subject in self.subject_ids:
            raw = _text(subject, "subject_ids", MAX_SUBJECT_ID)
            out += bytes([len(raw)]) + raw
        if len(self.context) > MAX_CONTEXT_ENTRIES:
            raise InvalidRequestError(
                f"context must hold at most {MAX_CONTEXT_ENTRIES} entries", reason="bad_context"
            )
        out.append(len(self.context))
        for key, value in self.context:
            raw_key = _text(key, "context", MAX_CONTEXT_KEY)
            raw_value = _text(value, "context", MAX_CONTEXT_VALUE, allow_empty=True)
            out += bytes([len(raw_key)]) + raw_key + struct.pack(">H", len(raw_value)) + raw_value
        return bytes(out)


def _increasing(items: list[bytes]) -> bool:
    """Sorted by bytes and free of duplicates: what canonical lists are."""
    return all(a < b for a, b in itertools.pairwise(items))


def _clean(text: str, max_bytes: int, raw: bytes, *, allow_empty: bool = False) -> bool:
    return (allow_empty or bool(raw)) and len(raw) <= max_bytes and not _CONTROL_RE.search(text)


def _short_items(raw: bytes, p: int) -> tuple[list[bytes], int]:
    """A u8 count of u8-length-prefixed items at ``p``; the items and the offset after them."""
    items: list[bytes] = []
    count, p = raw[p], p + 1
    for _ in range(count):
        q = p + 1 + raw[p]
        items.append(raw[p + 1 : q])
        p = q
    return items, p


def _parse_bindings(raw: bytes) -> Bindings:
    """Parse canonical bindings; refuse every other byte string.

    Hot path (one per unwrap): reads by index, and checks
    the canonical rules of :meth:`Bindings.encode` directly instead of re-encoding. A slice that
    runs past the end leaves ``p`` beyond it, so the final length check catches every overrun.
    tests/core/test_wrapped_key.py checks, on arbitrary input, that this accepts exactly what
    re-encoding would."""
    try:
        n = raw[0]
        p = 1 + n
        rid_raw = raw[1:p]
        recording_id = rid_raw.decode("utf-8")
        retain_until = int.from_bytes(raw[p : p + 8], "big")
        purposes_raw, p = _short_items(raw, p + 8)
        subjects_raw, p = _short_items(raw, p)
        count, p = raw[p], p + 1
        keys_raw: list[bytes] = []
        values_raw: list[bytes] = []
        for _ in range(count):
            q = p + 1 + raw[p]
            keys_raw.append(raw[p + 1 : q])
            r = q + 2 + int.from_bytes(raw[q : q + 2], "big")
            values_raw.append(raw[q + 2 : r])
            p = r
        if p != len(raw):
            raise InvalidWrappedKeyError
        purposes = tuple(v.decode("ascii") for v in purposes_raw)
        subject_ids = tuple(v.decode("utf-8") for v in subjects_raw)
        context = tuple(
            (k.decode("utf-8"), v.decode("utf-8"))
            for k, v in zip(keys_raw, values_raw, strict=True)
        )
    except (IndexError, UnicodeDecodeError):
        raise InvalidWrappedKeyError from None
    canonical = (
        _clean(recording_id, MAX_RECORDING_ID, rid_raw)
        and 0 < retain_until <= MAX_RETAIN_UNTIL
        and 1 <= len(purposes) <= MAX_PURPOSES
        and all(_PURPOSE_RE.fullmatch(v) for v in purposes)
        and _increasing(purposes_raw)
        and len(subject_ids) <= MAX_SUBJECTS
        and all(
            _clean(v, MAX_SUBJECT_ID, b) for v, b in zip(subject_ids, subjects_raw, strict=True)
        )
        and _increasing(subjects_raw)
        and len(context) <= MAX_CONTEXT_ENTRIES
        and all(
            _clean(k, MAX_CONTEXT_KEY, kb) and _clean(v, MAX_CONTEXT_VALUE, vb, allow_empty=True)
            for (k, v), kb, vb in zip(context, keys_raw, values_raw, strict=True)
        )
        and _increasing(keys_raw)
    )
    if not canonical:  # unsorted, duplicated, out of bounds or otherwise non-canonical
        raise InvalidWrappedKeyError
    return Bindings(recording_id, purposes, subject_ids, retain_until, context)


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A parsed wrapped key. Its repr never shows the nonce or the ciphertext."""

    key: KeyRef
    nonce: bytes
    bindings: Bindings
    ciphertext: bytes
    """AES-256-GCM ciphertext of the data key followed by the 16-byte tag."""
    format_version: int = FORMAT_VERSION
    parsed_aad: bytes = field(default=b"", repr=False, compare=False)
    """The AAD bytes a parsed key came with (already checked canonical)."""
    parsed_bindings: bytes = field(default=b"", repr=False, compare=False)
    """The encoded bindings a parsed key came with: checked canonical, so exactly
    ``bindings.encode()``; a rewrap under another version reuses them (:meth:`aad_v2`)."""

    def __repr__(self) -> str:
        return (
            f"WrappedKey(v{self.format_version}, key={self.key}, "
            f"recording_id={self.bindings.recording_id!r})"
        )

    @staticmethod
    def _key_fields(key: KeyRef) -> bytes:
        name = validate_key_name(key.name).encode("ascii")
        if not 1 <= key.version <= 0xFFFFFFFF:
            raise InvalidRequestError("invalid key reference", reason="bad_key_ref")
        return bytes([len(name)]) + name + struct.pack(">I", key.version)

    @staticmethod
    def header(key: KeyRef, nonce: bytes, bindings: Bindings) -> bytes:
        """Format v1: everything before the ciphertext, nonce included; its GCM additional data.
        Kept to read (and test) v1 blobs; new wraps write v2 (:meth:`aad_v2`)."""
        if len(nonce) != NONCE_SIZE:
            raise InvalidRequestError("invalid key reference", reason="bad_key_ref")
        encoded = bindings.encode()
        return b"".join(
            (
                MAGIC,
                bytes([FORMAT_V1]),
                WrappedKey._key_fields(key),
                nonce,
                struct.pack(">H", len(encoded)),
                encoded,
            )
        )

    @staticmethod
    def aad_v2(key: KeyRef, bindings: Bindings, encoded: bytes = b"") -> bytes:
        """Format v2: everything before the nonce; its GCM additional data. Known before the
        HSM encrypts, so the HSM may choose the nonce. ``encoded``: ``bindings.encode()`` when
        the caller has it already (a parsed key's :attr:`parsed_bindings`)."""
        encoded = encoded or bindings.encode()
        return b"".join(
            (
                MAGIC,
                bytes([FORMAT_V2]),
                WrappedKey._key_fields(key),
                struct.pack(">H", len(encoded)),
                encoded,
            )
        )

    @staticmethod
    def join_v2(aad: bytes, nonce: bytes, ciphertext: bytes) -> bytes:
        """The v2 blob from its AAD (:meth:`aad_v2`) and what the HSM returned: the nonce it
        used and ciphertext || tag. Raises ValueError on a wrong size (an HSM defect)."""
        if len(nonce) != NONCE_SIZE or len(ciphertext) != CIPHERTEXT_SIZE:
            raise ValueError("the HSM returned a nonce or ciphertext of the wrong size")
        return aad + nonce + ciphertext

    @property
    def aad(self) -> bytes:
        if self.parsed_aad:
            return self.parsed_aad
        if self.format_version == FORMAT_V1:
            return self.header(self.key, self.nonce, self.bindings)
        return self.aad_v2(self.key, self.bindings)

    def encode(self) -> bytes:
        if self.format_version == FORMAT_V1:
            return self.aad + self.ciphertext
        return self.aad + self.nonce + self.ciphertext

    @classmethod
    def parse(cls, blob: bytes) -> WrappedKey:
        """Parse and bound-check ``blob`` (format v1 or v2); raise InvalidWrappedKeyError on any
        defect.

        Hot path: reads by index. A short slice (the blob ends early) leaves ``p`` past the end,
        so the final length check refuses every truncation and every trailing byte."""
        size = len(blob)
        if not 0 < size <= MAX_WRAPPED_KEY_SIZE:
            raise InvalidWrappedKeyError
        try:
            if blob[:3] != MAGIC:
                raise InvalidWrappedKeyError
            fmt = blob[3]
            p = 5 + blob[4]
            name = blob[5:p].decode("ascii")
            version = int.from_bytes(blob[p : p + 4], "big")
            p += 4
            if fmt == FORMAT_V2:
                q = p + 2 + int.from_bytes(blob[p : p + 2], "big")
                bindings_raw = blob[p + 2 : q]
                nonce = blob[q : q + NONCE_SIZE]
                aad_end = q
                end = q + NONCE_SIZE
            elif fmt == FORMAT_V1:
                nonce = blob[p : p + NONCE_SIZE]
                p += NONCE_SIZE
                q = p + 2 + int.from_bytes(blob[p : p + 2], "big")
                bindings_raw = blob[p + 2 : q]
                aad_end = end = q
            else:
                raise InvalidWrappedKeyError
            ciphertext = blob[end : end + CIPHERTEXT_SIZE]
        except (IndexError, UnicodeDecodeError):
            raise InvalidWrappedKeyError from None
        if end + CIPHERTEXT_SIZE != size or version == 0 or not _KEY_NAME_RE.fullmatch(name):
            raise InvalidWrappedKeyError
        bindings = _parse_bindings(bindings_raw)
        return cls(
            KeyRef(name, version), nonce, bindings, ciphertext, fmt, blob[:aad_end], bindings_raw
        )
