"""Fuzz the recording-format reader (keybroker.client.recording, docs/RECORDING_FORMAT.md).

The first byte chooses the kind of input:

* raw (even): the second byte picks the data key of one of the known-answer vectors
  (tests/vectors/recording_v1.json), the rest is a recording file. ``decrypt_stream`` must either
  refuse it with RecordingIntegrityError (and nothing else) or decrypt it; a file it decrypts
  must be exactly what ``encrypt_stream`` makes of that plaintext under the file's own header (so
  nothing but a genuine file is ever accepted).
* mutated (odd): the rest chooses a plaintext and a header, the harness encrypts a genuine file,
  then damages it (flip, overwrite, insert, cut, repeat, swap segments). A damaged file must be
  refused; an undamaged one must decrypt to its plaintext.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path

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
from tests.fuzz._common import FuzzFailure, Provider, provider

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "recording_v1.json"


@cache
def data_keys() -> tuple[bytes, ...]:
    valid = json.loads(VECTORS.read_text())["valid"]
    return tuple(bytes.fromhex(v["data_key"]) for v in valid)


def decrypt(blob: bytes, key: bytes) -> tuple[RecordingHeader, bytes] | None:
    """The header and plaintext of ``blob``, or None if it was refused as it must be."""
    seen: list[RecordingHeader] = []

    def key_for(header: RecordingHeader) -> bytes:
        seen.append(header)
        return key

    out = io.BytesIO()
    try:
        decrypt_stream(io.BytesIO(blob), out, key_for)
    except RecordingIntegrityError:
        return None
    return seen[0], out.getvalue()


def encrypt(header: RecordingHeader, plaintext: bytes, key: bytes) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plaintext), out, header, key)
    return out.getvalue()


def check_raw(key: bytes, blob: bytes) -> None:
    result = decrypt(blob, key)
    if result is not None and encrypt(result[0], result[1], key) != blob:
        raise FuzzFailure(f"accepted a recording that encrypt_stream would not make: {blob.hex()}")


def _damage(fdp: Provider, blob: bytes, step: int, head: int) -> bytes:
    out = bytearray(blob)
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        kind = fdp.ConsumeIntInRange(0, 5)
        at = fdp.ConsumeIntInRange(0, len(out))
        if kind == 0 and at < len(out):
            out[at] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        elif kind == 1:
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 32))
            out[at : at + len(chunk)] = chunk
        elif kind == 2:
            out[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 32))
        elif kind == 3:
            del out[at : at + fdp.ConsumeIntInRange(1, 2 * step)]
        elif kind == 4:
            out[at:at] = out[at : at + fdp.ConsumeIntInRange(1, 2 * step)]
        else:  # swap two whole segments
            count = (len(out) - head) // step
            if count >= 2:
                i, j = sorted(fdp.ConsumeIntInRange(0, count - 1) for _ in range(2))
                a, b = head + i * step, head + j * step
                out[a : a + step], out[b : b + step] = out[b : b + step], out[a : a + step]
    return bytes(out)


def check_mutated(fdp: Provider) -> None:
    key = data_keys()[fdp.ConsumeIntInRange(0, len(data_keys()) - 1)]
    segment = MIN_SEGMENT_SIZE
    header = RecordingHeader(
        segment,
        fdp.ConsumeBytes(SALT_SIZE).ljust(SALT_SIZE, b"\0"),
        fdp.ConsumeBytes(NONCE_PREFIX_SIZE).ljust(NONCE_PREFIX_SIZE, b"\0"),
        str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(1, 40))) or "r",
        fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 200)) or b"w",
    )
    try:
        head = len(header.encode())
    except ValueError:
        return  # e.g. a recording id longer than 255 bytes of UTF-8: the writer refuses it
    size = fdp.ConsumeIntInRange(0, 3 * segment + 10)
    plaintext = (fdp.ConsumeBytes(64) or b"\0") * (size // 64 + 1)
    plaintext = plaintext[:size]
    genuine = encrypt(header, plaintext, key)
    result = decrypt(genuine, key)
    if result is None or result[1] != plaintext:
        raise FuzzFailure("a genuine recording did not decrypt to its plaintext")
    damaged = _damage(fdp, genuine, segment + TAG_SIZE, head)
    result = decrypt(damaged, key)
    if result is not None and damaged != genuine:
        raise FuzzFailure(f"accepted a damaged recording: {damaged.hex()}")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    if data[0] & 1:
        check_mutated(provider(data[1:]))
    else:
        check_raw(data_keys()[data[1] % len(data_keys())], data[2:])
