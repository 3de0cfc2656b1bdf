"""deploy/postgres/roles.sql on a real PostgreSQL server: `keybroker migrate` as the migrator role
applies the schema; the broker as the runtime role (no DDL rights, ``[state] migrate = false``)
refuses to start before that and serves generate, unwrap and an erasure after it."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest

from keybroker.adapters.sqldb import SCHEMA_VERSION
from keybroker.cli.main import main
from keybroker.devenv import DevEnv, mint_token
from keybroker.errors import ConfigurationError
from keybroker.server.app import create_server
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import privacy_pb2 as ppb
from keybroker.v1 import privacy_pb2_grpc as ppb_grpc
from tests.conftest import load_settings
from tests.support.clients import auth, channel, generate_request, stub

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "roles.sql"


def _as(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


@pytest.fixture
def roles_db(postgres_url: str) -> tuple[str, str]:
    """A fresh database with roles.sql applied (twice: it must be re-runnable)."""
    with psycopg.connect(postgres_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(ROLES_SQL.read_text())
        conn.execute(ROLES_SQL.read_text())
    return _as(postgres_url, "keybroker_migrator"), _as(postgres_url, "keybroker_runtime")


def _settings(devenv: DevEnv, tmp_path: Path, url: str, migrate: str) -> Any:
    return load_settings(
        devenv,
        state_url=url,
        state_migrate=migrate,
        audit_dir=str(tmp_path / f"journal-{uuid.uuid4().hex[:6]}"),
        keys_retention_epochs="false",
    )


def test_runtime_role_cannot_change_the_schema(roles_db: tuple[str, str]) -> None:
    """The runtime role has no DDL rights, in the broker's schema or in public."""
    _, runtime = roles_db
    with psycopg.connect(runtime, autocommit=True, connect_timeout=10) as conn:
        for ddl in ("CREATE TABLE kb_x (a int)", "CREATE TABLE public.kb_x (a int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(ddl)


def test_migrate_then_serve_as_runtime_role(
    devenv: DevEnv,
    roles_db: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    migrator, runtime = roles_db
    # Before the migration the runtime broker refuses to start and names the fix.
    with pytest.raises(ConfigurationError, match="keybroker migrate"):
        create_server(_settings(devenv, tmp_path, runtime, "false"))
    # With migrate = true the runtime role would need DDL: it cannot.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        create_server(_settings(devenv, tmp_path, runtime, "true"))

    monkeypatch.setenv("KEYBROKER_STATE_URL", migrator)
    assert main(["migrate", "--config", str(devenv.config), "--check"]) == 1
    assert main(["migrate", "--config", str(devenv.config)]) == 0
    assert main(["migrate", "--config", str(devenv.config)]) == 0
    assert main(["migrate", "--config", str(devenv.config), "--check"]) == 0
    out = capsys.readouterr().out
    assert (
        f"schema v0 -> v{SCHEMA_VERSION}" in out and f"schema v{SCHEMA_VERSION}: up to date" in out
    )
    monkeypatch.delenv("KEYBROKER_STATE_URL")

    running = create_server(_settings(devenv, tmp_path, runtime, "false"))
    try:
        data = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
        dpo = mint_token(devenv, scopes=["privacy:erase"], amr=["mfa"], subject="dpo-1")
        with channel(devenv, running.port, own_connection=True) as ch:
            kb = stub(ch)
            privacy = ppb_grpc.PrivacyStub(ch)  # type: ignore[no-untyped-call]
            rec = f"rec-{uuid.uuid4().hex[:10]}"
            made = kb.GenerateDataKey(generate_request(rec), metadata=auth(data))
            unwrap = pb.UnwrapDataKeyRequest(
                recording_id=rec, wrapped_key=made.wrapped_key, purpose="support"
            )
            assert kb.UnwrapDataKey(unwrap, metadata=auth(data)).data_key == made.data_key
            receipt = privacy.EraseRecording(
                ppb.EraseRecordingRequest(recording_id=rec, reason="art. 17"), metadata=auth(dpo)
            )
            assert receipt.audit_reference.startswith("erasure:")
            with pytest.raises(grpc.RpcError) as refused:
                kb.UnwrapDataKey(unwrap, metadata=auth(data))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        running.stop(1)
    # The tables belong to the migrator: the runtime role only wrote rows.
    with psycopg.connect(migrator, autocommit=True, connect_timeout=10) as conn:
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'keybroker'"
        ).fetchall()
        erased = conn.execute("SELECT count(*) FROM kb_erasures").fetchone()
    assert owners == [("keybroker_migrator",)]
    assert erased == (1,)
