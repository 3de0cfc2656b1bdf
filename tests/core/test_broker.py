"""KeyBroker use cases (generate, unwrap, rewrap) with in-memory KEKs and a pinned clock."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.core.broker import GeneratedKey, GenerateRequest, KeyBroker
from keybroker.core.decision import Decision
from keybroker.core.identity import Principal
from keybroker.core.keys import KeyInfo, KeySnapshot, VersionInfo, VersionState
from keybroker.core.ports import KeyCatalog, KeyEncryptionKeys
from keybroker.core.wrapped_key import NONCE_SIZE, KeyRef, WrappedKey
from keybroker.errors import (
    InvalidRequestError,
    InvalidWrappedKeyError,
    KeyStateStaleError,
    NotFoundError,
    PermissionDeniedError,
    RetentionExpiredError,
)

from ._vectors import AUTH_FAILURES, PARSE_FAILURES, VALID, InvalidVector, ValidVector, valid

NOW = 1_700_000_000.75
DEFAULT_RETENTION = 90 * 86400
DEFAULT_KEY = "recordings"
ALL_SCOPES = frozenset({"keys:generate", "keys:unwrap", "keys:rewrap"})


class FakeKeks:
    """In-memory key-encryption keys using cryptography's AESGCM (pure tests need no HSM).

    Behaves as the port promises: unknown versions or failed tags raise InvalidWrappedKeyError on
    decrypt; ``random`` is deterministic so tests can find its output in the results.
    """

    def __init__(self) -> None:
        self.keks: dict[KeyRef, bytes] = {}
        self.random_output: list[bytes] = []
        self.nonces: list[bytes] = []
        """The IVs this fake HSM chose itself, as a strict HSM does (never the caller's)."""
        self.decrypts = 0
        self.encrypts = 0

    def add(self, name: str, version: int, kek: bytes | None = None) -> KeyRef:
        ref = KeyRef(name, version)
        self.keks[ref] = kek or hashlib.sha256(f"fake kek {ref}".encode()).digest()
        return ref

    @property
    def hsm_calls(self) -> int:
        return len(self.random_output) + self.decrypts + self.encrypts

    def current(self, name: str) -> KeyRef:
        versions = [ref for ref in self.keks if ref.name == name]
        if not versions:
            raise NotFoundError(f"no key named {name!r}", reason="key_not_found")
        return max(versions)

    def random(self, size: int) -> bytes:
        seed = f"fake random {len(self.random_output)}".encode()
        out = hashlib.sha512(seed).digest()[:size]
        assert len(out) == size
        self.random_output.append(out)
        return out

    def encrypt(self, key: KeyRef, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        self.encrypts += 1
        if key not in self.keks:
            raise NotFoundError(reason="key_not_found")
        nonce = hashlib.sha256(f"fake hsm iv {len(self.nonces)}".encode()).digest()[:NONCE_SIZE]
        self.nonces.append(nonce)
        return nonce, AESGCM(self.keks[key]).encrypt(nonce, plaintext, aad)

    def decrypt(self, key: KeyRef, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        self.decrypts += 1
        kek = self.keks.get(key)
        if kek is None:
            raise InvalidWrappedKeyError
        try:
            return AESGCM(kek).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise InvalidWrappedKeyError from None


class FakeCatalog:
    """Key metadata derived from the fake KEKs: every version enabled, the highest current.

    ``states`` overrides a version's state; ``uses`` collects what the broker counted.
    """

    def __init__(self, keks: FakeKeks) -> None:
        self.keks = keks
        self.states: dict[KeyRef, VersionState] = {}
        self.min_version: dict[str, int] = {}
        self.uses: list[tuple[KeyRef, int, int]] = []
        self.reloads = 0

    def snapshot(self) -> KeySnapshot:
        names = {ref.name for ref in self.keks.keks}
        keys = {}
        for name in names:
            refs = sorted(r for r in self.keks.keks if r.name == name)
            versions = tuple(
                VersionInfo(r.version, self.states.get(r, VersionState.ENABLED), NOW) for r in refs
            )
            keys[name] = KeyInfo(
                name, NOW, refs[-1].version, self.min_version.get(name, 1), versions=versions
            )
        return KeySnapshot.of(1, keys)

    def fresh_snapshot(self) -> KeySnapshot:
        self.reloads += 1
        return self.snapshot()

    def count(self, key: KeyRef, *, wraps: int = 0, unwraps: int = 0) -> None:
        self.uses.append((key, wraps, unwraps))


class PinnedClock:
    """A clock that says what the test tells it to."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def principal(
    scopes: frozenset[str] = ALL_SCOPES,
    purposes: Sequence[str] = ("support", "quality", "billing"),
) -> Principal:
    return Principal(
        subject="storage-1",
        token_id="jti-1",
        expires_at=int(NOW) + 3600,
        scopes=scopes,
        purposes=frozenset(purposes),
        client_id="storage",
    )


def request(
    *,
    recording_id: str = "rec-1",
    purposes: Sequence[str] = ("support",),
    subject_ids: Sequence[str] = ("agent:1",),
    retain_until: int | None = int(NOW) + 3600,
    key_name: str = "",
    context: Mapping[str, str] | None = None,
) -> GenerateRequest:
    return GenerateRequest(
        recording_id=recording_id,
        purposes=purposes,
        subject_ids=subject_ids,
        retain_until=retain_until,
        key_name=key_name,
        context={"tenant": "acme"} if context is None else context,
    )


def decision(operation: str = "op") -> Decision:
    return Decision(service="keybroker.v1.KeyBroker", operation=operation)


class World:
    """A broker over fake KEKs (recordings/v1 exists) with a pinned clock."""

    def __init__(self) -> None:
        self.keks = FakeKeks()
        self.keks.add(DEFAULT_KEY, 1)
        self.clock = PinnedClock()
        port: KeyEncryptionKeys = self.keks  # the fake satisfies the port (checked by mypy)
        self.catalog = FakeCatalog(self.keks)
        catalog: KeyCatalog = self.catalog
        self.broker = KeyBroker(
            port,
            catalog,
            clock=self.clock,
            default_key=DEFAULT_KEY,
            default_retention_seconds=DEFAULT_RETENTION,
        )

    def generate(self, req: GenerateRequest | None = None) -> GeneratedKey:
        return self.broker.generate(principal(), req or request(), decision("generate"))

    def unwrap(
        self,
        blob: bytes,
        *,
        recording_id: str = "rec-1",
        purpose: str = "support",
        context: Mapping[str, str] | None = None,
        who: Principal | None = None,
        dec: Decision | None = None,
    ) -> bytes:
        result = self.broker.unwrap(
            who or principal(),
            recording_id=recording_id,
            wrapped_key=blob,
            purpose=purpose,
            context={"tenant": "acme"} if context is None else context,
            decision=dec or decision("unwrap"),
        )
        return result.data_key.reveal()


@pytest.fixture
def world() -> World:
    return World()


def denied(exc: pytest.ExceptionInfo[PermissionDeniedError], reason: str) -> None:
    assert exc.value.reason == reason


# -- generate ---------------------------------------------------------------------------------


def test_generate_then_unwrap_gives_the_same_data_key(world: World) -> None:
    """A generated key is 32 bytes, wrapped under recordings/v1, and unwraps to itself."""
    generated = world.generate()
    data_key = generated.data_key.reveal()
    assert len(data_key) == 32
    assert generated.key == KeyRef(DEFAULT_KEY, 1)
    assert world.unwrap(generated.wrapped_key) == data_key


def test_generate_draws_data_key_from_the_hsm_and_stores_the_iv_it_used(world: World) -> None:
    """The data key comes from the KEK port's random generator; the blob (format v2) carries
    the nonce the KEK port reports having used, which the broker cannot predict."""
    generated = world.generate()
    drawn = b"".join(world.keks.random_output)
    parsed = WrappedKey.parse(generated.wrapped_key)
    assert generated.data_key.reveal() in drawn
    assert parsed.format_version == 2
    assert parsed.nonce == world.keks.nonces[-1]
    assert parsed.nonce not in drawn
    assert len(parsed.nonce) == NONCE_SIZE


def test_generate_binds_canonical_bindings(world: World) -> None:
    """The wrapped key carries the request's bindings, sorted and de-duplicated."""
    req = request(
        purposes=["support", "quality", "support"],
        subject_ids=["customer:9", "agent:1"],
        context={"tenant": "acme", "region": "eu"},
    )
    bindings = WrappedKey.parse(world.generate(req).wrapped_key).bindings
    assert bindings.recording_id == "rec-1"
    assert bindings.purposes == ("quality", "support")
    assert bindings.subject_ids == ("agent:1", "customer:9")
    assert bindings.context == (("region", "eu"), ("tenant", "acme"))
    assert bindings.retain_until == int(NOW) + 3600


def test_generate_uses_default_key_when_key_name_empty(world: World) -> None:
    """An empty key_name means the configured default key, recorded in the decision."""
    dec = decision()
    generated = world.broker.generate(principal(), request(key_name=""), dec)
    assert generated.key.name == DEFAULT_KEY
    assert WrappedKey.parse(generated.wrapped_key).key == KeyRef(DEFAULT_KEY, 1)
    assert dec.key_name == DEFAULT_KEY


def test_generate_uses_named_key_at_its_current_version(world: World) -> None:
    """A named key is used at its highest version."""
    world.keks.add("archive", 1)
    world.keks.add("archive", 3)
    generated = world.generate(request(key_name="archive"))
    assert generated.key == KeyRef("archive", 3)
    assert WrappedKey.parse(generated.wrapped_key).key == KeyRef("archive", 3)


def test_generate_unknown_key_is_not_found(world: World) -> None:
    """A key name without versions is NotFoundError."""
    with pytest.raises(NotFoundError):
        world.generate(request(key_name="nope"))


def test_generate_invalid_key_name_is_refused(world: World) -> None:
    """A malformed key name is an invalid request, refused before any HSM call."""
    with pytest.raises(InvalidRequestError) as info:
        world.generate(request(key_name="Bad Name"))
    assert info.value.reason == "bad_key_name"
    assert world.keks.hsm_calls == 0


def test_default_retention_applied_when_retain_until_missing(world: World) -> None:
    """retain_until None means now (whole seconds) + the default retention."""
    generated = world.generate(request(retain_until=None))
    retain_until = WrappedKey.parse(generated.wrapped_key).bindings.retain_until
    assert retain_until == int(NOW) + DEFAULT_RETENTION


@pytest.mark.parametrize("retain_until", [int(NOW) - 86400, int(NOW) - 1, 1])
def test_retain_until_in_the_past_is_refused(world: World, retain_until: int) -> None:
    """A retention date in the past is an invalid request, refused before any HSM call."""
    with pytest.raises(InvalidRequestError) as info:
        world.generate(request(retain_until=retain_until))
    assert info.value.reason == "bad_retain_until"
    assert world.keks.hsm_calls == 0


def test_retain_until_now_is_refused_and_one_second_later_accepted(world: World) -> None:
    """retain_until must lie strictly in the future."""
    world.clock.now = 1_700_000_000.0
    with pytest.raises(InvalidRequestError):
        world.generate(request(retain_until=1_700_000_000))
    world.generate(request(retain_until=1_700_000_001))


def test_generate_requires_scope(world: World) -> None:
    """Without keys:generate the call is denied before the HSM is used."""
    who = principal(scopes=frozenset({"keys:unwrap", "keys:rewrap"}))
    with pytest.raises(PermissionDeniedError) as info:
        world.broker.generate(who, request(), decision())
    denied(info, "scope_missing")
    assert world.keks.hsm_calls == 0


def test_generate_requires_every_purpose_granted(world: World) -> None:
    """Each requested purpose must be granted by the token, checked before the HSM is used."""
    who = principal(purposes=["support"])
    with pytest.raises(PermissionDeniedError) as info:
        world.broker.generate(who, request(purposes=["support", "billing"]), decision())
    denied(info, "purpose_not_granted")
    assert world.keks.hsm_calls == 0


def test_generate_validates_bindings(world: World) -> None:
    """Out-of-bounds bindings are an invalid request."""
    with pytest.raises(InvalidRequestError) as info:
        world.generate(request(purposes=[]))
    assert info.value.reason == "bad_purposes"


def test_generate_annotates_decision(world: World) -> None:
    """The decision records recording id, purposes, key name and version."""
    world.keks.add(DEFAULT_KEY, 2)
    dec = decision()
    world.broker.generate(principal(), request(purposes=["support", "quality"]), dec)
    assert dec.recording_id == "rec-1"
    assert set(dec.purposes) == {"support", "quality"}
    assert (dec.key_name, dec.key_version) == (DEFAULT_KEY, 2)


def test_generate_annotates_decision_when_denied(world: World) -> None:
    """A denied generate still records what was asked for."""
    dec = decision()
    with pytest.raises(PermissionDeniedError):
        world.broker.generate(principal(purposes=[]), request(recording_id="rec-9"), dec)
    assert dec.recording_id == "rec-9"
    assert dec.purposes == ("support",)


def test_generated_results_hide_the_data_key(world: World) -> None:
    """repr of GeneratedKey, UnwrappedKey and RewrappedKey never shows the data key."""
    generated = world.generate()
    secret = generated.data_key.reveal()
    unwrapped = world.broker.unwrap(
        principal(),
        recording_id="rec-1",
        wrapped_key=generated.wrapped_key,
        purpose="support",
        context={"tenant": "acme"},
        decision=decision(),
    )
    rewrapped = world.broker.rewrap(
        principal(), recording_id="rec-1", wrapped_key=generated.wrapped_key, decision=decision()
    )
    for obj in (generated, unwrapped, rewrapped, generated.data_key, unwrapped.data_key):
        for text in (repr(obj), str(obj)):
            assert secret.hex() not in text
            assert repr(secret) not in text
            assert generated.wrapped_key.hex()[-96:] not in text


# -- unwrap -----------------------------------------------------------------------------------


def test_unwrap_requires_scope(world: World) -> None:
    """Without keys:unwrap the call is denied before the HSM is used."""
    blob = world.generate().wrapped_key
    before = world.keks.decrypts
    with pytest.raises(PermissionDeniedError) as info:
        world.unwrap(blob, who=principal(scopes=frozenset({"keys:generate"})))
    denied(info, "scope_missing")
    assert world.keks.decrypts == before


def test_unwrap_requires_purpose(world: World) -> None:
    """An empty purpose is an invalid request."""
    blob = world.generate().wrapped_key
    with pytest.raises(InvalidRequestError) as info:
        world.unwrap(blob, purpose="")
    assert info.value.reason == "bad_purposes"


def test_unwrap_purpose_must_be_granted(world: World) -> None:
    """A purpose bound to the key but not granted by the token is denied."""
    blob = world.generate(request(purposes=["support", "billing"])).wrapped_key
    with pytest.raises(PermissionDeniedError) as info:
        world.unwrap(blob, purpose="billing", who=principal(purposes=["support"]))
    denied(info, "purpose_not_granted")


def test_unwrap_purpose_must_be_bound(world: World) -> None:
    """A purpose granted by the token but not bound to the key is denied."""
    blob = world.generate(request(purposes=["support"])).wrapped_key
    with pytest.raises(PermissionDeniedError) as info:
        world.unwrap(blob, purpose="quality")
    denied(info, "purpose_not_bound")


def test_unwrap_recording_must_match(world: World) -> None:
    """A wrapped key presented for another recording is denied."""
    blob = world.generate().wrapped_key
    with pytest.raises(PermissionDeniedError) as info:
        world.unwrap(blob, recording_id="rec-2")
    denied(info, "recording_mismatch")


@pytest.mark.parametrize(
    "context",
    [{}, {"tenant": "other"}, {"tenant": "acme", "region": "eu"}, {"Tenant": "acme"}],
    ids=["missing", "other_value", "extra_key", "key_case"],
)
def test_unwrap_context_must_match_exactly(world: World, context: dict[str, str]) -> None:
    """The context must equal the bound context: no key missing, extra or different."""
    blob = world.generate().wrapped_key
    with pytest.raises(PermissionDeniedError) as info:
        world.unwrap(blob, context=context)
    denied(info, "context_mismatch")


def test_unwrap_context_order_does_not_matter(world: World) -> None:
    """The same context in another order matches."""
    blob = world.generate(request(context={"a": "1", "b": "2"})).wrapped_key
    world.unwrap(blob, context={"b": "2", "a": "1"})


def test_unwrap_after_retention_is_refused(world: World) -> None:
    """After retain_until the data key is refused with RetentionExpiredError."""
    blob = world.generate(request(retain_until=int(NOW) + 100)).wrapped_key
    world.clock.now = NOW + 100.5
    with pytest.raises(RetentionExpiredError) as info:
        world.unwrap(blob)
    assert info.value.reason == "retention_expired"


def test_unwrap_at_retain_until_is_still_allowed(world: World) -> None:
    """retain_until itself is the last allowed second."""
    retain_until = int(NOW) + 100
    blob = world.generate(request(retain_until=retain_until)).wrapped_key
    world.clock.now = float(retain_until)
    world.unwrap(blob)


def test_unwrap_annotates_decision(world: World) -> None:
    """The decision records recording id, the purpose, key name and version."""
    blob = world.generate().wrapped_key
    dec = decision()
    world.unwrap(blob, dec=dec)
    assert dec.recording_id == "rec-1"
    assert dec.purposes == ("support",)
    assert (dec.key_name, dec.key_version) == (DEFAULT_KEY, 1)


def test_unwrap_annotates_decision_when_denied(world: World) -> None:
    """A denied unwrap still records which key and recording were involved."""
    blob = world.generate().wrapped_key
    dec = decision()
    with pytest.raises(PermissionDeniedError):
        world.unwrap(blob, purpose="quality", dec=dec)
    assert dec.recording_id == "rec-1"
    assert dec.purposes == ("quality",)
    assert (dec.key_name, dec.key_version) == (DEFAULT_KEY, 1)


def test_unwrap_tampered_blob_is_invalid_wrapped_key(world: World) -> None:
    """A changed tag gives the uniform InvalidWrappedKeyError."""
    blob = bytearray(world.generate().wrapped_key)
    blob[-1] ^= 1
    with pytest.raises(InvalidWrappedKeyError) as info:
        world.unwrap(bytes(blob))
    assert str(info.value) == "wrapped key is invalid"


def test_unwrap_tampered_blob_fails_as_invalid_not_as_a_policy_denial(world: World) -> None:
    """A forged blob is refused as invalid even when its bindings would also be denied.

    The bindings are only trusted once GCM has authenticated them, so the answer to a forgery
    never depends on which clear-text byte was changed.
    """
    blob = bytearray(world.generate().wrapped_key)
    blob[-1] ^= 1
    with pytest.raises(InvalidWrappedKeyError):
        world.unwrap(bytes(blob), recording_id="rec-2", purpose="quality", context={})


def test_unwrap_unknown_key_version_is_invalid_wrapped_key(world: World) -> None:
    """A blob naming a KEK version the store does not have is an invalid wrapped key."""
    other = World()
    other.keks.add(DEFAULT_KEY, 5)
    blob = other.generate().wrapped_key
    with pytest.raises(InvalidWrappedKeyError):
        world.unwrap(blob)


def test_an_unknown_version_is_judged_on_a_fresh_reload_only(world: World) -> None:
    """Unknown to the snapshot: the catalog reloads once before the verdict (issue 14 item 11);
    a known version never costs a reload (the hot path stays a dict lookup)."""
    other = World()
    other.keks.add(DEFAULT_KEY, 5)
    with pytest.raises(InvalidWrappedKeyError):
        world.unwrap(other.generate().wrapped_key)
    assert world.catalog.reloads == 1
    world.unwrap(world.generate().wrapped_key)
    assert world.catalog.reloads == 1


def test_a_version_missing_from_the_hsm_is_retryable_not_invalid(world: World) -> None:
    """The catalog lists the version but the HSM has no object: KeyStateStaleError after one
    reload, never InvalidWrappedKeyError."""
    blob = world.generate().wrapped_key

    def missing(key: KeyRef, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        raise KeyStateStaleError

    world.keks.decrypt = missing  # type: ignore[method-assign]
    with pytest.raises(KeyStateStaleError):
        world.unwrap(blob)
    assert world.catalog.reloads == 1


# -- vectors through the broker ---------------------------------------------------------------


def vector_world(clock: float = 1.0) -> World:
    """A world whose KEKs are the vectors' test KEKs."""
    w = World()
    w.keks.keks.clear()
    for v in VALID:
        w.keks.add(v.key.name, v.key.version, v.kek)
    w.clock.now = clock
    return w


@pytest.mark.parametrize("vector", VALID, ids=[v.id for v in VALID])
def test_unwrap_vector_gives_its_data_key(vector: ValidVector) -> None:
    """Each known-answer vector unwraps through the broker to the vector's data key."""
    w = vector_world()
    who = principal(purposes=vector.purposes)
    assert (
        w.unwrap(
            vector.blob,
            recording_id=vector.recording_id,
            purpose=vector.purposes[0],
            context=vector.context,
            who=who,
        )
        == vector.data_key
    )


@pytest.mark.parametrize("vector", AUTH_FAILURES, ids=[v.id for v in AUTH_FAILURES])
def test_unwrap_authenticate_failure_vector_is_invalid(vector: InvalidVector) -> None:
    """Blobs that parse but fail GCM end in InvalidWrappedKeyError through the broker."""
    base = valid(vector.kek_of)
    w = vector_world(clock=NOW)
    with pytest.raises(InvalidWrappedKeyError):
        w.unwrap(
            vector.blob,
            recording_id=base.recording_id,
            purpose="support",
            context=base.context,
            who=principal(purposes=base.purposes),
        )


@pytest.mark.parametrize("vector", PARSE_FAILURES, ids=[v.id for v in PARSE_FAILURES])
def test_unwrap_parse_failure_vector_never_reaches_the_hsm(vector: InvalidVector) -> None:
    """Blobs the parser must refuse end in InvalidWrappedKeyError with no HSM decrypt.

    Many carry a valid GCM tag over their bad header, so only the parser can stop them.
    """
    base = valid(vector.kek_of)
    w = vector_world(clock=NOW)
    with pytest.raises(InvalidWrappedKeyError):
        w.unwrap(
            vector.blob,
            recording_id=base.recording_id,
            purpose="support",
            context=base.context,
            who=principal(purposes=base.purposes),
        )
    assert w.keks.decrypts == 0


# -- rewrap -----------------------------------------------------------------------------------


def test_rewrap_moves_to_current_version_and_keeps_bindings(world: World) -> None:
    """Rewrap re-encrypts the same data key under the current version with a fresh nonce."""
    generated = world.generate(
        request(purposes=["support", "quality"], subject_ids=["a", "b"], context={"x": "1"})
    )
    world.keks.add(DEFAULT_KEY, 2)
    dec = decision()
    rewrapped = world.broker.rewrap(
        principal(), recording_id="rec-1", wrapped_key=generated.wrapped_key, decision=dec
    )
    old = WrappedKey.parse(generated.wrapped_key)
    new = WrappedKey.parse(rewrapped.wrapped_key)
    assert rewrapped.key == new.key == KeyRef(DEFAULT_KEY, 2)
    assert new.bindings == old.bindings
    assert new.nonce != old.nonce
    assert world.unwrap(rewrapped.wrapped_key, context={"x": "1"}) == generated.data_key.reveal()
    assert world.unwrap(generated.wrapped_key, context={"x": "1"}) == generated.data_key.reveal()
    assert dec.recording_id == "rec-1"
    assert (dec.key_name, dec.key_version) == (DEFAULT_KEY, 2)


def test_rewrap_at_current_version_still_uses_a_fresh_nonce(world: World) -> None:
    """Rewrap under the same version never reuses the old nonce."""
    generated = world.generate()
    rewrapped = world.broker.rewrap(
        principal(), recording_id="rec-1", wrapped_key=generated.wrapped_key, decision=decision()
    )
    assert rewrapped.key == KeyRef(DEFAULT_KEY, 1)
    old = WrappedKey.parse(generated.wrapped_key)
    new = WrappedKey.parse(rewrapped.wrapped_key)
    assert new.nonce != old.nonce
    assert new.ciphertext != old.ciphertext


def test_rewrap_requires_scope(world: World) -> None:
    """Without keys:rewrap the call is denied before the HSM is used."""
    blob = world.generate().wrapped_key
    calls = world.keks.hsm_calls
    with pytest.raises(PermissionDeniedError) as info:
        world.broker.rewrap(
            principal(scopes=frozenset({"keys:unwrap"})),
            recording_id="rec-1",
            wrapped_key=blob,
            decision=decision(),
        )
    denied(info, "scope_missing")
    assert world.keks.hsm_calls == calls


def test_rewrap_recording_must_match(world: World) -> None:
    """Rewrap for another recording id is denied."""
    blob = world.generate().wrapped_key
    with pytest.raises(PermissionDeniedError) as info:
        world.broker.rewrap(
            principal(), recording_id="rec-2", wrapped_key=blob, decision=decision()
        )
    denied(info, "recording_mismatch")


def test_rewrap_after_retention_is_refused(world: World) -> None:
    """An expired key cannot be rewrapped (which would otherwise outlive its retention)."""
    blob = world.generate(request(retain_until=int(NOW) + 10)).wrapped_key
    world.clock.now = NOW + 11
    with pytest.raises(RetentionExpiredError):
        world.broker.rewrap(
            principal(), recording_id="rec-1", wrapped_key=blob, decision=decision()
        )


def test_rewrap_tampered_blob_is_invalid(world: World) -> None:
    """Rewrap authenticates the blob: a changed byte is InvalidWrappedKeyError."""
    blob = bytearray(world.generate().wrapped_key)
    blob[-20] ^= 0x40
    with pytest.raises(InvalidWrappedKeyError):
        world.broker.rewrap(
            principal(), recording_id="rec-1", wrapped_key=bytes(blob), decision=decision()
        )


def test_broker_refuses_invalid_default_key() -> None:
    """The default key name is validated when the broker is built."""
    with pytest.raises(InvalidRequestError):
        KeyBroker(
            FakeKeks(),
            FakeCatalog(FakeKeks()),
            clock=PinnedClock(),
            default_key="Not Valid",
            default_retention_seconds=DEFAULT_RETENTION,
        )
