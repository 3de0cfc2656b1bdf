"""The broker's HSM-level server tests on openCryptoki 3.23's software token: every test of
test_data_plane.py, test_key_admin.py and test_retention.py parametrised over HSM_MODULES (the
whole data plane: generate, unwrap, rewrap, every refusal, v1 and v2 wrapped keys; keys created
and rotated through KeyAdmin, wrapped keys that follow version states; retention epoch keys
shredded by hand and by the scheduler) runs inside the Debian 13 root
(tests/support/ock_trixie.py), where tests/conftest.py adds "opencryptoki" to HSM_MODULES.

The tests run there with that root's Python and this repository (read-only), on SQLite (the
metadata store is not what differs between HSMs; the PostgreSQL runs of the same tests are on
SoftHSM and the strict module). The run must pass every selected test and nothing else (none
skipped, failed or in error), and at least as many as are parametrised today.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.support import ock_trixie

FILES = (
    "tests/server/test_data_plane.py",
    "tests/server/test_key_admin.py",
    "tests/server/test_retention.py",
)
AT_LEAST = 33
"""Tests of those files parametrised over HSM_MODULES today (29 data plane, 2 key admin, 2
retention); more as tests are added there."""


@pytest.fixture(scope="module")
def ock3() -> Iterator[ock_trixie.Trixie]:
    started = ock_trixie.start()
    yield started
    ock_trixie.stop(started)


@pytest.mark.slow
def test_the_hsm_server_tests_pass_on_opencryptoki_3_23(ock3: ock_trixie.Trixie) -> None:
    pin_file = "/tmp/opencryptoki.pin"
    ock3.write_secret(pin_file, ock3.pin)
    env = {
        "HOME": "/tmp",
        "OPENCRYPTOKI_TEST_TOKEN": json.dumps(
            {"module": ock3.library, "label": ock3.label, "pin_file": pin_file}
        ),
    }
    inside = ock_trixie.REPO_INSIDE
    done = subprocess.run(
        ock3.command(
            ock_trixie.PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
            "--rootdir", inside, "-c", f"{inside}/pyproject.toml",
            *(f"{inside}/{path}" for path in FILES), "-k", "opencryptoki and not postgresql",
            env=env,
        ),
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    summary = done.stdout.strip().splitlines()[-1]
    counted = re.fullmatch(r"(\d+) passed, \d+ deselected in .*", summary)  # nothing else
    assert counted is not None, output[-6000:]
    assert int(counted[1]) >= AT_LEAST, summary
