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
