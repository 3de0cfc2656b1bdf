"""KEK objects and GCM IVs on SoftHSM2 and on the strict-HSM test module: the module probe, IVs
read back from the module, no dependency on C_CopyObject, strict attributes on new KEKs, planted
objects never used, and the wrap -> unwrap self-test.

Each case runs in a child process (PKCS#11 login and module state are per process) on a token of
this module's own; the strict module forwards to SoftHSM and shares that token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.devenv import TOKEN_LABEL, DevEnv, provision_hsm, softhsm_module
from tests.support.strict_pkcs11 import StrictModule

CHILD = textwrap.dedent(
    """
    import json, sys, logging
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.exceptions import PKCS11Error
    from keybroker.adapters.hsm import HsmConfig, Pkcs11Keks
    from keybroker.core.wrapped_key import KeyRef
    from keybroker.errors import KeybrokerError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    job = json.load(sys.stdin)
    out = {}

    def attempt(call):
        try:
            result = call()
        except KeybrokerError as exc:
            return {"error": type(exc).__name__, "reason": exc.reason}
        except PKCS11Error as exc:
            return {"error": type(exc).__name__}
        if isinstance(result, tuple):
            return {"ok": [part.hex() for part in result]}
        return {"ok": result.hex() if isinstance(result, bytes) else result}

    keks = Pkcs11Keks(HsmConfig(job["module"], job["token_label"], job["pin"], job["iv_source"]))
    try:
        keks.connect()
    except KeybrokerError as exc:
        print(json.dumps({"connect": {"error": type(exc).__name__, "message": str(exc)}}))
        sys.exit(0)
    caps = keks.capabilities
    out["caps"] = [caps.iv_behaviour, caps.iv_source, caps.session_copies]
    raw = pkcs11.lib(job["module"]).get_token(token_label=job["token_label"]).open(rw=True)
    aad = b"test aad"
    case = job["case"]

    if case == "wraps":
        ref = KeyRef("wraps", 1)
        keks.create_version(ref)
        out["wraps"] = []
        for _ in range(150):  # IVs come from a reserve drawn 64 at a time: past two refills
            nonce, sealed = keks.encrypt(ref, b"k" * 32, aad)
            back = keks.decrypt(ref, nonce, sealed, aad)
            out["wraps"].append([nonce.hex(), back == b"k" * 32])

    elif case == "attributes":
        ref = KeyRef("attrs", 1)
        keks.create_version(ref)
        obj = raw.get_key(label="kek:attrs:v1", object_class=ObjectClass.SECRET_KEY)
        wanted = [
            Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
            Attribute.MODIFIABLE, Attribute.WRAP, Attribute.UNWRAP, Attribute.DERIVE,
            Attribute.SIGN, Attribute.LOCAL, Attribute.NEVER_EXTRACTABLE,
            Attribute.ALWAYS_SENSITIVE, Attribute.VALUE_LEN,
        ]
        out["attributes"] = {a.name: obj[a] for a in wanted}
        out["allowed"] = [m.name for m in obj[Attribute.ALLOWED_MECHANISMS]]
        out["cbc"] = attempt(lambda: obj.encrypt(
            b"x" * 16, mechanism=Mechanism.AES_CBC, mechanism_param=b"\\x00" * 16
        ))
        out["relabel"] = attempt(lambda: obj.__setitem__(Attribute.LABEL, "kek:attrs:v9"))

    elif case == "planted":
        known = bytes.fromhex(job["known"])
        keks.create_version(KeyRef("planted", 1))
        for label in ("kek:planted:v1", "kek:planted:v2", "kek:recordingz:v1"):
            raw.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: known, Attribute.LABEL: label, Attribute.TOKEN: True,
                Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
            })
        fresh = Pkcs11Keks(HsmConfig(job["module"], job["token_label"], job["pin"], job["iv_source"]))
        fresh.connect()
        out["on_token"] = sorted(str(r) for r in fresh.versions_on_token())
        out["current"] = str(fresh.current("planted"))
        out["current_recordingz"] = attempt(lambda: str(fresh.current("recordingz")))
        out["v1"] = attempt(lambda: fresh.encrypt(KeyRef("planted", 1), b"d" * 32, aad))
        out["v2"] = attempt(lambda: fresh.encrypt(KeyRef("planted", 2), b"d" * 32, aad))
        forged = bytes.fromhex(job["forged"])
        out["forged_v2"] = attempt(lambda: fresh.decrypt(KeyRef("planted", 2), forged[:12], forged[12:], aad))
        out["rejected"] = fresh.rejected_objects()

    elif case == "self_test":
        ref = KeyRef(job["key"], 1)
        out["self_test"] = keks.self_test(ref)
        out["passed"] = keks.self_tests_passed
        out["encrypt"] = attempt(lambda: keks.encrypt(ref, b"d" * 32, aad))

    elif case == "forget":
        ref = KeyRef("forgotten", 1)
        keks.create_version(ref)
        keks.encrypt(ref, b"d" * 32, aad)  # caches the handle (the token object: no copy)
        keks.forget(ref)
        out["on_token"] = "forgotten/v1" in {str(r) for r in keks.versions_on_token()}
        out["encrypt"] = attempt(lambda: keks.encrypt(ref, b"d" * 32, aad))

    elif case == "list":
        out["on_token"] = sorted(str(r) for r in keks.versions_on_token())

    elif case == "create":
        out["create"] = attempt(lambda: keks.create_version(KeyRef(job["key"], 1)))

    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> DevEnv:
    """A fresh SoftHSM token for this module."""
    env = DevEnv(tmp_path_factory.mktemp("kek-objects"))
    provision_hsm(env)
    return env


