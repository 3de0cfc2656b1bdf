"""Fuzz the wrapped-key parser (keybroker.core.wrapped_key, docs/FORMAT.md), formats v1 and v2.

Two kinds of input, chosen by the first byte:

* raw: the rest is a blob. ``WrappedKey.parse`` must either refuse it with InvalidWrappedKeyError
  (and nothing else) or accept it; an accepted blob must be canonical: re-encoding the parsed
  fields in its format gives back exactly the same bytes, and the parsed AAD is exactly the bytes
  the format authenticates (v1: everything before the ciphertext; v2: everything before the
  nonce).
* structured: the rest drives the fields of a wrapped key (format, name, version, nonce,
  bindings); ``Bindings.create`` must either refuse them with InvalidRequestError or encode them,
  and a blob built from accepted fields must parse back to the same fields.
"""

from __future__ import annotations

from keybroker.core.wrapped_key import (
    CIPHERTEXT_SIZE,
    FORMAT_V1,
    FORMAT_V2,
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
    if parsed.format_version == FORMAT_V1:
        aad = WrappedKey.header(parsed.key, parsed.nonce, parsed.bindings)
        rebuilt = aad + parsed.ciphertext
    elif parsed.format_version == FORMAT_V2:
        aad = WrappedKey.aad_v2(parsed.key, parsed.bindings)
        rebuilt = WrappedKey.join_v2(aad, parsed.nonce, parsed.ciphertext)
    else:
        raise FuzzFailure(f"accepted unknown format {parsed.format_version}: {blob.hex()}")
    if rebuilt != blob or parsed.encode() != blob:
        raise FuzzFailure(f"accepted a non-canonical blob: {blob.hex()}")
    if parsed.aad != aad or len(parsed.ciphertext) != CIPHERTEXT_SIZE:
        raise FuzzFailure("the parsed AAD is not what the format authenticates")
    return parsed


def _text(fdp: Provider, limit: int) -> str:
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, limit)))


def check_fields(fdp: Provider) -> None:
    v2 = fdp.ConsumeBool()
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
        ref = KeyRef(name, version)
        header = WrappedKey.aad_v2(ref, bindings) if v2 else WrappedKey.header(ref, nonce, bindings)
    except InvalidRequestError as exc:
        if type(exc) is not InvalidRequestError:
            raise FuzzFailure(f"unexpected error class {type(exc).__name__}") from exc
        return
    ciphertext = fdp.ConsumeBytes(CIPHERTEXT_SIZE).ljust(CIPHERTEXT_SIZE, b"\0")
    blob = WrappedKey.join_v2(header, nonce, ciphertext) if v2 else header + ciphertext
    parsed = check_blob(blob)
    if parsed is None:
        raise FuzzFailure(f"refused a blob built from valid fields: {blob.hex()}")
    if (
        parsed.key != ref
        or parsed.nonce != nonce
        or parsed.bindings != bindings
        or parsed.format_version != (FORMAT_V2 if v2 else FORMAT_V1)
    ):
        raise FuzzFailure("a blob parsed back to other fields than it was built from")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        check_fields(provider(data[1:]))
    else:
        check_blob(data[1:])
