"""docs/CLIENT.md's ten-line integration runs as written against a real broker (only the
deployment's addresses and paths are swapped for the test's)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from keybroker.devenv import DevEnv
from keybroker.server.app import RunningBroker
from tests.conftest import TokenFactory

GUIDE = Path(__file__).resolve().parent.parent.parent / "docs" / "CLIENT.md"


def _block_after(heading: str) -> str:
    text = GUIDE.read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, heading
    return match.group(1)


def test_the_ten_line_integration_runs(
    devenv: DevEnv, broker: RunningBroker, token: TokenFactory, tmp_path: Path
) -> None:
    """Encrypt call.wav to call.kbr and play it back; the output is the input."""
    code = _block_after("## The ten-line integration")
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    (tmp_path / "token").write_text(token() + "\n")
    swaps = {
        "dns:///keybroker-headless.keys.svc:50051": f"127.0.0.1:{broker.port}",
        "/etc/kb/ca.pem": str(devenv.ca_cert),
        "/etc/kb/svc.pem": str(devenv.cert("client")),
        "/etc/kb/svc.key": str(devenv.key("client")),
        "/run/secrets/keybroker-token": str(tmp_path / "token"),
    }
    for old, new in swaps.items():
        assert old in code, old
        code = code.replace(old, new)
    audio = os.urandom(300_000)
    (tmp_path / "call.wav").write_bytes(audio)
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        namespace: dict[str, object] = {}
        exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102 - the doc's own example
    finally:
        os.chdir(cwd)
    assert (tmp_path / "call.kbr").read_bytes()[:5] == b"KBREC"
    assert (tmp_path / "played.wav").read_bytes() == audio
