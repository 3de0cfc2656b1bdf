"""Raw HSM AES-GCM decrypt rate, in one process, without the broker around it.

Decrypts the ciphertext of a real wrapped key (32-byte data key, its real header as AAD) with
python-pkcs11 against the broker's own SoftHSM token, exactly the PKCS#11 call the broker makes per
unwrap: the key is an in-memory session copy (``key.copy({Attribute.TOKEN: False})``) and one call
runs at a time (concurrent calls crash SoftHSM initialised without OS locking,
see docs/CONCURRENCY.md). Run as a separate process by
bench/run.py so the benchmark process itself never logs in to the token; several copies may run
at once (``--start-at`` lines them up), one per process, as the broker's workers do.

Prints one line: ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass

from keybroker import settings as settings_mod
from keybroker.adapters.hsm import kek_label
from keybroker.core.wrapped_key import DATA_KEY_SIZE, WrappedKey


def measure(
    config: Path, wrapped_key: bytes, duration: float, max_ops: int, start_at: float
) -> dict[str, Any]:
    settings = settings_mod.load(config, environ={})
    os.environ.update(settings.hsm.env)
    parsed = WrappedKey.parse(wrapped_key)
    aad = parsed.aad
    lib = pkcs11.lib(settings.hsm.module)
    token = lib.get_token(token_label=settings.hsm.token_label)
    with token.open(user_pin=settings.read_pin()) as session:
        token_key = session.get_key(
            object_class=ObjectClass.SECRET_KEY, label=kek_label(parsed.key)
        )
        key: Any = token_key.copy({Attribute.TOKEN: False})
        params = pkcs11.GCMParams(parsed.nonce, aad, 128)

        def decrypt() -> bytes:
            out: bytes = key.decrypt(
                parsed.ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params
            )
            return out

        if len(decrypt()) != DATA_KEY_SIZE:
            raise SystemExit("hsm_raw: decrypt returned a wrong-sized key")
        for _ in range(1000):  # warm-up
            decrypt()
        while time.monotonic() < start_at:
            time.sleep(0.001)
        ops = 0
        cpu0, t0 = time.process_time(), time.monotonic()
        end = t0 + duration
        while ops < max_ops:
            for _ in range(100):
                decrypt()
            ops += 100
            if time.monotonic() >= end:
                break
        seconds = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        key.destroy()
    return {
        "ops": ops,
        "seconds": seconds,
        "rate": ops / seconds,
        "cpu_us_per_op": cpu * 1e6 / ops,
        "aad_bytes": len(aad),
        "ciphertext_bytes": len(parsed.ciphertext),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the broker's keybroker.toml")
    parser.add_argument("--wrapped-key", type=Path, required=True, help="a wrapped key (binary)")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-ops", type=int, default=10_000_000)
    parser.add_argument("--start-at", type=float, default=0.0, help="time.monotonic() to start at")
    args = parser.parse_args()
    result = measure(
        args.config,
        args.wrapped_key.read_bytes(),
        min(args.duration, 120.0),
        args.max_ops,
        args.start_at,
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
