"""The strict-HSM test module itself (tests/support/strict_pkcs11): it must behave like the
strictest cloud HSMs, or the tests that run the broker on it prove nothing.

Each case runs in a fresh interpreter: the module reads its configuration at C_Initialize, once
per process."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from keybroker.devenv import DevEnv
from tests.support.process import run_fresh
from tests.support.strict_pkcs11 import StrictModule

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.exceptions import PKCS11Error
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    case, library, label, pin = sys.argv[1:5]
    out = {}
    lib = pkcs11.lib(library)
    out["description"] = lib.library_description
    session = lib.get_token(token_label=label).open(rw=True, user_pin=pin)
    key = session.generate_key(
        KeyType.AES, 256, store=False,
        template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    value = key[Attribute.VALUE]

    def encrypt(iv):
        params = pkcs11.GCMParams(iv, b"aad", 128)
        try:
            ct = key.encrypt(b"k" * 32, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        except PKCS11Error as exc:
            return {"error": type(exc).__name__}
        return {"iv": bytes(iv).hex(), "opens": AESGCM(value).decrypt(bytes(iv), ct, b"aad") == b"k" * 32}

    if case == "iv":
        out["zero"] = encrypt(bytearray(12))
        out["zero2"] = encrypt(bytearray(12))
        out["caller"] = encrypt(bytearray(b"\\x01" * 12))
        ct = AESGCM(value).encrypt(b"\\x05" * 12, b"d" * 32, b"aad")
        out["decrypt_uses_caller_iv"] = key.decrypt(
            ct, mechanism=Mechanism.AES_GCM, mechanism_param=pkcs11.GCMParams(b"\\x05" * 12, b"aad", 128)
        ) == b"d" * 32
    elif case == "copy":
        try:
            key.copy({Attribute.TOKEN: False})
            out["copy"] = "ok"
        except PKCS11Error as exc:
            out["copy"] = type(exc).__name__
    elif case == "outage":
        control = os.environ["STRICT_PKCS11_CONTROL"]
        def attempt():
            try:
                session.generate_random(256)
                return "ok"
            except PKCS11Error as exc:
                return type(exc).__name__
        out["before"] = attempt()
        for code in ("CKR_TOKEN_NOT_PRESENT", "CKR_DEVICE_REMOVED", "CKR_SESSION_HANDLE_INVALID", "CKR_GENERAL_ERROR"):
            with open(control + ".new", "w") as fh:
                fh.write(f"fail={code}\\n")
            os.replace(control + ".new", control)
            out[code] = attempt()
        with open(control + ".new", "w") as fh:
            fh.write("fail=CKR_DEVICE_REMOVED\\nfail_functions=C_Encrypt\\n")
        os.replace(control + ".new", control)
        out["only_encrypt_random"] = attempt()
        out["only_encrypt_encrypt"] = encrypt(bytearray(12)).get("error", "ok")
        os.unlink(control)
        out["after"] = attempt()
    elif case == "latency":
        started = time.perf_counter()
        for _ in range(40):
            session.generate_random(64)
        out["seconds"] = time.perf_counter() - started
    print(json.dumps(out))
    """
)

OS_LOCKING_CHILD = textwrap.dedent(
    """
    import ctypes, sys
    lib = ctypes.CDLL(sys.argv[1])
    class Args(ctypes.Structure):
        _fields_ = [("create", ctypes.c_void_p), ("destroy", ctypes.c_void_p),
                    ("lock", ctypes.c_void_p), ("unlock", ctypes.c_void_p),
                    ("flags", ctypes.c_ulong), ("reserved", ctypes.c_void_p)]
    fl = ctypes.POINTER(ctypes.c_void_p)()
    assert lib.C_GetFunctionList(ctypes.byref(fl)) == 0
    # CK_FUNCTION_LIST: CK_VERSION (padded to 8 bytes), then C_Initialize, C_Finalize, …
    init = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(fl[1])
    fini = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)(fl[2])
    args = Args(None, None, None, None, 2, None)  # CKF_OS_LOCKING_OK
    print(init(ctypes.byref(args)), fini(None))
    """
)


def _child(strict: StrictModule, devenv: DevEnv, case: str, **options: Any) -> dict[str, Any]:
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(devenv.softhsm_conf.resolve()),
        **strict.environ(**options),
    }
    args = [case, str(strict.library), "keybroker-dev", devenv.pin_file.read_text().strip()]
    script = "import sys; sys.argv[1:] = " + repr(args) + "\n" + CHILD
    result: dict[str, Any] = json.loads(run_fresh(script, env))
    return result


