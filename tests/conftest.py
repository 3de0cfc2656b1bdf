"""Fixtures: a real SoftHSM token, dev PKI and token issuer, and a real mTLS broker on port 0."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keybroker import settings as settings_mod
from keybroker.devenv import DevEnv, issue_cert, make_ca, mint_token, provision
from keybroker.server.app import RunningBroker, connect_hsm, create_server
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc
from tests.support.clients import channel, stub
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures
from tests.support.strict_pkcs11 import StrictModule
from tests.support.strict_pkcs11 import build as build_strict_module


class Clock:
    """Wall clock with an adjustable offset, so tests can move past a retention date."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="session")
def devenv(tmp_path_factory: pytest.TempPathFactory) -> DevEnv:
    """One provisioned environment (token, KEK recordings/v1, PKI, issuer) for the session."""
    env = provision(tmp_path_factory.mktemp("kb") / "state", listen="127.0.0.1:0")
    issue_cert(env.ca_cert, env.ca_key, env.cert("client2"), env.key("client2"), cn="other-storage")
    foreign = env.root / "foreign"
    foreign.mkdir()
    make_ca(foreign / "ca.pem", foreign / "ca.key", cn="foreign CA")
    issue_cert(
        foreign / "ca.pem",
        foreign / "ca.key",
        env.cert("foreign"),
        env.key("foreign"),
        cn="intruder",
    )
    return env


ENGINE = os.environ.get("KEYBROKER_SERVER_ENGINE", "loop")
"""The server engine the suite's brokers run: ``KEYBROKER_SERVER_ENGINE=grpc pytest tests/server``
runs the server tests on the ``grpc`` engine (``make test`` does both). Brokers started as
processes inherit the variable; :func:`load_settings` passes it on to brokers in this process."""


def load_settings(env: DevEnv, **overrides: str) -> settings_mod.Settings:
    environ = {
        "KEYBROKER_SERVER_ENGINE": ENGINE,
        "KEYBROKER_SERVER_LISTEN": "127.0.0.1:0",
        "KEYBROKER_HSM_HEALTH_INTERVAL": "0.2",
        # the suite's brokers see hundreds of denials a minute from one certificate, and its
        # tests look for each one's record: every denial on its own line (aggregation is
        # tested with its own threshold, tests/server/test_limits.py)
        "KEYBROKER_LIMITS_DENIALS_PER_MINUTE": "0",
    }
    environ.update({f"KEYBROKER_{k.upper()}": v for k, v in overrides.items()})
    return settings_mod.load(env.config, environ=environ)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh metadata database: each test using it runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'keybroker.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="session")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def broker(
    devenv: DevEnv, span_exporter: InMemorySpanExporter, clock: Clock
) -> Iterator[RunningBroker]:
    """The broker under test, in this process, with spans captured in memory."""
    running = create_server(
        load_settings(devenv), clock=clock, span_processor=SimpleSpanProcessor(span_exporter)
    )
    yield running
    running.stop(1)


@pytest.fixture(scope="session")
def strict_settings(strict_module: StrictModule) -> dict[str, str]:
    """Settings overrides that put the strict-HSM test module in front of the session's SoftHSM
    token (same token, PIN and keys; the module reads its environment at C_Initialize)."""
    os.environ.update(strict_module.environ(iv="generate", copy="refuse"))
    return {"hsm_module": str(strict_module.library)}


@pytest.fixture(scope="session")
def strict_broker(
    devenv: DevEnv,
    span_exporter: InMemorySpanExporter,
    clock: Clock,
    strict_settings: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningBroker]:
    """A second broker in this process on the same token through the strict-HSM test module
    (HSM-chosen GCM IVs, no C_CopyObject), with its own metadata database and journal."""
    state = tmp_path_factory.mktemp("strict-broker")
    running = create_server(
        load_settings(
            devenv,
            **strict_settings,
            state_url=f"sqlite:{state / 'keybroker.db'}",
            audit_dir=str(state / "journal"),
        ),
        clock=clock,
        span_processor=SimpleSpanProcessor(span_exporter),
    )
    yield running
    running.stop(1)


