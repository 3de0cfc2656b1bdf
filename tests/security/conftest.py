"""Fixtures of the security regression tests: brokers of their own (SQLite store, journal and
span capture in the test's directory) on the session's SoftHSM token, real mTLS, real JWTs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keybroker.core.wrapped_key import KeyRef
from keybroker.devenv import DevEnv
from keybroker.server.app import RunningBroker, connect_hsm, create_server
from tests.conftest import Clock, load_settings
from tests.security.support import Caller

Start = Callable[..., RunningBroker]


@pytest.fixture
def own_clock() -> Clock:
    return Clock()


@pytest.fixture
def own_spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def start(
    devenv: DevEnv, tmp_path: Path, own_clock: Clock, own_spans: InMemorySpanExporter
) -> Iterator[Start]:
    """start(name="a", store=None, **settings overrides): a broker in this process with the
    journal ``<name>/journal`` and the SQLite database ``<store or name>.db`` (replicas share a
    store). Stopped after the test."""
    started: list[RunningBroker] = []

    def make(name: str = "a", store: str | None = None, **overrides: str) -> RunningBroker:
        settings = {
            "state_url": f"sqlite:{tmp_path / f'{store or name}.db'}",
            "audit_dir": str(tmp_path / name / "journal"),
            **overrides,
        }
        broker = create_server(
            load_settings(devenv, **settings),
            clock=own_clock,
            span_processor=SimpleSpanProcessor(own_spans),
        )
        started.append(broker)
        return broker

    yield make
    for broker in reversed(started):
        broker.stop(0)


@pytest.fixture
def caller_of(devenv: DevEnv) -> Iterator[Callable[[RunningBroker], Caller]]:
    callers: list[Caller] = []

    def make(broker: RunningBroker) -> Caller:
        callers.append(Caller(devenv, broker.port))
        return callers[-1]

    yield make
    for c in callers:
        c.close()


@pytest.fixture
def base_key(devenv: DevEnv) -> Iterator[str]:
    """A key of this test's own (version 1 made on the token; a broker adopts it), so one-day
    retention epochs never touch other tests' keys. Its versions and epoch keys are destroyed
    afterwards."""
    keks = connect_hsm(load_settings(devenv))
    name = f"sec-{uuid.uuid4().hex[:8]}"
    keks.create_version(KeyRef(name, 1))
    yield name
    for ref in keks.versions_on_token():
        if ref.name.startswith(name):
            keks.destroy_version(ref)


#: settings for a broker with one-day retention epochs whose shredder the test drives itself
DAY_EPOCHS = {
    "keys_retention_epoch": "1d",
    "keys_retention_grace": "1h",
    "state_scheduler_interval": "3600",
}
