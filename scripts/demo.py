"""`make demo`: a storage service protecting a voice recording, against the broker `make run` started.

1. synthesise a WAV recording (espeak-ng speech when installed, else a generated tone);
2. encrypt it with `keybroker encrypt` for the purpose it was collected for (support);
3. decrypt it for support and compare;
4. try to decrypt it for marketing (a purpose the recording was not collected for): refused;
5. a data-protection officer places a legal hold: erasing the recording is refused; the hold is
   released, the recording erased, and decrypting it is refused from then on;
6. print the decision spans of all of it from the broker's span file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time
import uuid
import wave
from pathlib import Path

from keybroker import settings
from keybroker.devenv import DevEnv

BIN = Path(sys.executable).parent
SPANS = 8  # encrypt, decrypt, marketing refused, hold, erase refused, release, erase, refused


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def make_recording(path: Path) -> None:
    if shutil.which("espeak-ng"):
        text = "Hello, this is a recorded support call. Your ticket number is four two."
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        return
    rate, seconds = 16000, 3
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        notes = [440.0, 554.37, 659.25]
        frames = bytearray()
        for i in range(rate * seconds):
            freq = notes[(i * len(notes)) // (rate * seconds)]
            frames += struct.pack("<h", int(12000 * math.sin(2 * math.pi * freq * i / rate)))
        wav.writeframes(bytes(frames))


def run(*args: str, expect: int = 0, env: dict[str, str] | None = None) -> str:
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    print(f"$ {prefix + ' ' if prefix else ''}keybroker " + shlex.join(args), flush=True)
    out = subprocess.run(
        [str(BIN / "keybroker"), *args],
        capture_output=True, text=True, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip
    text = (out.stdout + out.stderr).rstrip()
    print(text)
    if out.returncode != expect:
        raise SystemExit(f"demo: exit code {out.returncode}, expected {expect}")
    return text


def spans_for(
    span_file: Path, recording_id: str, expected: int, timeout: float = 10
) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        found = []
        if span_file.exists():
            for line in span_file.read_text().splitlines():
                span = json.loads(line)
                if span.get("attributes", {}).get("keybroker.recording.id") == recording_id:
                    found.append(span)
        if len(found) >= expected:
            break
        time.sleep(0.25)
    return found


def privacy_plane(cfg: list[str], dpo_token: Path, recording_id: str, sealed: Path) -> None:
    """Legal hold, an erasure refused under it, release, erasure, and the unwrap refused."""
    work = sealed.parent
    dpo = [*cfg, "--token-file", str(dpo_token)]
    say("A court case: the data-protection officer places a legal hold on the recording")
    run("privacy", "hold", "--recording", recording_id, "--reason", "case 2026-17", *dpo)

    say("An erasure request arrives while the hold is in place: refused")
    held = run("privacy", "erase-recording", recording_id, "--reason", "art. 17 request 4711",
               *dpo, expect=1)  # fmt: skip
    if "legal" not in held:
        raise SystemExit("demo: the erasure was not refused for the legal hold")

    say("The case is closed: the hold is released and the recording erased")
    run("privacy", "release", "--recording", recording_id, *dpo)
    run("privacy", "erase-recording", recording_id, "--reason", "art. 17 request 4711", *dpo)

    say("Support tries to play the recording again: refused, it is erased (crypto-shredded)")
    after = work / f"{recording_id}.after-erasure.wav"
    gone = run("decrypt", *cfg, "--purpose", "support", str(sealed), str(after), expect=1)
    if "erased" not in gone:
        raise SystemExit("demo: the refusal did not come from the erasure")
    print(f"no plaintext left behind: {not after.exists()}")


def _key(attributes: dict[str, object]) -> str:
    name = attributes.get("keybroker.key.name")
    return f"{name}/v{attributes.get('keybroker.key.version', '')}" if name else "-"


def show_spans(span_file: Path, recording_id: str) -> int:
    """Print the recording's decision spans; 1 if fewer than the demo made."""
    say("The decision spans of all of it (from the broker's span file)")
    spans = spans_for(span_file, recording_id, expected=SPANS)
    print(
        f"{'time (UTC)':<26} {'operation':<16} {'decision':<8} {'reason':<18} {'purposes':<10} {'who':<14} key"
    )
    for span in spans:
        a = span["attributes"]
        assert isinstance(a, dict)
        print(
            f"{str(span['start_time'])[:26]:<26} {a.get('rpc.method', ''):<16} {a.get('keybroker.decision', ''):<8} "
            f"{a.get('keybroker.reason', ''):<18} {','.join(a.get('keybroker.purposes', [])):<10} "
            f"{a.get('keybroker.principal.sub', ''):<14} {_key(a)}"
        )
    if len(spans) < SPANS:
        print(f"demo: expected {SPANS} decision spans in {span_file}, found {len(spans)}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=Path(".keybroker"))
    args = parser.parse_args()
    # Absolute once, here: paths handed to the broker's settings (KEYBROKER_CLIENT_TOKEN_FILE)
    # would otherwise be resolved again against the TOML file's folder.
    env = DevEnv(args.state_dir.resolve())
    if not env.config.exists():
        raise SystemExit("demo: no dev environment; run `make run` in another terminal first")
    config = settings.load(env.config)
    work = env.root / "demo"
    work.mkdir(exist_ok=True)
    recording_id = f"call-{uuid.uuid4().hex[:8]}"
    cfg = ["--config", str(env.config)]

    say("A storage service gets a token for support work, and marketing gets one for marketing")
    token_file = config.client.token_file or env.root / "client.token"
    dev = ["dev", "token", "--state-dir", str(env.root)]
    run(*dev, "--scope", "keys:generate keys:unwrap", "--purpose", "support",
        "--output", str(token_file))  # fmt: skip
    marketing_token = work / "marketing.token"
    run(*dev, "--scope", "keys:unwrap", "--purpose", "marketing", "--subject", "marketing-app",
        "--output", str(marketing_token))  # fmt: skip
    dpo_token = work / "dpo.token"
    run(*dev, "--scope", "privacy:erase privacy:hold", "--amr", "mfa", "--subject", "dpo",
        "--output", str(dpo_token))  # fmt: skip

    say("Record a call")
    wav = work / f"{recording_id}.wav"
    make_recording(wav)
    print(
        f"{wav}: {wav.stat().st_size} bytes, sha256 {hashlib.sha256(wav.read_bytes()).hexdigest()[:16]}…"
    )

    say("Encrypt it for the purpose it was collected for (support)")
    sealed = work / f"{recording_id}.kbr"
    run("encrypt", *cfg, "--recording-id", recording_id, "--purpose", "support",
        "--subject", "subject-42", "--retain-days", "90", str(wav), str(sealed))  # fmt: skip
    run("inspect", str(sealed))

    say("Decrypt it for support, and compare")
    restored = work / f"{recording_id}.restored.wav"
    run("decrypt", *cfg, "--purpose", "support", str(sealed), str(restored))
    same = restored.read_bytes() == wav.read_bytes()
    print("identical to the original" if same else "MISMATCH")
    if not same:
        return 1

    say("Marketing tries to use the recording: refused, it was not collected for marketing")
    refused = work / f"{recording_id}.marketing.wav"
    refusal = run(
        "decrypt", *cfg, "--purpose", "marketing", str(sealed), str(refused),
        expect=1, env={"KEYBROKER_CLIENT_TOKEN_FILE": str(marketing_token)},
    )  # fmt: skip
    if "not among the recording's purposes" not in refusal:
        raise SystemExit("demo: the refusal did not come from the purpose rule")
    print(f"no plaintext left behind: {not refused.exists()}")

    privacy_plane(cfg, dpo_token, recording_id, sealed)

    return show_spans(config.telemetry.span_file or env.root / "spans.jsonl", recording_id)


if __name__ == "__main__":
    sys.exit(main())