def test_generate_mode_writes_its_own_iv_into_the_callers_buffer(
    strict_module: StrictModule, devenv: DevEnv
) -> None:
    """Like AWS CloudHSM: the caller's IV is ignored, a fresh one is written into pIv, and the
    ciphertext opens with that IV; decryption uses the caller's IV."""
    out = _child(strict_module, devenv, "iv", iv="generate")
    assert out["description"] == "strict-pkcs11 test module"
    assert out["zero"]["opens"] and out["zero2"]["opens"] and out["caller"]["opens"]
    assert out["zero"]["iv"] != "00" * 12
    assert out["zero"]["iv"] != out["zero2"]["iv"]
    assert out["caller"]["iv"] != "01" * 12
    assert out["decrypt_uses_caller_iv"] is True


def test_refuse_mode_refuses_a_caller_iv(strict_module: StrictModule, devenv: DevEnv) -> None:
    """Like Luna in FIPS mode: a non-zero caller IV is refused; a zero buffer gets the HSM's IV."""
    out = _child(strict_module, devenv, "iv", iv="refuse")
    assert out["caller"] == {"error": "MechanismParamInvalid"}
    assert out["zero"]["opens"] and out["zero"]["iv"] != "00" * 12


def test_keep_mode_is_softhsm(strict_module: StrictModule, devenv: DevEnv) -> None:
    """keep: the caller's IV is used as given, as SoftHSM does."""
    out = _child(strict_module, devenv, "iv", iv="keep")
    assert out["caller"] == {"iv": "01" * 12, "opens": True}
    assert out["zero"] == {"iv": "00" * 12, "opens": True}


@pytest.mark.parametrize(
    ("copy", "expected"), [("refuse", "FunctionNotSupported"), ("allow", "ok")]
)
def test_copy_object(strict_module: StrictModule, devenv: DevEnv, copy: str, expected: str) -> None:
    """C_CopyObject answers CKR_FUNCTION_NOT_SUPPORTED unless allowed."""
    assert _child(strict_module, devenv, "copy", copy=copy)["copy"] == expected


def test_outages_switch_on_and_off_at_run_time(strict_module: StrictModule, devenv: DevEnv) -> None:
    """The control file turns each outage code on, limits it to chosen functions, and its
    removal ends the outage in the same process."""
    out = _child(strict_module, devenv, "outage")
    assert out["before"] == "ok"
    assert out["CKR_TOKEN_NOT_PRESENT"] == "TokenNotPresent"
    assert out["CKR_DEVICE_REMOVED"] == "DeviceRemoved"
    assert out["CKR_SESSION_HANDLE_INVALID"] == "SessionHandleInvalid"
    assert out["CKR_GENERAL_ERROR"] == "GeneralError"
    assert out["only_encrypt_random"] == "ok"
    assert out["only_encrypt_encrypt"] == "DeviceRemoved"
    assert out["after"] == "ok"


def test_latency_is_added_to_every_call(strict_module: StrictModule, devenv: DevEnv) -> None:
    """1 ms of simulated latency per call: 40 calls take at least 40 ms."""
    assert _child(strict_module, devenv, "latency", latency_us=1000)["seconds"] >= 0.040
    assert _child(strict_module, devenv, "latency", latency_us=0)["seconds"] < 0.040


def test_initialize_arguments_pass_through(strict_module: StrictModule, tmp_path: Path) -> None:
    """CKF_OS_LOCKING_OK given to C_Initialize reaches the target module unchanged (the trace
    records the flags; SoftHSM accepts them)."""
    env = {**os.environ, **strict_module.environ()}
    env["STRICT_PKCS11_TRACE"] = str(tmp_path / "trace")
    env["SOFTHSM2_CONF"] = str(tmp_path / "none.conf")
    (tmp_path / "none.conf").write_text(f"directories.tokendir = {tmp_path}\n")
    script = "import sys; sys.argv[1:] = " + repr([str(strict_module.library)]) + "\n"
    assert run_fresh(script + OS_LOCKING_CHILD, env).split() == ["0", "0"]
    assert (tmp_path / "trace").read_text().startswith("C_Initialize flags=0x2 mutex_callbacks=0")
