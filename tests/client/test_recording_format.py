"""Recording format v1 (pure): round trips at boundary sizes, every tampering kind detected,
flat memory on large streams."""

from __future__ import annotations

import io
import os
import resource
import struct

import pytest

from keybroker.client.recording import (
    MIN_SEGMENT_SIZE,
    TAG_SIZE,
    RecordingHeader,
    decrypt_stream,
    encrypt_stream,
    new_header,
)
from keybroker.errors import RecordingIntegrityError

SEG = MIN_SEGMENT_SIZE
KEY = bytes(range(32))


def encrypt(
    data: bytes, segment_size: int = SEG, key: bytes = KEY
) -> tuple[bytes, RecordingHeader]:
    header = new_header("rec-1", b"wrapped-key-bytes", segment_size)
    out = io.BytesIO()
    assert encrypt_stream(io.BytesIO(data), out, header, key) == len(data)
    return out.getvalue(), header


def decrypt(blob: bytes, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(blob), out, lambda h: key)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 7 * SEG + 123])
def test_round_trip_at_boundary_sizes(size: int) -> None:
    """Empty, one byte, segment -1/exact/+1, two exact segments, many segments."""
    data = os.urandom(size)
    blob, header = encrypt(data)
    segments = max(1, -(-size // SEG))
    assert len(blob) == len(header.encode()) + size + segments * TAG_SIZE
    assert decrypt(blob) == data


def _segments(blob: bytes, header: RecordingHeader) -> tuple[bytes, list[bytes]]:
    head = header.encode()
    body = blob[len(head) :]
    step = header.segment_size + TAG_SIZE
    return head, [body[i : i + step] for i in range(0, len(body), step)]


def _tamperings() -> dict[str, bytes]:
    data = os.urandom(4 * SEG + 100)
    blob, header = encrypt(data)
    head, segs = _segments(blob, header)

    def flip(b: bytes, i: int) -> bytes:
        return b[:i] + bytes([b[i] ^ 1]) + b[i + 1 :]

    return {
        "header_segment_size": flip(blob, 8),
        "header_salt": flip(blob, 12),
        "header_nonce_prefix": flip(blob, 42),
        "header_recording_id": flip(blob, 52),
        "header_wrapped_key": flip(blob, len(head) - 1),
        "segment_body": flip(blob, len(head) + 10),
        "segment_tag": flip(blob, len(head) + SEG + TAG_SIZE - 1),
        "reordered": head + segs[1] + segs[0] + b"".join(segs[2:]),
        "dropped": head + segs[0] + b"".join(segs[2:]),
        "duplicated": head + segs[0] + segs[0] + b"".join(segs[1:]),
        "truncated_at_boundary": head + b"".join(segs[:3]),
        "truncated_mid_segment": blob[:-50],
        "truncated_to_header": head,
        "appended": blob + b"\x00",
        "appended_segment": blob + segs[0],
        "last_segment_removed_flag": head + b"".join(segs[:-1]),
    }


@pytest.mark.parametrize("kind", sorted(_tamperings()))
def test_every_tampering_kind_is_detected(kind: str) -> None:
    """Changed header or segment, reordered, dropped, duplicated, truncated or extended streams fail
    with the one uniform integrity error."""
    blob = _tamperings()[kind]
    with pytest.raises(RecordingIntegrityError) as info:
        decrypt(blob)
    assert info.value.message == "recording is damaged or has been tampered with"


def test_wrong_key_is_detected() -> None:
    """Another data key cannot decrypt."""
    blob, _ = encrypt(b"audio")
    with pytest.raises(RecordingIntegrityError):
        decrypt(blob, key=bytes(32))


def test_not_a_recording() -> None:
    """Other files are named as such."""
    with pytest.raises(RecordingIntegrityError) as info:
        decrypt(b"RIFF....WAVEfmt ")
    assert info.value.message == "not a keybroker recording"


def test_header_lengths_are_bounded() -> None:
    """A header announcing an oversized field is refused before reading it."""
    blob, header = encrypt(b"x")
    head = header.encode()
    rid_len_at = 5 + 1 + 4 + 32 + 7
    bad = head[:rid_len_at] + struct.pack(">H", 60000) + blob[rid_len_at + 2 :]
    with pytest.raises(RecordingIntegrityError):
        decrypt(bad)


class _Pattern(io.RawIOBase):
    """A large readable stream generated on the fly (no disk, no memory)."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = os.urandom(1 << 16)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.left, len(self.block))
        buf[:n] = self.block[:n]
        self.left -= n
        return n


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self.size += len(b)
        return len(b)


def test_memory_stays_flat_for_a_large_stream() -> None:
    """Encrypting 512 MiB grows peak RSS by far less than the data (two segments of buffers)."""
    size = 512 * 1024 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    header = new_header("rec-big", b"w" * 64)
    sink = _Sink()
    assert encrypt_stream(_Pattern(size), sink, header, KEY) == size  # type: ignore[arg-type]
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert sink.size > size
    assert grown_mib < 32