def run(
    token: DevEnv,
    case: str,
    *,
    strict: StrictModule | None = None,
    iv: str = "generate",
    copy: str = "refuse",
    iv_source: str = "auto",
    **job: Any,
) -> dict[str, Any]:
    env = {**os.environ, "SOFTHSM2_CONF": str(token.softhsm_conf.resolve())}
    module = softhsm_module()
    if strict is not None:
        env.update(strict.environ(iv=iv, copy=copy))
        module = str(strict.library)
    job = {
        "module": module,
        "token_label": TOKEN_LABEL,
        "pin": token.pin_file.read_text().strip(),
        "iv_source": iv_source,
        "case": case,
        **job,
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["log"] = done.stderr
    return result


MODULES = [
    # (id, strict iv mode or None for SoftHSM itself, expected probe result)
    ("softhsm", None, ["keeps", "caller", True]),
    ("strict-generate", "generate", ["overwrites", "hsm", False]),
    ("strict-refuse", "refuse", ["refuses", "hsm", False]),
    ("strict-keep", "keep", ["keeps", "caller", False]),
]


@pytest.mark.parametrize(("iv", "expected"), [m[1:] for m in MODULES], ids=[m[0] for m in MODULES])
def test_probe_finds_how_the_module_treats_ivs_and_copies(
    token: DevEnv, strict_module: StrictModule, iv: str | None, expected: list[Any]
) -> None:
    """Keeps / overwrites / refuses a caller IV, and C_CopyObject support, are found at start."""
    strict = None if iv is None else strict_module
    out = run(token, "wraps", strict=strict, iv=iv or "generate")
    assert out["caps"] == expected
    assert f"hsm module: GCM IV {expected[0]}" in out["log"]


@pytest.mark.parametrize(("iv", "expected"), [m[1:] for m in MODULES], ids=[m[0] for m in MODULES])
def test_wraps_carry_the_iv_the_module_used(
    token: DevEnv, strict_module: StrictModule, iv: str | None, expected: list[Any]
) -> None:
    """Every wrap returns the IV the module actually used (fresh each time, also across refills
    of the adapter's IV reserve), and unwraps with it; without C_CopyObject the token object is
    used directly."""
    strict = None if iv is None else strict_module
    out = run(token, "wraps", strict=strict, iv=iv or "generate")
    nonces = [w[0] for w in out["wraps"]]
    assert all(ok for _, ok in out["wraps"])
    assert len(set(nonces)) == len(nonces) == 150
    assert "00" * 12 not in nonces
    if strict is not None and not expected[2]:
        assert "C_CopyObject: FunctionNotSupported" in out["log"]  # the probe, once
        assert "C_CopyObject refused" not in out["log"]  # never tried again by a wrap


@pytest.mark.parametrize("strict", [False, True], ids=["softhsm", "strict"])
def test_new_kek_attributes_are_strict(
    token: DevEnv, strict_module: StrictModule, strict: bool
) -> None:
    """A new KEK is a private, sensitive, non-extractable, non-modifiable AES-256 token object,
    usable only for AES-GCM: AES-CBC with it and relabelling it are refused."""
    out = run(token, "attributes", strict=strict_module if strict else None, iv="keep")
    assert out["attributes"] == {
        "TOKEN": True,
        "PRIVATE": True,
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "MODIFIABLE": False,
        "WRAP": False,
        "UNWRAP": False,
        "DERIVE": False,
        "SIGN": False,
        "LOCAL": True,
        "NEVER_EXTRACTABLE": True,
        "ALWAYS_SENSITIVE": True,
        "VALUE_LEN": 32,
    }
    assert out["allowed"] == ["AES_GCM"]
    assert "error" in out["cbc"]
    assert "error" in out["relabel"]


@pytest.mark.parametrize("strict", [False, True], ids=["softhsm", "strict"])
def test_planted_kek_is_never_used(
    token: DevEnv, strict_module: StrictModule, strict: bool
) -> None:
    """Objects made with C_CreateObject from a known value under kek: labels (a new version, a
    duplicate of a real version, a new key name) are reported and never used: the real v1 stays
    current and is the one that encrypts; v2 is unknown; a blob forged with the known value is
    refused like any bad blob."""
    known = bytes(range(32))
    forged_nonce = b"\x07" * 12
    forged = forged_nonce + AESGCM(known).encrypt(forged_nonce, b"f" * 32, b"test aad")
    out = run(
        token,
        "planted",
        strict=strict_module if strict else None,
        known=known.hex(),
        forged=forged.hex(),
    )
    assert "planted/v2" not in out["on_token"]
    assert "recordingz/v1" not in out["on_token"]
    assert out["current"] == "planted/v1"
    assert out["current_recordingz"]["error"] == "NotFoundError"
    nonce, sealed = (bytes.fromhex(part) for part in out["v1"]["ok"])
    with pytest.raises(InvalidTag):  # not the planted duplicate of v1
        AESGCM(known).decrypt(nonce, sealed, b"test aad")
    assert out["v2"] == {"error": "NotFoundError", "reason": "key_not_found"}
    # The adapter has no usable object for planted/v2: it answers "state not confirmed" (the
    # broker then reloads its catalog, which never lists a rejected object, and calls the blob
    # invalid: tests/server/test_fresh_keys.py); never a decrypt under the planted key.
    assert out["forged_v2"]["error"] == "KeyStateStaleError"
    for label in ("kek:planted:v1", "kek:planted:v2", "kek:recordingz:v1"):
        assert "CKA_LOCAL" in out["rejected"][label]
        assert "CKA_NEVER_EXTRACTABLE" in out["rejected"][label]
        assert f"object '{label}' on the token is not used" in out["log"]


def test_module_that_hides_its_iv_is_refused_at_start(
    token: DevEnv, strict_module: StrictModule
) -> None:
    """A module that ignores the caller's IV and reports none would make unrecoverable wrapped
    keys: the probe refuses it with a configuration error."""
    out = run(token, "wraps", strict=strict_module, iv="ignore")
    assert out["connect"]["error"] == "ConfigurationError"
    assert "ignores the caller's GCM IV" in out["connect"]["message"]


def test_self_test_fails_and_version_is_not_used(
    token: DevEnv, strict_module: StrictModule
) -> None:
    """With the probe overridden (iv_source = caller) on a module that hides its IV, the
    wrap -> unwrap self-test of a version fails, names the version and the reason, and the
    version is never used for a wrap; a new version made on it fails the same test and is
    destroyed at once."""
    assert run(token, "create", key="tested")["create"] == {"ok": True}
    out = run(
        token, "self_test", strict=strict_module, iv="ignore", iv_source="caller", key="tested"
    )
    assert out["self_test"] == (
        "unwrapping a fresh wrap failed (the module used another IV than it reported)"
    )
    assert out["passed"] is False
    assert out["encrypt"] == {"error": "HsmUnavailableError", "reason": "kek_self_test_failed"}
    assert "KEK tested/v1 failed its self-test and is not used for new wraps" in out["log"]
    created = run(
        token, "create", strict=strict_module, iv="ignore", iv_source="caller", key="fresh"
    )
    assert created["create"] == {"error": "HsmUnavailableError", "reason": "kek_self_test_failed"}
    assert "fresh/v1" not in run(token, "list")["on_token"]  # destroyed, never used


def test_iv_source_hsm_on_a_module_that_keeps_caller_ivs_never_wraps(token: DevEnv) -> None:
    """iv_source = hsm on SoftHSM (which keeps the zeroed IV it is given) would wrap every key
    under the same all-zero IV: each wrap is refused instead, and the self-test says so."""
    assert run(token, "create", key="zeroiv")["create"] == {"ok": True}
    out = run(token, "self_test", iv_source="hsm", key="zeroiv")
    assert out["self_test"] == "the module returned no GCM IV"
    assert out["encrypt"]["reason"] == "kek_self_test_failed"


def test_iv_source_caller_on_a_module_that_overwrites_still_stores_its_iv(
    token: DevEnv, strict_module: StrictModule
) -> None:
    """iv_source = caller on a module that writes its own IV back: the IV read back is stored,
    so wraps still unwrap."""
    assert run(token, "create", key="overwritten")["create"] == {"ok": True}
    out = run(
        token,
        "self_test",
        strict=strict_module,
        iv="generate",
        iv_source="caller",
        key="overwritten",
    )
    assert out["self_test"] is None
    assert "ok" in out["encrypt"]


@pytest.mark.parametrize("strict", [False, True], ids=["softhsm", "strict"])
def test_forget_never_destroys_the_token_object(
    token: DevEnv, strict_module: StrictModule, strict: bool
) -> None:
    """Regression: forgetting a version (done for every version that stops being usable) drops
    the cached handle but destroys it only if it is a session copy. Without C_CopyObject (the
    strict module) or for a non-modifiable KEK (SoftHSM), the cached handle is the KEK itself."""
    out = run(token, "forget", strict=strict_module if strict else None)
    assert out["on_token"] is True
    assert "ok" in out["encrypt"]


def test_iv_source_setting_is_validated(devenv: DevEnv) -> None:
    """[hsm] iv_source takes auto, caller or hsm; anything else fails at start-up, naming the key."""
    from keybroker.errors import ConfigurationError
    from tests.conftest import load_settings

    for value in ("auto", "caller", "hsm"):
        assert load_settings(devenv, hsm_iv_source=value).hsm.iv_source == value
    assert load_settings(devenv).hsm.iv_source == "auto"
    with pytest.raises(ConfigurationError, match=r"\[hsm\] iv_source"):
        load_settings(devenv, hsm_iv_source="module")


def test_module_without_aes_gcm_encryption_is_refused_at_start(
    token: DevEnv, strict_module: StrictModule
) -> None:
    """A module that refuses every CKM_AES_GCM encryption (the strict module answering
    CKR_MECHANISM_INVALID to C_EncryptInit) is refused at start with a configuration error
    naming the mechanism: nothing could ever be wrapped on it."""
    strict_module.fail("0x70", ["C_EncryptInit"])  # CKR_MECHANISM_INVALID
    try:
        out = run(token, "wraps", strict=strict_module)
    finally:
        strict_module.clear()
    assert out["connect"]["error"] == "ConfigurationError"
    assert "the broker needs CKM_AES_GCM" in out["connect"]["message"]
