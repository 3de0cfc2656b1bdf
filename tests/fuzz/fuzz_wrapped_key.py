"""Fuzz the wrapped-key parser (keybroker.core.wrapped_key, docs/FORMAT.md).

Two kinds of input, chosen by the first byte:

* raw: the rest is a blob. ``WrappedKey.parse`` must either refuse it with InvalidWrappedKeyError
  (and nothing else) or accept it; an accepted blob must be canonical: re-encoding the parsed
  fields gives back exactly the same bytes, and the parsed header is the GCM additional data.
* structured: the rest drives the fields of a wrapped key (name, version, nonce, bindings);
  ``Bindings.create`` must either refuse them with InvalidRequestError or encode them, and a blob
  built from accepted fields must parse back to the same fields.
"""

from __future__ import annotations

from keybroker.core.wrapped_key import (
    CIPHERTEXT_SIZE,
    NONCE_SIZE,
    Bindings,
    KeyRef,
    WrappedKey,
)
from keybroker.errors import InvalidRequestError, InvalidWrappedKeyError
from tests.fuzz._common import FuzzFailure, Provider, provider


def check_blob(blob: bytes) -> WrappedKey | None:
    """Parse ``blob``; raise FuzzFailure if the parser breaks a rule of the format."""
    try:
        parsed = WrappedKey.parse(blob)
    except InvalidWrappedKeyError:
        return None
    rebuilt = WrappedKey.header(parsed.key, parsed.nonce, parsed.bindings) + parsed.ciphertext
    if rebuilt != blob or parsed.encode() != blob:
        raise FuzzFailure(f"accepted a non-canonical blob: {blob.hex()}")
    if parsed.aad != blob[:-CIPHERTEXT_SIZE] or len(parsed.ciphertext) != CIPHERTEXT_SIZE:
        raise FuzzFailure("the parsed header is not the blob's additional data")
    return parsed


def _text(fdp: Provider, limit: int) -> str:
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, limit)))


def check_fields(fdp: Provider) -> None:
    name = _text(fdp, 70)
    version = fdp.ConsumeIntInRange(0, 0xFFFFFFFF + 1)
    nonce = fdp.ConsumeBytes(NONCE_SIZE).ljust(NONCE_SIZE, b"\0")
    try:
        bindings = Bindings.create(
            recording_id=_text(fdp, 300),
            purposes=[_text(fdp, 70) for _ in range(fdp.ConsumeIntInRange(0, 18))],
            subject_ids=[_text(fdp, 140) for _ in range(fdp.ConsumeIntInRange(0, 66))],
            retain_until=fdp.ConsumeIntInRange(-1, 1 << 64),
            context={_text(fdp, 70): _text(fdp, 1100) for _ in range(fdp.ConsumeIntInRange(0, 18))},
        )
        header = WrappedKey.header(KeyRef(name, version), nonce, bindings)
    except InvalidRequestError as exc:
        if type(exc) is not InvalidRequestError:
            raise FuzzFailure(f"unexpected error class {type(exc).__name__}") from exc
        return
    blob = header + fdp.ConsumeBytes(CIPHERTEXT_SIZE).ljust(CIPHERTEXT_SIZE, b"\0")
    parsed = check_blob(blob)
    if parsed is None:
        raise FuzzFailure(f"refused a blob built from valid fields: {blob.hex()}")
    if parsed.key != KeyRef(name, version) or parsed.nonce != nonce or parsed.bindings != bindings:
        raise FuzzFailure("a blob parsed back to other fields than it was built from")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        check_fields(provider(data[1:]))
    else:
        check_blob(data[1:])
