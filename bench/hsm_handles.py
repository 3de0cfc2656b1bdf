"""Token-object handles against in-memory session copies of a KEK, through the broker's HSM
adapter, on SoftHSM2 (one process, one thread).

Why: the broker no longer depends on C_CopyObject (AWS CloudHSM lacks it), and a KEK created with
CKA_MODIFIABLE=false cannot be copied into a session object on SoftHSM either; so new KEKs are
used through their token-object handle. This measures what that costs per unwrap (one GCM
decrypt) and per generate (random data key + GCM encrypt, IV read back), next to a KEK with the
earlier, modifiable template that SoftHSM still copies.

    .venv/bin/python bench/hsm_handles.py [--seconds 3]

Runs in a fresh temporary SoftHSM token; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from keybroker.adapters.hsm import HsmConfig, Pkcs11Keks, kek_label
from keybroker.core.wrapped_key import KeyRef
from keybroker.devenv import TOKEN_LABEL, DevEnv, provision_hsm, softhsm_module

AAD = b"\x00" * 100  # about the AAD of a typical wrapped key


def rate(call: Callable[[], object], seconds: float) -> float:
    for _ in range(500):
        call()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            call()
        done += 200
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = DevEnv(Path(tempfile.mkdtemp(prefix="kb-handles-")))
    provision_hsm(env)
    os.environ["SOFTHSM2_CONF"] = str(env.softhsm_conf.resolve())
    keks = Pkcs11Keks(HsmConfig(softhsm_module(), TOKEN_LABEL, env.pin_file.read_text().strip()))
    keks.connect()
    strict, legacy = KeyRef("strict", 1), KeyRef("legacy", 1)
    keks.create_version(strict)
    with keks._ready() as session:
        session.generate_key(
            *_legacy_key_args(),
            label=kek_label(legacy),
            store=True,
            template=_legacy_template(),
        )
        keks._scan(session)
    rows = []
    for ref, what in ((strict, "new KEK (not modifiable): token-object handle"),
                      (legacy, "old-template KEK: session copy")):  # fmt: skip
        nonce, sealed = keks.encrypt(ref, b"k" * 32, AAD)

        def unwrap(ref: KeyRef = ref, nonce: bytes = nonce, sealed: bytes = sealed) -> object:
            return keks.decrypt(ref, nonce, sealed, AAD)

        def generate(ref: KeyRef = ref) -> object:
            return keks.encrypt(ref, keks.random(32), AAD)

        unwraps = [rate(unwrap, args.seconds) for _ in range(args.repeat)]
        generates = [rate(generate, args.seconds) for _ in range(args.repeat)]
        rows.append((what, statistics.median(unwraps), statistics.median(generates)))
    caps = keks.capabilities
    print(f"module probe: {caps.describe() if caps else '-'}")
    print(
        "| KEK handle (SoftHSM2, adapter, 1 thread) | unwrap (decrypt) /s "
        "| generate (random + encrypt) /s |"
    )
    print("|---|---|---|")
    for what, unwrap_rate, generate_rate in rows:
        print(f"| {what} | {unwrap_rate:,.0f} | {generate_rate:,.0f} |")
    return 0


def _legacy_key_args() -> tuple[object, int]:
    from pkcs11 import KeyType

    return KeyType.AES, 256


def _legacy_template() -> dict[object, object]:
    from pkcs11 import Attribute

    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
    }


if __name__ == "__main__":
    sys.exit(main())
