"""Known-answer vectors against a real SoftHSM token: the HSM's AES-GCM is the format's AES-GCM.

Each vector's public test KEK is imported into a fresh token as ``kek:<name>:v<version>``; then
``Pkcs11Keks`` must decrypt every valid vector to its data key, encrypt its data key with the
vector's nonce and AAD to the vector's ciphertext, and refuse every blob of stage
``authenticate`` with InvalidWrappedKeyError while staying healthy.

PKCS#11 login is per process and python-pkcs11 modules are process-wide (docs: FACTS.md), so all
HSM work runs in child processes: one imports the KEKs and logs out, one runs the checks. This test
process never loads the PKCS#11 module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keybroker.devenv import TOKEN_LABEL, DevEnv, provision_hsm, softhsm_module

VECTOR_FILE = Path(__file__).resolve().parents[1] / "vectors" / "wrapped_key_v1.json"
VECTORS: dict[str, Any] = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))
VALID: list[dict[str, Any]] = VECTORS["valid"]
AUTH_FAILURES: list[dict[str, Any]] = [
    v for v in VECTORS["invalid"] if v["stage"] == "authenticate"
]

# Child 1: import the test KEKs as token objects, then close the session (which logs out).
_IMPORT_SCRIPT = """
import json, sys
import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass

job = json.load(sys.stdin)
token = pkcs11.lib(job["module"]).get_token(token_label=job["token_label"])
with token.open(rw=True, user_pin=job["pin"]) as session:
    for kek in job["keks"]:
        session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: bytes.fromhex(kek["value"]),
            Attribute.LABEL: kek["label"],
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
        })
    print(json.dumps({"imported": len(job["keks"])}))
"""

# Child 2: one Pkcs11Keks for the token, every vector through it. The header of a failure blob is
# split here by hand (the layout of docs/FORMAT.md), so the HSM sees exactly the vector's bytes.
_CHECK_SCRIPT = """
import json, struct, sys
from keybroker.adapters.hsm import HsmConfig, Pkcs11Keks
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import KeybrokerError

job = json.load(sys.stdin)
keks = Pkcs11Keks(HsmConfig(job["module"], job["token_label"], job["pin"]))
keks.connect()

def attempt(call):
    try:
        return {"ok": call().hex()}
    except KeybrokerError as exc:
        return {"error": type(exc).__name__}

out = {"valid": {}, "authenticate": {}, "current": {}, "versions": {}}
for v in job["valid"]:
    key = KeyRef(v["key_name"], v["key_version"])
    blob = bytes.fromhex(v["blob"])
    aad = blob[: v["aad_length"]]
    nonce = bytes.fromhex(v["nonce"])
    out["valid"][v["id"]] = {
        "decrypt": attempt(lambda: keks.decrypt(key, nonce, bytes.fromhex(v["ciphertext"]), aad)),
        "encrypt": attempt(lambda: keks.encrypt(key, nonce, bytes.fromhex(v["data_key"]), aad)),
    }
    out["current"][v["key_name"]] = str(keks.current(v["key_name"]))
    out["versions"][v["key_name"]] = [str(r) for r in keks.versions(v["key_name"])]
for v in job["authenticate"]:
    blob = bytes.fromhex(v["blob"])
    n = blob[4]
    key = KeyRef(blob[5 : 5 + n].decode("ascii"), struct.unpack(">I", blob[5 + n : 9 + n])[0])
    nonce = blob[9 + n : 21 + n]
    aad_end = 23 + n + struct.unpack(">H", blob[21 + n : 23 + n])[0]
    out["authenticate"][v["id"]] = attempt(
        lambda: keks.decrypt(key, nonce, blob[aad_end:], blob[:aad_end])
    )
    out["healthy_after_" + v["id"]] = keks.healthy
keks.check()  # raises HsmUnavailableError if the failures above were mistaken for a broken HSM
out["healthy_at_end"] = keks.healthy
print(json.dumps(out))
"""


def _run(script: str, job: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fresh SoftHSM token holding the vectors' KEKs, and the results of every check on it."""
    env = DevEnv(tmp_path_factory.mktemp("vectors-hsm"))
    provision_hsm(env)
    child_env = {**os.environ, "SOFTHSM2_CONF": str(env.softhsm_conf.resolve())}
    base = {
        "module": softhsm_module(),
        "token_label": TOKEN_LABEL,
        "pin": env.pin_file.read_text().strip(),
    }
    keks = {f"kek:{v['key_name']}:v{v['key_version']}": v["kek"] for v in VALID}
    imported = _run(
        _IMPORT_SCRIPT,
        {**base, "keks": [{"label": label, "value": value} for label, value in keks.items()]},
        child_env,
    )
    assert imported == {"imported": len(keks)}
    return _run(_CHECK_SCRIPT, {**base, "valid": VALID, "authenticate": AUTH_FAILURES}, child_env)


@pytest.mark.parametrize("vector", VALID, ids=[v["id"] for v in VALID])
def test_hsm_decrypts_vector_to_its_data_key(hsm: dict[str, Any], vector: dict[str, Any]) -> None:
    """Pkcs11Keks.decrypt(ciphertext, nonce, AAD) of each vector gives the vector's data key."""
    assert hsm["valid"][vector["id"]]["decrypt"] == {"ok": vector["data_key"]}


@pytest.mark.parametrize("vector", VALID, ids=[v["id"] for v in VALID])
def test_hsm_encrypts_vector_data_key_to_its_ciphertext(
    hsm: dict[str, Any], vector: dict[str, Any]
) -> None:
    """Pkcs11Keks.encrypt with the vector's nonce and AAD gives the vector's ciphertext || tag."""
    assert hsm["valid"][vector["id"]]["encrypt"] == {"ok": vector["ciphertext"]}


@pytest.mark.parametrize("vector", AUTH_FAILURES, ids=[v["id"] for v in AUTH_FAILURES])
def test_hsm_refuses_tampered_vector(hsm: dict[str, Any], vector: dict[str, Any]) -> None:
    """A blob whose GCM check fails is InvalidWrappedKeyError, and the store stays healthy."""
    assert hsm["authenticate"][vector["id"]] == {"error": "InvalidWrappedKeyError"}
    assert hsm["healthy_after_" + vector["id"]] is True


def test_hsm_is_healthy_after_all_failures(hsm: dict[str, Any]) -> None:
    """Tag failures were classified as bad input, not as a broken HSM."""
    assert hsm["healthy_at_end"] is True


def test_hsm_current_version_is_the_highest_label(hsm: dict[str, Any]) -> None:
    """Labels kek:<name>:v<N> are read back as versions; current is the highest."""
    assert hsm["versions"]["recordings"] == ["recordings/v1", "recordings/v2"]
    assert hsm["current"]["recordings"] == "recordings/v2"
    big = next(v for v in VALID if v["id"] == "max_lengths")
    assert hsm["current"][big["key_name"]] == f"{big['key_name']}/v4294967295"
