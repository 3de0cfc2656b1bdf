"""scripts/ensure-system-deps.sh installs what the broker needs for `make run` (SoftHSM2) and
only with --test (`make test`) what the suite needs (curl, PostgreSQL)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ensure-system-deps.sh"


def _run(tmp_path: Path, *args: str) -> tuple[int, str]:
    """Run the script with softhsm2-util present, curl absent, and apt-get replaced by a stub
    that records what it was asked to install."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "id", "env"):
        found = shutil.which(tool)
        assert found is not None
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    for fake in ("softhsm2-util", "sudo"):
        (bin_dir / fake).write_text('#!/bin/sh\nexec "$@"\n' if fake == "sudo" else "#!/bin/sh\n")
    record = tmp_path / "apt-get.log"
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    for path in bin_dir.iterdir():
        if not path.is_symlink():
            path.chmod(0o755)
    done = subprocess.run(
        [str(bin_dir / "bash"), str(SCRIPT), *args],
        env={"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/root")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode, record.read_text() if record.exists() else ""


def test_make_run_installs_no_curl_and_make_test_does(tmp_path: Path) -> None:
    """Without --test nothing is installed when SoftHSM2 is there (curl is not the broker's);
    with --test curl is installed."""
    code, installed = _run(tmp_path)
    assert code == 0
    assert installed == ""
    code, installed = _run(tmp_path, "--test")
    assert code == 0
    assert "install" in installed
    assert "curl" in installed.split()
