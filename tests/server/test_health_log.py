"""Health says in the log which dependency made it NOT_SERVING, and when it serves again (an
operator, or a failed test run, sees why without a debugger)."""

from __future__ import annotations

import logging

import pytest
from grpc_health.v1 import health, health_pb2

from keybroker.server.health import Health


def test_not_serving_names_the_dependencies_that_are_down(caplog: pytest.LogCaptureFixture) -> None:
    servicer = health.HealthServicer()
    state = Health(servicer, ["keybroker.v1.KeyBroker"])
    starting = state.watch("starting", False)
    hsm = state.watch("hsm", True)
    journal = state.watch("journal", True)
    with caplog.at_level(logging.INFO, logger="keybroker.server.health"):
        state.publish()
        starting(True)  # start-up is not an outage: nothing logged
        assert caplog.messages == []
        hsm(False)
        journal(False)
        journal(True)
        hsm(True)
    assert caplog.messages == [
        "health: NOT_SERVING (hsm)",
        "health: NOT_SERVING (hsm, journal)",
        "health: NOT_SERVING (hsm)",
        "health: SERVING again",
    ]
    request = health_pb2.HealthCheckRequest(service="keybroker.v1.KeyBroker")
    answer = servicer.Check(request, None)  # type: ignore[arg-type]
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
