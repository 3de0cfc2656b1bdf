"""Sessions for threads (keybroker.adapters.hsm_sessions): the module initialised with
CKF_OS_LOCKING_OK, a pool of sessions used by several threads at once, the global lock kept for
``[hsm] locking = "global"``.

Each case runs in a fresh interpreter: a PKCS#11 module is initialised once per process.
"""

from __future__ import annotations

import json
import os
import textwrap
import threading
from pathlib import Path
from typing import Any

from keybroker.adapters.hsm_sessions import Gate
from keybroker.devenv import DevEnv
from tests.support.process import run_fresh
from tests.support.strict_pkcs11 import StrictModule

STRESS = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from keybroker.adapters.hsm import HsmConfig, Pkcs11Keks
    from keybroker.core.wrapped_key import KeyRef

    module, label, pin, sessions, locking, threads, seconds, max_ops = sys.argv[1:9]
    keks = Pkcs11Keks(HsmConfig(module, label, pin, sessions=int(sessions), locking=locking), probe_key="recordings")
    keks.connect()
    key = keks.current("recordings")
    deadline = time.monotonic() + float(seconds)
    done, errors = [], []

    def work(n):
        count = 0
        try:
            while time.monotonic() < deadline and count < int(max_ops):
                dek = keks.random(32)
                aad = b"rec-%d-%d" % (n, count)
                nonce, blob = keks.encrypt(key, dek, aad)
                assert keks.decrypt(key, nonce, blob, aad) == dek
                count += 1
        except Exception as exc:  # reported to the parent
            errors.append(repr(exc))
        done.append(count)

    pool = [threading.Thread(target=work, args=(n,)) for n in range(int(threads))]
    started = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps({"os_locking": keks.os_locking, "ops": done, "errors": errors,
                      "seconds": time.monotonic() - started}))
    """
)


def _run(
    devenv: DevEnv,
    module: str,
    *,
    sessions: int,
    locking: str,
    threads: int,
    seconds: float,
    max_ops: int = 20000,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    env = {**os.environ, "SOFTHSM2_CONF": str(devenv.softhsm_conf.resolve()), **(extra_env or {})}
    args = [
        module,
        "keybroker-dev",
        devenv.pin_file.read_text().strip(),
        str(sessions),
        locking,
        str(threads),
        str(seconds),
        str(max_ops),
    ]
    script = "import sys; sys.argv[1:] = " + repr(args) + "\n" + STRESS
    result: dict[str, Any] = json.loads(run_fresh(script, env))
    return result


def test_softhsm_with_os_locking_survives_concurrent_threads(devenv: DevEnv) -> None:
    """Bounded stress (8 threads, 4 sessions, at most 3 s): SoftHSM initialised with
    CKF_OS_LOCKING_OK does not crash and every wrap unwraps. (Initialised with NULL, as
    python-pkcs11 does, the same load ends in SIGSEGV or a heap abort.)"""
    out = _run(devenv, _softhsm(devenv), sessions=4, locking="os", threads=8, seconds=3)
    assert out["os_locking"] is True
    assert out["errors"] == []
    assert len(out["ops"]) == 8 and min(out["ops"]) > 0


def test_global_locking_serialises_and_works(devenv: DevEnv) -> None:
    """``[hsm] locking = "global"``: the module is initialised with NULL and every call runs
    under one lock (the arrangement for modules that cannot lock); still correct with threads."""
    out = _run(devenv, _softhsm(devenv), sessions=4, locking="global", threads=4, seconds=1)
    assert out["os_locking"] is False
    assert out["errors"] == []
    assert min(out["ops"]) > 0


def test_the_pool_overlaps_calls_on_a_slow_module(
    devenv: DevEnv, strict_module: StrictModule, tmp_path: Path
) -> None:
    """With 20 ms per call (a network HSM), four threads on four sessions finish a fixed amount
    of work in well under the time one session needs, and the module saw CKF_OS_LOCKING_OK."""
    environ = strict_module.environ(iv="keep", copy="allow", latency_us=20000)
    environ["STRICT_PKCS11_TRACE"] = str(tmp_path / "trace")
    common: dict[str, Any] = {"threads": 4, "seconds": 60, "max_ops": 3, "extra_env": environ}
    library = str(strict_module.library)
    one = _run(devenv, library, sessions=1, locking="os", **common)
    four = _run(devenv, library, sessions=4, locking="os", **common)
    assert one["errors"] == [] and four["errors"] == []
    assert four["seconds"] < 0.6 * one["seconds"], (one["seconds"], four["seconds"])
    trace = (tmp_path / "trace").read_text()
    assert "C_Initialize flags=0x2" in trace


def _softhsm(devenv: DevEnv) -> str:
    from keybroker import settings as settings_mod

    return settings_mod.load(devenv.config, environ={}).hsm.module


def test_the_gate_lets_a_reinitialise_wait_for_calls_in_flight_and_holds_new_ones() -> None:
    """Gate with OS locking: calls share it; a re-initialise (exclusive) waits until the calls
    in flight are done, and calls that arrive meanwhile wait for it (C_Finalize under a running
    call is undefined behaviour). Re-entrant for the thread that holds it."""
    gate = Gate(serial=False)
    in_call, finish_call, writer_in, writer_done = (threading.Event() for _ in range(4))
    order: list[str] = []

    def call() -> None:
        with gate.shared(), gate.shared():  # nested: re-entrant
            order.append("call")
            in_call.set()
            finish_call.wait(5)
            order.append("call done")

    def reinitialise() -> None:
        with gate.exclusive(), gate.exclusive(), gate.shared():  # re-entrant, shared inside
            order.append("reinit")
            writer_in.set()
            writer_done.wait(5)
            order.append("reinit done")

    def late_call() -> None:
        with gate.shared():
            order.append("late call")

    first = threading.Thread(target=call)
    first.start()
    assert in_call.wait(5)
    writer = threading.Thread(target=reinitialise)
    writer.start()
    assert not writer_in.wait(0.2), "the re-initialise must wait for the call in flight"
    finish_call.set()
    assert writer_in.wait(5)
    late = threading.Thread(target=late_call)
    late.start()
    late.join(0.2)
    assert late.is_alive(), "a call must wait while the module is re-initialised"
    writer_done.set()
    for thread in (first, writer, late):
        thread.join(5)
    assert order == ["call", "call done", "reinit", "reinit done", "late call"]
    assert not gate.holds_shared()
