"""Typed access to tests/vectors/wrapped_key_v1.json and wrapped_key_v2.json (the wrapped-key
known-answer vectors)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keybroker.core.wrapped_key import Bindings, KeyRef

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors"
VECTOR_FILE = VECTOR_DIR / "wrapped_key_v1.json"
GENERATOR = VECTOR_DIR / "generate_wrapped_key_v1.py"
VECTOR_FILE_V2 = VECTOR_DIR / "wrapped_key_v2.json"
GENERATOR_V2 = VECTOR_DIR / "generate_wrapped_key_v2.py"
CIPHERTEXT_SIZE = 48


def utf8_sorted(values: list[str]) -> tuple[str, ...]:
    """Canonical order written out independently: sorted by UTF-8 bytes, de-duplicated."""
    return tuple(sorted(set(values), key=lambda v: v.encode("utf-8")))


@dataclass(frozen=True)
class ValidVector:
    """One known-answer vector: every input and the exact blob it must produce."""

    id: str
    kek: bytes
    key: KeyRef
    nonce: bytes
    recording_id: str
    retain_until: int
    purposes: list[str]
    """In request order, possibly with duplicates."""
    subject_ids: list[str]
    context: dict[str, str]
    data_key: bytes
    aad_length: int
    ciphertext: bytes
    blob: bytes

    @property
    def aad(self) -> bytes:
        return self.blob[: self.aad_length]

    def bindings(self) -> Bindings:
        """The vector's bindings built by keybroker's own encoder from the request values."""
        return Bindings.create(
            recording_id=self.recording_id,
            purposes=self.purposes,
            subject_ids=self.subject_ids,
            retain_until=self.retain_until,
            context=self.context,
        )

    def expected_bindings(self) -> Bindings:
        """The canonical bindings, computed without keybroker's canonicalisation."""
        keys = utf8_sorted(list(self.context))
        return Bindings(
            recording_id=self.recording_id,
            purposes=utf8_sorted(self.purposes),
            subject_ids=utf8_sorted(self.subject_ids),
            retain_until=self.retain_until,
            context=tuple((k, self.context[k]) for k in keys),
        )


@dataclass(frozen=True)
class InvalidVector:
    """A blob that must be refused, by the parser (stage "parse") or by GCM ("authenticate")."""

    id: str
    description: str
    stage: str
    kek_of: str
    blob: bytes


def _valid(raw: dict[str, Any]) -> ValidVector:
    b = raw["bindings"]
    return ValidVector(
        id=raw["id"],
        kek=bytes.fromhex(raw["kek"]),
        key=KeyRef(raw["key_name"], raw["key_version"]),
        nonce=bytes.fromhex(raw["nonce"]),
        recording_id=b["recording_id"],
        retain_until=b["retain_until"],
        purposes=list(b["purposes"]),
        subject_ids=list(b["subject_ids"]),
        context=dict(b["context"]),
        data_key=bytes.fromhex(raw["data_key"]),
        aad_length=raw["aad_length"],
        ciphertext=bytes.fromhex(raw["ciphertext"]),
        blob=bytes.fromhex(raw["blob"]),
    )


def _invalid(raw: dict[str, Any]) -> InvalidVector:
    return InvalidVector(
        id=raw["id"],
        description=raw["description"],
        stage=raw["stage"],
        kek_of=raw["kek_of"],
        blob=bytes.fromhex(raw["blob"]),
    )


def load(path: Path) -> tuple[list[ValidVector], list[InvalidVector]]:
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return [_valid(v) for v in raw["valid"]], [_invalid(v) for v in raw["invalid"]]


VALID, INVALID = load(VECTOR_FILE)
PARSE_FAILURES = [v for v in INVALID if v.stage == "parse"]
AUTH_FAILURES = [v for v in INVALID if v.stage == "authenticate"]


def valid(vector_id: str) -> ValidVector:
    return next(v for v in VALID if v.id == vector_id)
