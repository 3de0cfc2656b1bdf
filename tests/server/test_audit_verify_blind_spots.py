"""`keybroker audit verify` has no blind spots (issue #14, item 9): removed oldest files, archived
ranges, missing worker directories, a pinned public key, and checkpoints signed in the HSM."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keybroker import settings as settings_mod
from keybroker.adapters.checkpoint_keys import public_pem
from keybroker.adapters.journal import Journal, JournalConfig, journal_files
from keybroker.core.decision import Decision, Outcome
from keybroker.devenv import DevEnv, mint_token, provision
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, run_cli

FUTURE = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()


def _decision(i: int) -> Decision:
    return Decision(
        service="keybroker.v1.KeyBroker",
        operation="UnwrapDataKey",
        outcome=Outcome.ALLOW,
        reason="ok",
        recording_id=f"rec-{i}",
    )


def rotated_journal(devenv: DevEnv, root: Path, chain: str = "w0", records: int = 60) -> Path:
    """A chain of several files (rotated every ~2 KiB) with checkpoints along the way."""
    key, signing = settings_mod.load(devenv.config, environ={}).audit.load_keys()
    journal = Journal(JournalConfig(root / chain, key, signing, max_file_bytes=2048))
    for i in range(records):
        journal.record(_decision(i))
        if i % 20 == 19:
            journal.checkpoint()
    journal.close()
    assert len(journal_files(root / chain)) >= 4
    return root / chain


def audit(
    devenv: DevEnv, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli("audit", *args, "--config", str(config or devenv.config))


def _first_seq(path: Path) -> int:
    return int(path.stem.split("-")[1])


def test_removed_oldest_files_do_not_pass_silently(devenv: DevEnv, tmp_path: Path) -> None:
    """Deleting a chain's oldest files by hand is reported (exit 1), naming the missing range."""
    chain = rotated_journal(devenv, tmp_path)
    files = journal_files(chain)
    for path in files[:2]:
        path.unlink()
    gone = _first_seq(files[2]) - 1
    out = audit(devenv, "verify", "--dir", str(tmp_path))
    assert out.returncode == 1, out.stdout
    assert (
        f"w0: TAMPERED at {files[2].name}:1: records 1..{gone} are missing and no archive record "
        "accounts for them" in out.stdout
    )


def test_archived_files_are_recorded_and_reported(devenv: DevEnv, tmp_path: Path) -> None:
    """`audit archive --to` moves all but the newest file after recording each in the signed
    archive records; verify then reports the archived range and passes."""
    root, store = tmp_path / "journal", tmp_path / "offline"
    chain = rotated_journal(devenv, root)
    files = journal_files(chain)
    out = audit(devenv, "archive", "--dir", str(root), "--before", FUTURE, "--to", str(store))
    assert out.returncode == 0, out.stderr
    last = _first_seq(files[-1]) - 1
    assert f"w0: records 1..{last} ({len(files) - 1} files) archived" in out.stdout
    assert journal_files(chain) == [files[-1]]
    moved = sorted((store / "w0").iterdir())
    assert [p.name for p in moved] == [p.name for p in files[:-1]]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in moved)
    out = audit(devenv, "verify", "--dir", str(root))
    assert out.returncode == 0, out.stdout
    assert f"w0: OK: records 1..{_first_seq(files[1]) - 1} archived to {moved[0]}" in out.stdout
    assert f"records {last + 1}..64 intact" in out.stdout
    # the archive records are themselves tamper-evident
    archive = chain / "archive.jsonl"
    lines = archive.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["to"] = "/somewhere/else"
    lines[0] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    archive.write_bytes(b"".join(lines))
    out = audit(devenv, "verify", "--dir", str(root))
    assert out.returncode == 1
    assert "w0: TAMPERED at archive.jsonl:1: archive record 1 was modified" in out.stdout
    archive.unlink()  # removing the archive records does not hide the removal either
    out = audit(devenv, "verify", "--dir", str(root))
    assert out.returncode == 1
    assert f"records 1..{last} are missing and no archive record accounts for them" in out.stdout


