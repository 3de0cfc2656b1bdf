"""Start-up login: a module error while looking up the token or opening the session is retried,
then reported.

Several worker processes starting at once on one SoftHSM token were seen to get
CKR_GENERAL_ERROR from C_GetTokenInfo, and later from C_OpenSession/C_Login (each once in a
clean-clone test run: the worker died with a raw ``GeneralError``). Each case runs in a child
process (SoftHSM state is per process), with the module's ``get_token`` or the token's ``open``
failing the first ``FAILURES`` times.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from keybroker.devenv import DevEnv

CHILD = textwrap.dedent(
    """
    import logging, os, sys
    from pathlib import Path
    from pkcs11.exceptions import GeneralError
    from keybroker import settings as settings_mod
    from keybroker.adapters import hsm
    from keybroker.errors import HsmUnavailableError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    failures, where = int(sys.argv[2]), sys.argv[3]
    real_load = hsm._load

    def fail(call):
        global failures
        if call == where and failures:
            failures -= 1
            raise GeneralError()

    class FlakyToken:
        def __init__(self, token):
            self._token = token

        def open(self, **kwargs):
            fail("open")
            return self._token.open(**kwargs)

    class Flaky:
        def __init__(self, lib):
            self._lib = lib

        def get_token(self, **kwargs):
            fail("get_token")
            return FlakyToken(self._lib.get_token(**kwargs))

        def __getattr__(self, name):
            return getattr(self._lib, name)

    hsm._load = lambda module: Flaky(real_load(module))
    s = settings_mod.load(Path(sys.argv[1]), environ={})
    os.environ.update(s.hsm.env)
    keks = hsm.Pkcs11Keks(
        hsm.HsmConfig(s.hsm.module, s.hsm.token_label, s.read_pin()), probe_key=s.keys.default
    )
    try:
        keks.connect()
    except HsmUnavailableError as exc:
        print("unavailable", exc.reason)
    else:
        print("connected", keks.healthy)
    """
)


WHERE = {"get_token": "token_lookup_failed", "open": "session_open_failed"}


def run_child(devenv: DevEnv, failures: int, where: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(devenv.config), str(failures), where],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("where", sorted(WHERE))
def test_a_transient_module_error_is_retried(devenv: DevEnv, where: str) -> None:
    out = run_child(devenv, failures=2, where=where)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "connected True"
    assert f"hsm: {WHERE[where]}, retrying (1/5)" in out.stderr
    assert f"hsm: {WHERE[where]}, retrying (2/5)" in out.stderr
    assert "retrying (3/5)" not in out.stderr


@pytest.mark.parametrize("where", sorted(WHERE))
@pytest.mark.parametrize("failures", [5, 50])
def test_a_lasting_module_error_is_unavailable(devenv: DevEnv, failures: int, where: str) -> None:
    """After the last attempt: HsmUnavailableError, never a raw PKCS#11 exception."""
    out = run_child(devenv, failures=failures, where=where)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"unavailable {WHERE[where]}"
