"""The durable journal is on by default (#15.6): with no ``[audit] dir`` the broker journals under
its state directory and generates the journal's keys at its first start (0600 in 0700), reuses
them afterwards, and only ``[audit] enabled = false`` turns the journal off."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest

from keybroker import settings as settings_mod
from keybroker.adapters.audit_keys import ensure_default_keys
from keybroker.adapters.audit_reader import decisions
from keybroker.devenv import DevEnv, mint_token
from keybroker.errors import ConfigurationError
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import BrokerProcess, run_cli

MINIMAL = """
[tls]
cert_file = "server.pem"
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_without_audit_section_the_journal_and_keys_default_to_the_state_directory(
    tmp_path: Path,
) -> None:
    config = tmp_path / "conf" / "keybroker.toml"
    config.parent.mkdir()
    config.write_text(MINIMAL)
    loaded = settings_mod.load(config, environ={})
    audit = loaded.audit
    assert loaded.state_dir() == config.parent.resolve()
    assert audit.dir == config.parent.resolve() / "journal"
    assert audit.chain_key_file == config.parent.resolve() / "audit" / "chain.key"
    assert audit.signing_key_file == config.parent.resolve() / "audit" / "checkpoint-signing.pem"
    assert audit.pseudonym_key_file == config.parent.resolve() / "audit" / "pseudonym.key"

    moved = settings_mod.load(config, environ={"KEYBROKER_STATE_DIR": str(tmp_path / "var")})
    assert moved.audit.dir == tmp_path / "var" / "journal"
    assert moved.audit.chain_key_file == tmp_path / "var" / "audit" / "chain.key"


def test_enabled_false_turns_the_journal_off_and_contradictions_stop_start_up(
    tmp_path: Path,
) -> None:
    config = tmp_path / "keybroker.toml"
    config.write_text(MINIMAL + "[audit]\nenabled = false\n")
    off = settings_mod.load(config, environ={})
    assert off.audit.dir is None and off.audit.chain_key_file is None
    with pytest.raises(ConfigurationError, match=r"enabled = false but \[audit\] dir is set"):
        settings_mod.load(config, environ={"KEYBROKER_AUDIT_DIR": str(tmp_path / "j")})


def test_explicit_settings_are_kept_as_given(tmp_path: Path) -> None:
    """An operator's [audit] dir and key files are used as written; unset key files and an
    HSM signing key label are respected too."""
    config = tmp_path / "keybroker.toml"
    config.write_text(
        MINIMAL
        + '[audit]\ndir = "/srv/journal"\nchain_key_file = "/etc/kb/chain"\n'
        + 'signing_key_label = "checkpoint"\npseudonymize = false\n'
    )
    audit = settings_mod.load(config, environ={}).audit
    assert audit.dir == Path("/srv/journal")
    assert audit.chain_key_file == Path("/etc/kb/chain")
    assert audit.signing_key_file is None  # the HSM key pair signs
    assert audit.pseudonym_key_file is None  # no pseudonyms, no key


def test_keys_are_generated_once_owner_only_and_only_at_the_default_paths(tmp_path: Path) -> None:
    config = tmp_path / "keybroker.toml"
    config.write_text(MINIMAL)
    loaded = settings_mod.load(config, environ={"KEYBROKER_STATE_DIR": str(tmp_path / "s")})
    layout = loaded.audit_layout()
    created = ensure_default_keys(loaded.audit, layout)
    assert set(created) == {
        layout.chain_key,
        layout.pseudonym_key,
        layout.signing_key,
        layout.signing_public_key,
    }
    assert _mode(layout.keys) == 0o700
    assert all(_mode(p) == 0o600 for p in created)
    chain_key, _signing = loaded.audit.load_keys()
    assert len(chain_key) == 32
    assert len(loaded.audit.load_pseudonym_key() or b"") == 32
    before = {p: p.read_bytes() for p in created}
    assert ensure_default_keys(loaded.audit, layout) == []  # a second start reuses them
    assert {p: p.read_bytes() for p in created} == before
    assert not list(layout.keys.glob(".*.tmp"))

    named = settings_mod.load(
        config,
        environ={
            "KEYBROKER_STATE_DIR": str(tmp_path / "t"),
            "KEYBROKER_AUDIT_CHAIN_KEY_FILE": str(tmp_path / "mine.key"),
        },
    )
    ensure_default_keys(named.audit, named.audit_layout())
    assert not (tmp_path / "mine.key").exists()  # a key the operator names is never made up