#: openCryptoki 3.23's software token as JSON ``{"module", "label", "pin_file"}``, set when these
#: tests run inside the Debian 13 root (tests/server/test_opencryptoki.py starts them there; not a
#: KEYBROKER_* name: the CLI the tests start refuses unknown ones).
OPENCRYPTOKI = os.environ.get("OPENCRYPTOKI_TEST_TOKEN", "")


@pytest.fixture(scope="session")
def opencryptoki_settings(devenv: DevEnv) -> dict[str, str]:
    """Settings overrides for openCryptoki 3.23's token (only inside the Debian 13 root), with
    the key the dev environment made on its SoftHSM token made on this token too."""
    ock = json.loads(OPENCRYPTOKI)
    overrides = {
        "hsm_module": ock["module"],
        "hsm_token_label": ock["label"],
        "hsm_pin_file": ock["pin_file"],
    }
    settings = load_settings(devenv, **overrides)
    keks = connect_hsm(settings)
    if not keks.versions(settings.keys.default):
        keks.create(settings.keys.default)
    return overrides


@pytest.fixture(scope="session")
def opencryptoki_broker(
    devenv: DevEnv,
    span_exporter: InMemorySpanExporter,
    clock: Clock,
    opencryptoki_settings: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningBroker]:
    """A broker in this process on openCryptoki 3.23's token (inside the Debian 13 root only),
    with its own metadata database and journal."""
    state = tmp_path_factory.mktemp("ock-broker")
    running = create_server(
        load_settings(
            devenv,
            **opencryptoki_settings,
            state_url=f"sqlite:{state / 'keybroker.db'}",
            audit_dir=str(state / "journal"),
        ),
        clock=clock,
        span_processor=SimpleSpanProcessor(span_exporter),
    )
    yield running
    running.stop(1)


@pytest.fixture
def hsm_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings overrides choosing the PKCS#11 module: SoftHSM2 unless a test parametrises this
    fixture indirectly with "strict" or "opencryptoki" (see HSM_MODULES)."""
    param = getattr(request, "param", "softhsm")
    if param == "strict":
        overrides: dict[str, str] = request.getfixturevalue("strict_settings")
        return overrides
    if param == "opencryptoki":
        overrides = request.getfixturevalue("opencryptoki_settings")
        return overrides
    return {}


#: The PKCS#11 modules lifecycle and retention tests run on (indirect params of hsm_settings):
#: openCryptoki 3.23 too inside the Debian 13 root.
HSM_MODULES = ("softhsm", "strict", *(("opencryptoki",) if OPENCRYPTOKI else ()))


@pytest.fixture
def spans(
    span_exporter: InMemorySpanExporter, clock: Clock
) -> Iterator[Callable[[], Sequence[ReadableSpan]]]:
    """Spans finished during the test."""
    span_exporter.clear()
    clock.offset = 0
    yield span_exporter.get_finished_spans
    clock.offset = 0


@pytest.fixture
def kb(devenv: DevEnv, broker: RunningBroker) -> Iterator[pb_grpc.KeyBrokerStub]:
    """A KeyBroker stub over mTLS with the dev client certificate."""
    with channel(devenv, broker.port) as ch:
        yield stub(ch)


TokenFactory = Callable[..., str]


@pytest.fixture
def token(devenv: DevEnv) -> TokenFactory:
    """Mint a token: token(scopes=[...], purposes=[...], **mint_token kwargs)."""

    def make(
        scopes: Sequence[str] = ("keys:generate", "keys:unwrap", "keys:rewrap"),
        purposes: Sequence[str] = ("support",),
        **kwargs: Any,
    ) -> str:
        return mint_token(devenv, scopes=scopes, purposes=purposes, **kwargs)

    return make


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """Run a call expected to fail; return its status code and message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    return err.code(), err.details()


@pytest.fixture
def root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def strict_module(tmp_path_factory: pytest.TempPathFactory) -> StrictModule:
    """The strict-HSM test module (tests/support/strict_pkcs11), built once per session."""
    return build_strict_module(tmp_path_factory.mktemp("strict-pkcs11"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an engine other than the loop, leave out the tests marked ``loop_only``: they test the
    loop itself and ran in the loop engine's pass (``make test`` runs both); deselected, not
    skipped, so the second pass reports only tests that ran."""
    if ENGINE == "loop":
        return
    kept = [item for item in items if item.get_closest_marker("loop_only") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept
