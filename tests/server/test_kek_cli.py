"""`keybroker kek`: the whole rotate -> migrate -> retire -> destroy cycle against a running broker,
as docs/OPERATIONS.md "Key lifecycle" shows it."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from keybroker.devenv import DevEnv, mint_token
from keybroker.server.app import RunningBroker, create_server
from tests.conftest import Clock, load_settings
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.process import run_cli

DAY = 86400


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def running(devenv: DevEnv, tmp_path: Path, clock: Clock) -> Iterator[RunningBroker]:
    settings = load_settings(
        devenv,
        state_url=f"sqlite:{tmp_path / 'keybroker.db'}",
        audit_dir=str(tmp_path / "journal"),
        state_usage_flush_interval="0.1",
        state_scheduler_interval="0.1",
        keys_retention_epochs="false",  # the cycle wraps under the key it manages
    )
    broker = create_server(settings, clock=clock)
    yield broker
    broker.stop(1)


def test_rotate_migrate_retire_destroy_with_the_cli(
    devenv: DevEnv, running: RunningBroker, tmp_path: Path, clock: Clock
) -> None:
    env = {"KEYBROKER_CLIENT_TARGET": f"127.0.0.1:{running.port}"}
    admin_token = tmp_path / "admin.token"
    admin_token.write_text(mint_token(devenv, scopes=["keys:admin"], amr=["mfa"]))
    rewrap_token = tmp_path / "rewrap.token"
    rewrap_token.write_text(mint_token(devenv, scopes=["keys:rewrap"]))
    name = f"calls-{uuid.uuid4().hex[:6]}"

    def kek(*args: str, token: Path = admin_token, code: int = 0) -> str:
        out = run_cli(
            "kek", *args, "--config", str(devenv.config), "--token-file", str(token), env=env
        )
        assert out.returncode == code, out.stderr
        return out.stdout if code == 0 else out.stderr

    def show() -> dict[str, object]:
        key: dict[str, object] = json.loads(kek("show", name, "--json"))
        return key

    created = json.loads(kek("create", name, "--rotation-period", "90d", "--json"))
    assert (created["current_version"], created["rotation_period_seconds"]) == (1, str(90 * DAY))

    # a storage service wraps keys under v1
    token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    keys_file = tmp_path / "keys.jsonl"
    with channel(devenv, running.port) as ch, keys_file.open("w") as fh:
        kb = stub(ch)
        for i in range(5):
            out = kb.GenerateWrappedDataKey(
                generate_request(f"rec-{i}", key_name=name), metadata=auth(token)
            )
            wrapped = base64.b64encode(out.wrapped_key).decode()
            fh.write(json.dumps({"recording_id": f"rec-{i}", "wrapped_key": wrapped}) + "\n")

    table = kek("rotate", name)
    assert f"key {name}: current version 2" in table
    assert "2*" in table and "enabled" in table

    migrated = tmp_path / "keys-v2.jsonl"
    summary = kek(
        "rewrap", "--input", str(keys_file), "--output", str(migrated), token=rewrap_token
    )
    assert "rewrapped 5, failed 0" in summary
    rows = [json.loads(line) for line in migrated.read_text().splitlines()]
    assert {r["key_version"] for r in rows} == {2}

    def usage(version: int) -> tuple[int, int]:
        versions: list[dict[str, str]] = show()["versions"]  # type: ignore[assignment]
        v = versions[version - 1]
        return int(v.get("wraps", 0)), int(v.get("unwraps", 0))

    deadline = time.monotonic() + 5
    while usage(1) != (5, 5) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert usage(1) == (5, 5)  # nothing but the migration read v1: safe to retire

    retired = kek("disable", name, "1", "--decrypt-only")
    assert "decrypt_only" in retired
    scheduled = json.loads(kek("schedule-destruction", name, "1", "--window", "1d", "--json"))
    assert scheduled["versions"][0]["state"] == "KEY_VERSION_STATE_SCHEDULED_FOR_DESTRUCTION"
    assert "FAILED_PRECONDITION" not in kek("cancel-destruction", name, "1")
    kek("schedule-destruction", name, "1", "--window", "1d")

    clock.offset = DAY + 60  # the window passes; the broker's scheduler destroys v1
    deadline = time.monotonic() + 5
    while show()["versions"][0]["state"] != "KEY_VERSION_STATE_DESTROYED":  # type: ignore[index]
        assert time.monotonic() < deadline, show()
        time.sleep(0.1)
    assert "destroyed" in kek("show", name)
    assert "destroyed" in kek("list")

    refused = kek("disable", name, "2", code=1)
    assert "current version" in refused
    assert "no key named" in kek("rotate", "no-such-key", code=1)
    no_mfa = tmp_path / "no-mfa.token"
    no_mfa.write_text(mint_token(devenv, scopes=["keys:admin"]))
    assert "multi-factor" in kek("list", token=no_mfa, code=1)


def test_kek_enable_make_current_adopts_a_version_found_on_the_token(
    devenv: DevEnv, running: RunningBroker, tmp_path: Path
) -> None:
    """`kek enable NAME VERSION --make-current` makes a version found on the token (adopted,
    enabled, not current) the current one, as docs/OPERATIONS.md "Key lifecycle" shows it."""
    from keybroker.core.wrapped_key import KeyRef

    env = {"KEYBROKER_CLIENT_TARGET": f"127.0.0.1:{running.port}"}
    admin_token = tmp_path / "admin.token"
    admin_token.write_text(mint_token(devenv, scopes=["keys:admin"], amr=["mfa"]))
    name = f"found-{uuid.uuid4().hex[:6]}"

    def kek(*args: str) -> str:
        out = run_cli(
            "kek", *args, "--config", str(devenv.config), "--token-file", str(admin_token), env=env
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    kek("create", name)
    running.keks.create_version(KeyRef(name, 2))  # appears on the token, no metadata
    assert running.lifecycle is not None
    running.lifecycle.reconcile(full=True)
    assert json.loads(kek("show", name, "--json"))["current_version"] == 1
    table = kek("enable", name, "2", "--make-current")
    assert f"key {name}: current version 2" in table
