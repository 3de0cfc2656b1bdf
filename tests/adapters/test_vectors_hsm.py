"""Known-answer vectors (v1 and v2) against a real SoftHSM token and through the strict-HSM test
module: the HSM's AES-GCM is the format's AES-GCM.

Each vector's public test KEK is imported into a fresh token as ``kek:<name>:v<version>``; then
``Pkcs11Keks`` must decrypt every valid vector of both versions to its data key, encrypt each v2
vector's data key under its AAD so that ``cryptography`` opens it with the IV the module reports
(on the strict module an IV the module chose itself), and refuse every blob of stage
``authenticate`` with InvalidWrappedKeyError while staying healthy. A v1 blob therefore still
unwraps on a module that would never let the broker choose an IV.

The imported KEKs are exactly what the broker refuses in production (``CKA_LOCAL`` false: their
values are known; see test_hsm_kek_objects.py); the checking child switches that refusal off, so
what is tested here is the crypto path alone.

PKCS#11 login is per process and python-pkcs11 modules are process-wide (docs/CONCURRENCY.md), so all
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
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keybroker.core.wrapped_key import WrappedKey
from keybroker.devenv import TOKEN_LABEL, DevEnv, provision_hsm, softhsm_module
from tests.support.strict_pkcs11 import StrictModule

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors"


def _vectors(version: int) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(
        (VECTOR_DIR / f"wrapped_key_v{version}.json").read_text(encoding="utf-8")
    )
    for v in raw["valid"] + raw["invalid"]:
        v["format"] = version
        v["id"] = f"v{version}-{v['id']}"
        if "kek_of" in v:
            v["kek_of"] = f"v{version}-{v['kek_of']}"
    return raw


V1, V2 = _vectors(1), _vectors(2)
VALID: list[dict[str, Any]] = V1["valid"] + V2["valid"]
AUTH_FAILURES: list[dict[str, Any]] = [
    v for v in V1["invalid"] + V2["invalid"] if v["stage"] == "authenticate"
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
# split here by hand (the layouts of docs/FORMAT.md), so the HSM sees exactly the vector's bytes.
_CHECK_SCRIPT = """
import json, struct, sys
from keybroker.adapters import hsm
from keybroker.adapters.hsm import HsmConfig, Pkcs11Keks
from keybroker.core.wrapped_key import KeyRef
from keybroker.errors import KeybrokerError

hsm.rejection = lambda obj: None  # the imported test KEKs (see the module docstring)
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
    }
    if v["format"] == 2:
        sealed = keks.encrypt(key, bytes.fromhex(v["data_key"]), aad)
        out["valid"][v["id"]]["encrypt"] = [part.hex() for part in sealed]
    out["current"][v["key_name"]] = str(keks.current(v["key_name"]))
    out["versions"][v["key_name"]] = [str(r) for r in keks.versions(v["key_name"])]
for v in job["authenticate"]:
    blob = bytes.fromhex(v["blob"])
    n = blob[4]
    key = KeyRef(blob[5 : 5 + n].decode("ascii"), struct.unpack(">I", blob[5 + n : 9 + n])[0])
    if blob[3] == 2:
        aad_end = 11 + n + struct.unpack(">H", blob[9 + n : 11 + n])[0]
        nonce, sealed = blob[aad_end : aad_end + 12], blob[aad_end + 12 :]
    else:
        nonce = blob[9 + n : 21 + n]
        aad_end = 23 + n + struct.unpack(">H", blob[21 + n : 23 + n])[0]
        sealed = blob[aad_end:]
    out["authenticate"][v["id"]] = attempt(
        lambda: keks.decrypt(key, nonce, sealed, blob[:aad_end])
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
def vector_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, str]]:
    """A fresh SoftHSM token holding the vectors' KEKs: the child job base and environment."""
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
    return base, child_env


@pytest.fixture(scope="module", params=["softhsm", "strict"])
def hsm(
    request: pytest.FixtureRequest,
    vector_token: tuple[dict[str, Any], dict[str, str]],
    strict_module: StrictModule,
) -> dict[str, Any]:
    """The results of every check, through SoftHSM and through the strict module (which chooses
    every GCM IV itself and has no C_CopyObject)."""
    base, child_env = vector_token
    if request.param == "strict":
        base = {**base, "module": str(strict_module.library)}
        child_env = {**child_env, **strict_module.environ(iv="generate")}
    return _run(_CHECK_SCRIPT, {**base, "valid": VALID, "authenticate": AUTH_FAILURES}, child_env)


@pytest.mark.parametrize("vector", VALID, ids=[v["id"] for v in VALID])
def test_hsm_decrypts_vector_to_its_data_key(hsm: dict[str, Any], vector: dict[str, Any]) -> None:
    """Pkcs11Keks.decrypt(ciphertext, nonce, AAD) of each vector gives the vector's data key."""
    assert hsm["valid"][vector["id"]]["decrypt"] == {"ok": vector["data_key"]}


V2_VALID = [v for v in VALID if v["format"] == 2]


@pytest.mark.parametrize("vector", V2_VALID, ids=[v["id"] for v in V2_VALID])
def test_hsm_encryption_opens_with_the_iv_it_reports(
    hsm: dict[str, Any], vector: dict[str, Any]
) -> None:
    """Pkcs11Keks.encrypt of a v2 vector's data key under its AAD returns an IV and
    ciphertext || tag that AES-256-GCM (cryptography) opens with the test KEK; joined into a v2
    blob, it parses to the vector's key and bindings."""
    nonce, sealed = (bytes.fromhex(part) for part in hsm["valid"][vector["id"]]["encrypt"])
    aad = bytes.fromhex(vector["blob"])[: vector["aad_length"]]
    kek = bytes.fromhex(vector["kek"])
    assert AESGCM(kek).decrypt(nonce, sealed, aad).hex() == vector["data_key"]
    parsed = WrappedKey.parse(WrappedKey.join_v2(aad, nonce, sealed))
    assert (parsed.key.name, parsed.key.version) == (vector["key_name"], vector["key_version"])


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
    big = next(v for v in VALID if v["id"] == "v1-max_lengths")
    assert hsm["current"][big["key_name"]] == f"{big['key_name']}/v4294967295"
