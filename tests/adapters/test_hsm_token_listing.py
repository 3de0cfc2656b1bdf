"""Listing the token's objects while another process creates and destroys keys on it.

A replica destroying a key version, or an administrator, may destroy an object between a search
finding it and its attributes being read; SoftHSM then answers ``ObjectHandleInvalid``. The
adapter used to turn that into ``HsmUnavailableError`` ("key store temporarily unavailable"):
a rotation, a start-up scan or a health probe failed for no fault of the token (twice in
clean-clone runs of the suite). Real SoftHSM, two processes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from pkcs11.exceptions import GeneralError

from keybroker.adapters import hsm as hsm_module
from keybroker.adapters import kek_objects as kek_objects_module
from keybroker.core.wrapped_key import KeyRef
from keybroker.devenv import DevEnv
from keybroker.errors import KeybrokerError
from keybroker.server.app import connect_hsm
from tests.conftest import load_settings

CHURN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from keybroker import settings
    from keybroker.core.wrapped_key import KeyRef
    from keybroker.server.app import connect_hsm

    keks = connect_hsm(settings.load(Path(sys.argv[1]), environ={}))
    name, seconds, most = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    print("ready", flush=True)
    done, deadline = 0, time.monotonic() + seconds
    while done < most and time.monotonic() < deadline:
        ref = KeyRef(name, done + 1)
        keks.create_version(ref)
        keks.destroy_version(ref)
        done += 1
    print(done, flush=True)
    """
)


def test_listing_survives_objects_destroyed_by_another_process(devenv: DevEnv) -> None:
    keks = connect_hsm(load_settings(devenv))
    name = f"churn-{uuid.uuid4().hex[:8]}"
    with subprocess.Popen(
        [sys.executable, "-c", CHURN, str(devenv.config), name, "6", "400"],
        stdout=subprocess.PIPE,
        text=True,
    ) as churn:
        try:
            assert churn.stdout is not None
            assert churn.stdout.readline().strip() == "ready"
            listings, failures = 0, []
            deadline = time.monotonic() + 6
            while churn.poll() is None and listings < 2000 and time.monotonic() < deadline:
                try:
                    keks.versions_on_token()
                    keks.versions(name)
                except KeybrokerError as exc:
                    failures.append(exc.reason)
                listings += 1
            churned = int(churn.stdout.readline())
        finally:
            churn.kill()
    assert churned >= 20 and listings >= 20, (churned, listings)  # the two really overlapped
    assert failures == []
    assert not any(ref.name == name for ref in keks.versions_on_token())
    assert keks.versions(name) == []
    assert KeyRef(name, 1) not in keks.versions_on_token()


def test_an_ambiguous_create_that_made_nothing_is_tried_again(
    devenv: DevEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """C_GenerateKey answered CKR_GENERAL_ERROR now and then while another process created
    objects on the same SoftHSM token (two replicas rotating at once): when nothing was made,
    the version is created on a second attempt instead of failing the rotation. Real SoftHSM;
    the first C_GenerateKey of the test fails as it did."""
    keks = connect_hsm(load_settings(devenv))
    real = kek_objects_module.generate_kek
    calls: list[str] = []

    def flaky(session: object, label: str) -> bool:
        calls.append(label)
        if len(calls) == 1:
            raise GeneralError()
        return real(session, label)

    ref = KeyRef(f"flaky-{uuid.uuid4().hex[:8]}", 1)
    monkeypatch.setattr(hsm_module, "generate_kek", flaky)
    assert keks.create_version(ref)
    monkeypatch.undo()
    assert len(calls) == 2
    assert ref in keks.versions_on_token()
    keks.destroy_version(ref)