def _calls(env: DevEnv, port: int) -> tuple[int, int]:
    """One allowed call and one denied call (no token scope): (allowed, denied) = (1, 1)."""
    token = mint_token(env, scopes=["keys:generate"], purposes=["support"])
    refused = mint_token(env, scopes=["keys:unwrap"], purposes=["support"])
    with channel(env, port) as ch:
        stub(ch).GenerateDataKey(generate_request(), metadata=auth(token))
        with pytest.raises(grpc.RpcError):
            stub(ch).GenerateDataKey(generate_request(), metadata=auth(refused))
    return 1, 1


@pytest.mark.slow
def test_a_broker_without_audit_settings_journals_every_decision_durably(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """`keybroker serve` with no [audit] settings and two worker processes: the first start
    generates the keys (0600, directory 0700) once although both workers race for them, every
    decision is in the journal when its reply arrives, `keybroker audit verify` accepts the
    chains, and a second start reuses the keys and continues the journal."""
    assert "\n[audit]" not in devenv.config.read_text()  # the dev config relies on the default
    state = tmp_path / "state"
    overrides = {
        "KEYBROKER_STATE_DIR": str(state),
        "KEYBROKER_AUDIT_DIR": "",  # unset: BrokerProcess gives each broker its own by default
        "KEYBROKER_SERVER_PROCESSES": "2",
    }
    journal, keys = state / "journal", state / "audit"
    first = BrokerProcess(devenv, tmp_path / "first.log", overrides)
    try:
        port = first.wait_listening(count=2)
        generated = sorted(p.name for p in keys.iterdir())
        assert generated == [
            "chain.key",
            "checkpoint-signing.pem",
            "checkpoint-signing.pub.pem",
            "pseudonym.key",
        ]
        assert _mode(keys) == 0o700 and _mode(journal) == 0o700
        assert all(_mode(keys / name) == 0o600 for name in generated)
        key_bytes = {name: (keys / name).read_bytes() for name in generated}
        allowed, denied = _calls(devenv, port)
        # durable before the reply: the records are on disk while the broker still runs
        outcomes = [
            d.outcome.value for _ts, d in decisions(journal) if d.operation == "GenerateDataKey"
        ]
        assert outcomes.count("allow") == allowed and outcomes.count("deny") == denied
    finally:
        assert first.stop() == 0
    assert first.output().count("[audit] generated") == 1  # one process won each key

    verify_env = {"KEYBROKER_STATE_DIR": str(state)}
    verified = run_cli("audit", "verify", "--config", str(devenv.config), env=verify_env)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    second = BrokerProcess(devenv, tmp_path / "second.log", overrides)
    try:
        port = second.wait_listening(count=2)
        _calls(devenv, port)
    finally:
        assert second.stop() == 0
    assert "[audit] generated" not in second.output()
    assert {name: (keys / name).read_bytes() for name in key_bytes} == key_bytes
    outcomes = [
        d.outcome.value for _ts, d in decisions(journal) if d.operation == "GenerateDataKey"
    ]
    assert outcomes.count("allow") == 2 and outcomes.count("deny") == 2
    verified = run_cli(
        "audit", "verify", "--config", str(devenv.config),
        "--public-key", str(keys / "checkpoint-signing.pub.pem"), env=verify_env,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_enabled_false_serves_without_a_journal(devenv: DevEnv, tmp_path: Path) -> None:
    state = tmp_path / "state"
    broker = BrokerProcess(
        devenv,
        tmp_path / "b.log",
        {
            "KEYBROKER_STATE_DIR": str(state),
            "KEYBROKER_AUDIT_DIR": "",
            "KEYBROKER_AUDIT_ENABLED": "false",
        },
    )
    try:
        _calls(devenv, broker.wait_listening())
    finally:
        assert broker.stop() == 0
    assert "[audit] enabled = false: no durable journal" in broker.output()
    assert not (state / "journal").exists() and not (state / "audit").exists()
