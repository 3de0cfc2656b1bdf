"""Regression tests for the fixes in how wrapped keys are made, parsed and authenticated (see
tests/security/README.md for how each test names the CHANGELOG entry it guards)."""

from __future__ import annotations

import time
from functools import partial

import grpc
import pytest

from keybroker.client.recording import RecordingHeader
from keybroker.core.wrapped_key import CIPHERTEXT_SIZE, NONCE_SIZE, Bindings, KeyRef, WrappedKey
from keybroker.devenv import DevEnv
from keybroker.errors import InvalidRequestError, InvalidWrappedKeyError
from keybroker.v1 import keybroker_pb2 as pb
from tests.security.conftest import Start
from tests.security.support import Caller, new_id, refused
from tests.support.clients import auth, generate_request


def _rebound(blob: bytes, **changes: object) -> bytes:
    """``blob`` (format v2) with other bindings but its own nonce and ciphertext: what a caller
    who edits the clear-text bindings sends."""
    parsed = WrappedKey.parse(blob)
    fields = {
        "recording_id": parsed.bindings.recording_id,
        "purposes": parsed.bindings.purposes,
        "subject_ids": parsed.bindings.subject_ids,
        "retain_until": parsed.bindings.retain_until,
        "context": parsed.bindings.context_map,
        **changes,
    }
    bindings = Bindings.create(**fields)  # type: ignore[arg-type]
    return WrappedKey.join_v2(
        WrappedKey.aad_v2(parsed.key, bindings), parsed.nonce, parsed.ciphertext
    )


def test_a_blob_is_authenticated_before_its_bindings_are_trusted(
    devenv: DevEnv, start: Start
) -> None:
    """Unreleased, Security: "A wrapped key is authenticated in the HSM before any of its bindings
    is trusted".

    Edited bindings that would each fail a different policy check if they were believed (a
    retention date in the past, a recording id or purpose of the caller's choosing) and a
    flipped tag all get one and the same INVALID_ARGUMENT answer: no oracle on the bindings."""
    caller = Caller(devenv, start().port)
    try:
        rec = new_id()
        blob = caller.generate(rec, purposes=("support",)).wrapped_key
        other = new_id()
        forged = {
            "expired": (rec, "support", _rebound(blob, retain_until=int(time.time()) - 3600)),
            "recording": (other, "support", _rebound(blob, recording_id=other)),
            "purpose": (rec, "qa", _rebound(blob, purposes=("qa",))),
            "tag": (rec, "support", blob[:-1] + bytes([blob[-1] ^ 1])),
        }
        token = caller.token(["keys:unwrap"], ("support", "qa"))
        answers = {
            name: refused(partial(caller.unwrap, r, b, p, token=token))
            for name, (r, p, b) in forged.items()
        }
        assert set(answers.values()) == {
            (grpc.StatusCode.INVALID_ARGUMENT, "wrapped key is invalid", "wrapped_key_invalid")
        }, answers
        assert len(caller.unwrap(rec, blob, "support", token=token).data_key) == 32
    finally:
        caller.close()


def test_wrapped_keys_from_an_hsm_that_chooses_the_gcm_iv_can_be_unwrapped(
    devenv: DevEnv, start: Start, strict_settings: dict[str, str]
) -> None:
    """Unreleased, Security: "On an HSM that chooses the GCM IV (CloudHSM, Luna FIPS),
    GenerateDataKey handed out wrapped keys that could never be unwrapped".

    On the strict test module (it writes an IV of its own into every encryption), the probe sees
    it, the blob carries the IV the module used, and the data key comes back on unwrap."""
    broker = start("strict", **strict_settings)
    assert broker.keks.capabilities is not None
    assert broker.keks.capabilities.iv_behaviour == "overwrites"
    caller = Caller(devenv, broker.port)
    try:
        for _ in range(3):
            rec = new_id()
            token = caller.token(["keys:generate", "keys:unwrap"])
            made = caller.kb.GenerateDataKey(generate_request(rec), metadata=auth(token))
            request = pb.UnwrapDataKeyRequest(
                recording_id=rec, wrapped_key=made.wrapped_key, purpose="support"
            )
            back = caller.kb.UnwrapDataKey(request, metadata=auth(token))
            assert back.data_key == made.data_key
    finally:
        caller.close()


def test_the_parser_refuses_non_canonical_bindings_and_c1_controls() -> None:
    """Unreleased, Fixed: "The wrapped-key parser refuses non-canonical bindings and repeated
    context keys; C1 control characters are refused in identifiers; a recording header refuses a
    salt or nonce prefix of the wrong length".

    Blobs whose bindings are unsorted or repeat a context key parse nowhere (one blob, one
    meaning); an identifier with a C1 control (U+0085) is refused; a header with a short salt or
    nonce prefix is never written."""
    key, nonce, sealed = KeyRef("recordings", 1), b"\x01" * NONCE_SIZE, b"\x02" * CIPHERTEXT_SIZE
    when = int(time.time()) + 3600

    def blob(**fields: object) -> bytes:
        base: dict[str, object] = {
            "recording_id": "rec-1",
            "purposes": ("qa", "support"),
            "subject_ids": (),
            "retain_until": when,
            "context": (),
        }
        bindings = Bindings(**{**base, **fields})  # type: ignore[arg-type]
        return WrappedKey.join_v2(WrappedKey.aad_v2(key, bindings), nonce, sealed)

    assert WrappedKey.parse(blob()).bindings.purposes == ("qa", "support")  # the canonical one
    for fields in (
        {"purposes": ("support", "qa")},
        {"purposes": ("qa", "qa", "support")},
        {"subject_ids": ("s-2", "s-1")},
        {"context": (("room", "a"), ("room", "b"))},
    ):
        with pytest.raises(InvalidWrappedKeyError):
            WrappedKey.parse(blob(**fields))
    c1 = blob().replace(b"rec-1", "re\x85x".encode())  # same length in UTF-8
    with pytest.raises(InvalidWrappedKeyError):
        WrappedKey.parse(c1)
    for identifier in ({"recording_id": "rec\x85x"}, {"subject_ids": ["s\x9b1"]}):
        with pytest.raises(InvalidRequestError):
            Bindings.create(
                **{  # type: ignore[arg-type]
                    "recording_id": "rec-1",
                    "purposes": ["support"],
                    "subject_ids": [],
                    "retain_until": when,
                    "context": {},
                    **identifier,
                }
            )
    for salt, prefix in ((b"s" * 31, b"p" * 7), (b"s" * 32, b"p" * 6)):
        with pytest.raises(ValueError, match="salt"):
            RecordingHeader(1 << 16, salt, prefix, "rec-1", b"w" * 80).encode()
