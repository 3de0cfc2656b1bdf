"""Recording encryption format v1: streaming, segmented AES-256-GCM (docs/RECORDING_FORMAT.md).

::

    header   magic "KBREC" | version 0x01 | segment size u32 | salt (32) | nonce prefix (7)
             | recording id length u16 | recording id | wrapped key length u16 | wrapped key
    segments ciphertext_i || tag_i   for i = 0, 1, …; every segment but the last holds exactly
             `segment size` plaintext bytes, the last 0..segment size (0 only if it is the only one)

    file key  K = HKDF-SHA256(ikm = data key, salt = salt,
                              info = "keybroker recording v1" || 0x00 || SHA-256(header))
    nonce_i   = nonce prefix || u32 i || last flag (0x01 on the final segment, else 0x00)

Every header byte feeds the file key, so a changed header fails the first segment. The segment
index and last flag are in the nonce (the STREAM construction), so reordering, dropping,
duplicating or truncating segments, or appending data, fails authentication. Memory stays at two
segments whatever the file size.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keybroker.core.wrapped_key import MAX_RECORDING_ID, MAX_WRAPPED_KEY_SIZE
from keybroker.errors import RecordingIntegrityError

MAGIC = b"KBREC"
VERSION = 1
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16
MIN_SEGMENT_SIZE = 4096
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
DEFAULT_SEGMENT_SIZE = 256 * 1024
MAX_SEGMENTS = 2**32
_INFO = b"keybroker recording v1\x00"
_FIXED = struct.Struct(">5sBI32s7s")

#: Called with the number of plaintext bytes processed so far.
Progress = Callable[[int], None]


def _not_a_recording() -> RecordingIntegrityError:
    return RecordingIntegrityError("not a keybroker recording", reason="not_a_recording")


@dataclass(frozen=True)
class RecordingHeader:
    segment_size: int
    salt: bytes = field(repr=False)
    nonce_prefix: bytes = field(repr=False)
    recording_id: str
    wrapped_key: bytes = field(repr=False)

    def encode(self) -> bytes:
        rid = self.recording_id.encode("utf-8")
        if not MIN_SEGMENT_SIZE <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(f"segment size must be {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}")
        if not 0 < len(rid) <= MAX_RECORDING_ID:
            raise ValueError(f"recording id must be 1..{MAX_RECORDING_ID} bytes")
        if not 0 < len(self.wrapped_key) <= MAX_WRAPPED_KEY_SIZE:
            raise ValueError("wrapped key length out of bounds")
        if len(self.salt) != SALT_SIZE or len(self.nonce_prefix) != NONCE_PREFIX_SIZE:
            # struct would silently pad or cut them: the file could never be decrypted
            raise ValueError(f"salt must be {SALT_SIZE} bytes, nonce prefix {NONCE_PREFIX_SIZE}")
        fixed = _FIXED.pack(MAGIC, VERSION, self.segment_size, self.salt, self.nonce_prefix)
        return b"".join(
            (
                fixed,
                struct.pack(">H", len(rid)),
                rid,
                struct.pack(">H", len(self.wrapped_key)),
                self.wrapped_key,
            )
        )

    @classmethod
    def read(cls, src: BinaryIO) -> RecordingHeader:
        """Read and bound-check a header from ``src`` (consumes exactly the header)."""
        fixed = _read_exactly(src, _FIXED.size)
        if len(fixed) < len(MAGIC) or fixed[: len(MAGIC)] != MAGIC:
            raise _not_a_recording()
        if len(fixed) != _FIXED.size:
            raise RecordingIntegrityError
        _, version, segment_size, salt, prefix = _FIXED.unpack(fixed)
        if version != VERSION or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise RecordingIntegrityError
        rid = _read_field(src, MAX_RECORDING_ID)
        wrapped = _read_field(src, MAX_WRAPPED_KEY_SIZE)
        try:
            recording_id = rid.decode("utf-8")
        except UnicodeDecodeError:
            raise RecordingIntegrityError from None
        return cls(segment_size, salt, prefix, recording_id, wrapped)

    def cipher(self, data_key: bytes) -> AESGCM:
        """AES-256-GCM under the file key derived from the data key and this exact header."""
        info = _INFO + hashlib.sha256(self.encode()).digest()
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=self.salt, info=info)
        return AESGCM(hkdf.derive(data_key))

    def nonce(self, index: int, last: bool) -> bytes:
        return self.nonce_prefix + struct.pack(">IB", index, 1 if last else 0)


def _read_exactly(src: BinaryIO, n: int) -> bytes:
    chunks = []
    while n:
        chunk = src.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_field(src: BinaryIO, limit: int) -> bytes:
    raw = _read_exactly(src, 2)
    if len(raw) != 2:
        raise RecordingIntegrityError
    (length,) = struct.unpack(">H", raw)
    if not 0 < length <= limit:
        raise RecordingIntegrityError
    value = _read_exactly(src, length)
    if len(value) != length:
        raise RecordingIntegrityError
    return value


def _fill(src: BinaryIO, buf: bytearray) -> int:
    """Read into ``buf`` until it is full or the stream ends; return the bytes read."""
    view = memoryview(buf)
    total = 0
    while total < len(buf):
        n = src.readinto(view[total:])  # type: ignore[attr-defined]
        if not n:
            break
        total += n
    return total


def new_header(
    recording_id: str, wrapped_key: bytes, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> RecordingHeader:
    """A header with a fresh random salt and nonce prefix."""
    return RecordingHeader(
        segment_size,
        os.urandom(SALT_SIZE),
        os.urandom(NONCE_PREFIX_SIZE),
        recording_id,
        wrapped_key,
    )


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    header: RecordingHeader,
    data_key: bytes,
    *,
    progress: Progress | None = None,
) -> int:
    """Write ``header`` and the encrypted segments of ``src`` to ``dst``; return plaintext bytes."""
    dst.write(header.encode())
    aead = header.cipher(data_key)
    size = header.segment_size
    current, following = bytearray(size), bytearray(size)
    out = bytearray(size + TAG_SIZE)
    n = _fill(src, current)
    index = total = 0
    while True:
        if index >= MAX_SEGMENTS:
            raise ValueError("recording too large for one file")
        m = _fill(src, following) if n == size else 0
        last = m == 0
        view = memoryview(out)[: n + TAG_SIZE]
        aead.encrypt_into(header.nonce(index, last), memoryview(current)[:n], None, view)
        dst.write(view)
        total += n
        if progress is not None:
            progress(total)
        if last:
            return total
        current, following, n = following, current, m
        index += 1


def decrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    data_key_for: Callable[[RecordingHeader], bytes],
    *,
    progress: Progress | None = None,
) -> int:
    """Decrypt a recording from ``src`` to ``dst``; return plaintext bytes.

    ``data_key_for`` receives the header (recording id, wrapped key) and returns the data key,
    typically by asking the broker to unwrap it. Segments are written as they authenticate; if the
    stream turns out truncated or tampered later, RecordingIntegrityError is raised at that point,
    so treat ``dst`` as invalid unless this function returns.
    """
    header = RecordingHeader.read(src)
    return decrypt_segments(src, dst, header, data_key_for(header), progress=progress)


def decrypt_segments(
    src: BinaryIO,
    dst: BinaryIO,
    header: RecordingHeader,
    data_key: bytes,
    *,
    progress: Progress | None = None,
) -> int:
    """Decrypt the segments that follow ``header`` in ``src`` (see :func:`decrypt_stream`)."""
    aead = header.cipher(data_key)
    chunk = header.segment_size + TAG_SIZE
    current, following = bytearray(chunk), bytearray(chunk)
    out = bytearray(header.segment_size)
    n = _fill(src, current)
    index = total = 0
    while True:
        if n < TAG_SIZE or index >= MAX_SEGMENTS:
            raise RecordingIntegrityError
        m = _fill(src, following) if n == chunk else 0
        last = m == 0
        if last and n == TAG_SIZE and index > 0:
            raise RecordingIntegrityError  # an empty final segment is only valid alone
        view = memoryview(out)[: n - TAG_SIZE]
        try:
            aead.decrypt_into(header.nonce(index, last), memoryview(current)[:n], None, view)
        except InvalidTag:
            raise RecordingIntegrityError from None
        dst.write(view)
        total += n - TAG_SIZE
        if progress is not None:
            progress(total)
        if last:
            return total
        current, following, n = following, current, m
        index += 1