def test_deleted_files_are_recorded_and_reported(devenv: DevEnv, tmp_path: Path) -> None:
    """`audit archive --delete` records the deletion; verify reports it and passes."""
    chain = rotated_journal(devenv, tmp_path)
    files = journal_files(chain)
    out = audit(devenv, "archive", "--dir", str(tmp_path), "--before", FUTURE, "--delete")
    assert out.returncode == 0, out.stderr
    assert journal_files(chain) == [files[-1]]
    out = audit(devenv, "verify", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stdout
    assert f"w0: OK: records 1..{_first_seq(files[1]) - 1} deleted by" in out.stdout


def test_archive_keeps_files_newer_than_before(devenv: DevEnv, tmp_path: Path) -> None:
    """Only whole files whose last record is older than --before go; nothing else changes."""
    chain = rotated_journal(devenv, tmp_path)
    files = journal_files(chain)
    out = audit(devenv, "archive", "--dir", str(tmp_path), "--before", "2001-01-01", "--delete")
    assert out.returncode == 0, out.stderr
    assert "w0: nothing to archive" in out.stdout
    assert journal_files(chain) == files
    assert not (chain / "archive.jsonl").exists()


def test_a_gap_from_before_archive_records_can_be_acknowledged(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """The path for journals whose oldest files were removed before this version: record the
    gap once (`--record-missing`); verify then reports it and passes."""
    chain = rotated_journal(devenv, tmp_path)
    files = journal_files(chain)
    files[0].unlink()
    gone = _first_seq(files[1]) - 1
    assert audit(devenv, "verify", "--dir", str(tmp_path)).returncode == 1
    out = audit(
        devenv, "archive", "--dir", str(tmp_path), "--record-missing", "--reason", "pre-2027 purge"
    )
    assert out.returncode == 0, out.stderr
    assert f"w0: records 1..{gone} recorded as missing" in out.stdout
    out = audit(devenv, "verify", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stdout
    assert f"w0: OK: records 1..{gone} recorded as missing by" in out.stdout


def test_a_missing_worker_directory_is_reported(devenv: DevEnv, tmp_path: Path) -> None:
    """A worker's chain that disappears is reported (exit 1), whether the register of chains,
    a numbering gap, or (for journals without a register) [server] processes says it existed."""
    for name in ("w0", "w1", "w2"):
        rotated_journal(devenv, tmp_path, name, records=30)
    assert audit(devenv, "verify", "--dir", str(tmp_path)).returncode == 0
    shutil.rmtree(tmp_path / "w2")
    out = audit(devenv, "verify", "--dir", str(tmp_path))
    assert out.returncode == 1
    assert (
        f"w2: MISSING: worker directory {tmp_path / 'w2'} not found (listed in chains.jsonl)"
        in (out.stdout)
    )
    shutil.rmtree(tmp_path / "w0")  # a gap in the numbering, even without the register
    (tmp_path / "chains.jsonl").unlink()
    out = run_cli(
        "audit", "verify", "--config", str(devenv.config), "--dir", str(tmp_path),
        env={"KEYBROKER_SERVER_PROCESSES": "0"},  # one per CPU: says nothing about the count
    )  # fmt: skip
    assert out.returncode == 1
    assert "w0: MISSING" in out.stdout and "(w1 exists)" in out.stdout
    legacy = tmp_path / "legacy"
    rotated_journal(devenv, legacy, "w0", records=30)
    (legacy / "chains.jsonl").unlink()
    out = run_cli(
        "audit", "verify", "--config", str(devenv.config), "--dir", str(legacy),
        env={"KEYBROKER_SERVER_PROCESSES": "2"},
    )  # fmt: skip
    assert out.returncode == 1
    assert "w1: MISSING" in out.stdout and "([server] processes = 2)" in out.stdout


def _auditor_config(devenv: DevEnv, directory: Path) -> Path:
    """An auditor's settings: the journal and the chain key, no signing key at all."""
    config = directory / "auditor.toml"
    config.write_text(f'[audit]\nchain_key_file = "{devenv.chain_key}"\n')
    return config


def test_verify_against_a_pinned_public_key(devenv: DevEnv, tmp_path: Path) -> None:
    """An auditor verifies with only the chain key and a pinned public key: the signing key is
    neither needed nor read, and a journal signed by another key fails."""
    rotated_journal(devenv, tmp_path / "journal")
    config = _auditor_config(devenv, tmp_path)
    pinned = tmp_path / "pinned.pem"
    pinned.write_bytes(devenv.checkpoint_public_key.read_bytes())
    out = audit(
        devenv, "verify", "--dir", str(tmp_path / "journal"), "--public-key", str(pinned),
        config=config,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checking signatures against pinned key sha256:" in out.stdout
    assert "w0: OK: records 1..64 intact, 4 signed checkpoints" in out.stdout
    other = tmp_path / "other.pem"
    other.write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    out = audit(
        devenv, "verify", "--dir", str(tmp_path / "journal"), "--public-key", str(other),
        config=config,
    )  # fmt: skip
    assert out.returncode == 1
    assert "checkpoint signature invalid" in out.stdout


@pytest.fixture(scope="module")
def hsm_env(tmp_path_factory: pytest.TempPathFactory) -> DevEnv:
    """A dev environment of its own whose settings keep the checkpoint key in the HSM (the
    tests set [audit] signing_key_label: the default journal then takes no signing key file)."""
    env = provision(tmp_path_factory.mktemp("hsm-signing") / "state", listen="127.0.0.1:0")
    assert "signing_key_file" not in env.config.read_text()
    return env


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256"])
def test_checkpoints_signed_in_the_hsm_verify(
    hsm_env: DevEnv, tmp_path: Path, algorithm: str
) -> None:
    """With [audit] signing_key_label, a real broker signs its checkpoints inside the HSM
    (EdDSA or ECDSA P-256 through PKCS#11); verify checks them against the HSM's public key and
    against the same key pinned on the command line, and refuses another pinned key."""
    label = {"KEYBROKER_AUDIT_SIGNING_KEY_LABEL": f"checkpoint-{algorithm}"}
    created = run_cli(
        "audit", "signing-key", "create", "--algorithm", algorithm,
        "--output", str(tmp_path / "pub.pem"), "--config", str(hsm_env.config), env=label,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    again = run_cli("audit", "signing-key", "create", "--config", str(hsm_env.config), env=label)
    assert again.returncode == 2 and "already exists" in again.stderr
    shown = run_cli("audit", "public-key", "--config", str(hsm_env.config), env=label)
    assert shown.stdout.encode() == (tmp_path / "pub.pem").read_bytes()
    journal = tmp_path / "journal"
    broker = BrokerProcess(
        hsm_env, tmp_path / "b.log", {**label, "KEYBROKER_AUDIT_DIR": str(journal)}
    )
    try:
        port = broker.wait_listening()
        token = mint_token(hsm_env, scopes=["keys:generate"], purposes=["support"])
        with channel(hsm_env, port) as ch:
            stub(ch).GenerateDataKey(generate_request(), metadata=auth(token))
    finally:
        assert broker.stop() == 0  # the final checkpoint is signed in the HSM
    for pinned in ([], ["--public-key", str(tmp_path / "pub.pem")]):
        out = run_cli(
            "audit", "verify", "--dir", str(journal), *pinned, "--config", str(hsm_env.config),
            env=label,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert "signed checkpoints" in out.stdout and " 0 signed" not in out.stdout
    other = tmp_path / "other.pem"
    other.write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    out = run_cli(
        "audit", "verify", "--dir", str(journal), "--public-key", str(other),
        "--config", str(hsm_env.config), env=label,
    )  # fmt: skip
    assert out.returncode == 1
    assert "checkpoint signature invalid" in out.stdout


def test_anchors_directory_is_checked_per_chain(devenv: DevEnv, tmp_path: Path) -> None:
    """`--anchors DIR` holds each chain's off-host checkpoints: a chain cut below its own anchor
    is caught, a chain known only to the anchors is MISSING, and a single anchors file is refused
    when there are several chains (it used to be applied to every chain)."""
    root, offhost = tmp_path / "journal", tmp_path / "offhost"
    for name in ("w0", "w1"):
        chain = rotated_journal(devenv, root, name, records=30)
        (offhost / name).mkdir(parents=True)
        shutil.copy(chain / "checkpoints.jsonl", offhost / name / "checkpoints.jsonl")
    out = audit(devenv, "verify", "--dir", str(root), "--anchors", str(offhost))
    assert out.returncode == 0, out.stdout
    newest = journal_files(root / "w1")[-1]
    newest.write_bytes(b"".join(newest.read_bytes().splitlines(keepends=True)[:-1]))
    (root / "w1" / "checkpoints.jsonl").write_bytes(b"")  # the local anchors cut as well
    shutil.copytree(offhost / "w0", offhost / "w5")
    out = audit(devenv, "verify", "--dir", str(root), "--anchors", str(offhost))
    assert out.returncode == 1
    assert "w1: TAMPERED at checkpoints.jsonl:2: journal truncated" in out.stdout
    assert "w5: MISSING" in out.stdout and f"(anchored in {offhost})" in out.stdout
    single = offhost / "w0" / "checkpoints.jsonl"
    out = audit(devenv, "verify", "--dir", str(root), "--anchors", str(single))
    assert out.returncode == 2
    assert "--anchors: with several chains give a directory" in out.stderr


SIGN_ACROSS_REINIT = """
import json, sys
import pkcs11
from keybroker import settings
from keybroker.adapters.checkpoint_keys import hsm_signer_config, signature_check
from keybroker.adapters.hsm_signer import HsmSigner
s = settings.load(__import__("pathlib").Path(sys.argv[1]))
signer = HsmSigner(hsm_signer_config(s))
check = signature_check(signer.public_key())
first = signer.sign(b"before")
pkcs11.lib(s.hsm.module).reinitialize()  # what the HSM adapter does to recover a lost token
second = signer.sign(b"after")
print(json.dumps([check(b"before", first), check(b"after", second), check(b"after", first)]))
"""


def test_the_hsm_signer_reopens_its_session_after_a_reinitialise(
    hsm_env: DevEnv, tmp_path: Path
) -> None:
    """A module re-initialise (the HSM adapter's recovery) invalidates every session; the signer
    opens a new one and keeps signing."""
    label = {"KEYBROKER_AUDIT_SIGNING_KEY_LABEL": "checkpoint-reinit"}
    created = run_cli("audit", "signing-key", "create", "--config", str(hsm_env.config), env=label)
    assert created.returncode == 0, created.stderr
    done = subprocess.run(
        [sys.executable, "-c", SIGN_ACROSS_REINIT, str(hsm_env.config)],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **label},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [True, True, False]
