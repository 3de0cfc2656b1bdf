"""Regression tests for the fixes in how the broker treats key objects on the HSM token (see
tests/security/README.md for how each test names the CHANGELOG entry it guards). The session's
SoftHSM token; raw PKCS#11 work (reading attributes, planting an object) in a child process,
since a PKCS#11 login belongs to a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from keybroker.adapters.audit_reader import decisions
from keybroker.core.wrapped_key import KeyRef
from keybroker.devenv import TOKEN_LABEL, DevEnv, softhsm_module
from keybroker.errors import KeybrokerError
from tests.security.conftest import Start

CHILD = textwrap.dedent(
    """
    import json, sys
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.exceptions import PKCS11Error
    import keybroker.adapters.hsm  # noqa: F401 - registers the CKA_ALLOWED_MECHANISMS codec

    job = json.load(sys.stdin)
    session = pkcs11.lib(job["module"]).get_token(token_label=job["token"]).open(
        rw=True, user_pin=job["pin"]
    )
    out = {}
    if job["case"] == "attributes":
        obj = session.get_key(label=job["label"], object_class=ObjectClass.SECRET_KEY)
        out["modifiable"] = obj[Attribute.MODIFIABLE]
        out["allowed"] = [m.name for m in obj[Attribute.ALLOWED_MECHANISMS]]
        try:
            obj.encrypt(b"x" * 16, mechanism=Mechanism.AES_CBC, mechanism_param=b"\\0" * 16)
            out["cbc"] = "allowed"
        except PKCS11Error as exc:
            out["cbc"] = type(exc).__name__
    elif job["case"] == "plant":
        session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: bytes.fromhex(job["value"]), Attribute.LABEL: job["label"],
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
        })
    elif job["case"] == "remove":
        for obj in session.get_objects({Attribute.LABEL: job["label"]}):
            obj.destroy()
    session.close()
    print(json.dumps(out))
    """
)


def _child(devenv: DevEnv, case: str, **job: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps({
            "module": softhsm_module(), "token": TOKEN_LABEL,
            "pin": devenv.pin_file.read_text().strip(), "case": case, **job,
        }),
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "SOFTHSM2_CONF": str(devenv.softhsm_conf.resolve())},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_new_keks_are_not_modifiable_and_only_usable_for_aes_gcm(
    devenv: DevEnv, start: Start, base_key: str
) -> None:
    """Unreleased, Security: "New KEKs are created `CKA_MODIFIABLE=false` and limited to
    `CKM_AES_GCM`".

    A version the broker makes on the token cannot be relabelled or altered, and refuses AES-CBC
    for anyone holding the PIN."""
    broker = start()
    broker.keks.create_version(KeyRef(base_key, 2))
    found = _child(devenv, "attributes", label=f"kek:{base_key}:v2")
    assert found["modifiable"] is False
    assert found["allowed"] == ["AES_GCM"]
    assert found["cbc"] != "allowed"


def test_a_kek_planted_under_a_kek_label_is_never_used(
    devenv: DevEnv, start: Start, base_key: str
) -> None:
    """Unreleased, Security: "Objects under `kek:` labels are used only if AES-256, `CKA_LOCAL`,
    `CKA_NEVER_EXTRACTABLE` and `CKA_ALWAYS_SENSITIVE`".

    A PIN holder imports ``kek:<key>:v2`` from a value they know (C_CreateObject): a broker
    starting on that token keeps v1 current, never encrypts under the planted object, and
    journals a ``Reconcile`` event ``hsm_object_rejected``."""
    label = f"kek:{base_key}:v2"
    _child(devenv, "plant", label=label, value=os.urandom(32).hex())
    try:
        broker = start()
        assert broker.lifecycle is not None and broker.journal is not None
        assert broker.lifecycle.get(base_key).current_version == 1
        assert label in broker.keks.rejected_objects()
        assert KeyRef(base_key, 2) not in broker.keks.versions_on_token()
        with pytest.raises(KeybrokerError):
            broker.keks.encrypt(KeyRef(base_key, 2), b"d" * 32, b"aad")
        events = [
            (d.operation, d.reason)
            for _ts, d in decisions(broker.journal.directory.parent)
            if d.key_name == base_key
        ]
        assert ("Reconcile", "hsm_object_rejected") in events
    finally:
        _child(devenv, "remove", label=label)


def test_forgetting_a_version_never_destroys_the_token_kek(
    devenv: DevEnv, start: Start, base_key: str
) -> None:
    """Unreleased, Fixed: "`forget()` of a KEK version (done for every version that stops being
    usable) destroyed the cached handle unconditionally".

    On SoftHSM a new (non-modifiable) KEK is used through its token object, not a session copy:
    after a wrap caches that handle, forgetting the version leaves the KEK on the token and
    usable."""
    broker = start()
    ref = KeyRef(base_key, 2)
    broker.keks.create_version(ref)
    nonce, sealed = broker.keks.encrypt(ref, b"d" * 32, b"aad")
    broker.keks.forget(ref)
    assert ref in broker.keks.versions_on_token()
    assert broker.keks.decrypt(ref, nonce, sealed, b"aad") == b"d" * 32


def test_a_version_found_on_the_token_is_adopted_but_not_made_current(
    devenv: DevEnv, start: Start, base_key: str
) -> None:
    """Unreleased, Changed: "A KEK version found on the HSM token without metadata is adopted
    `enabled` but no longer made current for a key that has a current version".

    A genuine v2 appears on the token behind the store's back (made by another tool or a PIN
    holder): a broker starting on that store adopts it enabled, and v1 stays current until an
    operator says otherwise."""
    first = start("one", store="shared")
    assert first.lifecycle is not None
    assert first.lifecycle.get(base_key).current_version == 1
    first.keks.create_version(KeyRef(base_key, 2))
    second = start("two", store="shared")
    assert second.lifecycle is not None
    key = second.lifecycle.get(base_key)
    assert key.current_version == 1
    assert {v.version: v.state.value for v in key.versions} == {1: "enabled", 2: "enabled"}
