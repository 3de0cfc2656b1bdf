"""Observability operators expect (#15.7): JSON log lines carrying the caller's trace ids, a
Prometheus scrape endpoint per worker with the state gauges, and a ``service.instance.id`` of
its own for every worker process — each against a real `keybroker serve` over mTLS."""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keybroker import settings as settings_mod
from keybroker.adapters.prometheus import check_ports, worker_address
from keybroker.devenv import DevEnv, mint_token
from keybroker.errors import ConfigurationError
from keybroker.server import logs
from keybroker.v1 import keybroker_pb2 as pb
from tests.support.clients import auth, channel, generate_request, stub
from tests.support.otlp import Receiver
from tests.support.process import BrokerProcess, free_port

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \d+ ")


def _round_trip(env: DevEnv, port: int, token: str) -> tuple[bytes, bytes]:
    """Generate then unwrap one data key with the caller's traceparent; (key, wrapped key)."""
    metadata = (*auth(token), ("traceparent", TRACEPARENT))
    with channel(env, port, own_connection=True) as ch:  # a connection of its own: any worker
        kb = stub(ch)
        request = generate_request()
        gen = kb.GenerateDataKey(request, metadata=metadata)
        kb.UnwrapDataKey(
            pb.UnwrapDataKeyRequest(
                recording_id=request.recording_id, wrapped_key=gen.wrapped_key, purpose="support"
            ),
            metadata=metadata,
        )
    return gen.data_key, gen.wrapped_key


@pytest.mark.slow
def test_json_log_lines_parse_and_carry_the_callers_trace_ids(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """`log_format = "json"` at DEBUG: every line the broker's logging writes is one JSON object
    with the documented fields; the per-call lines carry the caller's trace_id and span_id and
    the worker; no line holds the token, the data key or the wrapped key."""
    proc = BrokerProcess(
        devenv,
        tmp_path / "b.log",
        {
            "KEYBROKER_TELEMETRY_LOG_FORMAT": "json",
            "KEYBROKER_TELEMETRY_LOG_LEVEL": "DEBUG",
            "KEYBROKER_SERVER_PROCESSES": "2",
            "KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{free_port()}",
        },
    )
    token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    try:
        port = proc.wait_listening(count=2)
        key, wrapped = _round_trip(devenv, port, token)
    finally:
        assert proc.stop() == 0
    output = proc.output()
    lines = [line for line in output.splitlines() if line.strip()]
    assert not [line for line in lines if TEXT_LINE.match(line)]  # no text-format line left
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(parsed) >= 4
    for entry in parsed:
        assert {"time", "level", "logger", "message", "pid"} <= set(entry), entry
        assert set(entry) <= {
            "time", "level", "logger", "message", "pid", "worker", "trace_id", "span_id",
            "exception",
        }  # fmt: skip
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    listening = [e for e in parsed if "listening on port" in e["message"]]
    assert sorted(e["worker"] for e in listening) == [0, 1]
    calls = [e for e in parsed if e["logger"] == "keybroker.server.guard"]
    assert {e["message"].split(":")[0] for e in calls} >= {
        "keybroker.v1.KeyBroker/GenerateDataKey",
        "keybroker.v1.KeyBroker/UnwrapDataKey",
    }
    for entry in calls:
        assert entry["level"] == "DEBUG"
        assert (entry["trace_id"], entry["span_id"]) == (TRACE_ID, PARENT_SPAN)
        assert entry["worker"] in (0, 1)
    for entry in parsed:  # any line written during a call (HSM, store...) names its trace
        if "trace_id" in entry:
            assert (entry["trace_id"], entry["span_id"]) == (TRACE_ID, PARENT_SPAN)
    assert listening and all("trace_id" not in e for e in listening)  # outside calls: none
    for secret in (token, base64.b64encode(key).decode(), base64.b64encode(wrapped).decode()):
        assert secret not in output
    assert key.hex() not in output and wrapped.hex() not in output


def test_the_json_formatter_writes_only_its_fields() -> None:
    """A record's extra attributes and arguments never reach the line on their own; outside a
    call there are no trace ids, inside one the call's."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("keybroker.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.warning("refused %s", "caller-x", extra={"token": "SECRET-TOKEN"})
        with logs.call_trace(TRACEPARENT):
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        logger.info("after")
    finally:
        logger.removeHandler(handler)
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert "SECRET-TOKEN" not in out.getvalue()
    assert first["message"] == "refused caller-x" and "trace_id" not in first
    assert (second["trace_id"], second["span_id"]) == (TRACE_ID, PARENT_SPAN)
    assert "ValueError: boom" in second["exception"]
    assert "trace_id" not in third


def test_log_format_and_prometheus_listen_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "keybroker.toml"
    config.write_text("")
    with pytest.raises(ConfigurationError, match="log_format"):
        settings_mod.load(config, environ={"KEYBROKER_TELEMETRY_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigurationError, match="prometheus_listen"):
        settings_mod.load(config, environ={"KEYBROKER_TELEMETRY_PROMETHEUS_LISTEN": "9464"})
    assert worker_address("127.0.0.1:9464", 3) == ("127.0.0.1", 9467)
    assert worker_address("[::1]:0", 3) == ("::1", 0)
    with pytest.raises(ConfigurationError, match="beyond 65535"):
        worker_address("127.0.0.1:65535", 1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port} for worker 1"):
            check_ports(f"127.0.0.1:{port - 1}", 2)


def _consecutive_free_ports(count: int) -> int:
    """A port P such that P .. P + count - 1 are free now (bounded attempts), taken below the
    kernel's ephemeral range so that no outgoing connection of a test running beside this one
    takes P + 1 before the broker binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(50):
        first = rng.randrange(max(1024, low - 8000), low - count)
        sockets = []
        try:
            for offset in range(count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", first + offset))
        except OSError:
            continue
        else:
            return first
        finally:
            for s in sockets:
                s.close()
    raise AssertionError("no run of free ports found")


def _scrape(port: int) -> dict[str, list[Any]]:
    """name -> samples of one real scrape over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _resource_ids(receiver: Receiver) -> set[tuple[str, int]]:
    """(service.instance.id, keybroker.worker) of every resource the receiver got spans from."""
    found = set()
    for request in list(receiver.requests):
        for resource_spans in request.resource_spans:
            attrs = {kv.key: kv.value for kv in resource_spans.resource.attributes}
            if resource_spans.scope_spans:
                found.add(
                    (
                        attrs["service.instance.id"].string_value,
                        attrs["keybroker.worker"].int_value,
                    )
                )
    return found


@pytest.mark.slow
def test_prometheus_scrape_shows_the_gauges_per_worker_and_spans_name_the_instance(
    devenv: DevEnv, tmp_path: Path
) -> None:
    """Two workers with `prometheus_listen = 127.0.0.1:P`: worker 0 serves on P and worker 1 on
    P + 1; a real scrape of each shows the HSM, staleness, journal and export-lag gauges and the
    decision counter, labelled with that worker's own service_instance_id; the spans exported
    over OTLP to a real receiver carry the same two instance ids."""
    receiver = Receiver()
    receiver.server.start()
    base = _consecutive_free_ports(2)
    proc = BrokerProcess(
        devenv,
        tmp_path / "b.log",
        {
            "KEYBROKER_SERVER_PROCESSES": "2",
            "KEYBROKER_SERVER_LISTEN": f"127.0.0.1:{free_port()}",  # one port for both
            "KEYBROKER_TELEMETRY_PROMETHEUS_LISTEN": f"127.0.0.1:{base}",
            "KEYBROKER_TELEMETRY_OTLP_ENDPOINT": f"127.0.0.1:{receiver.port}",
            "KEYBROKER_TELEMETRY_OTLP_INSECURE": "true",
        },
    )
    token = mint_token(devenv, scopes=["keys:generate", "keys:unwrap"], purposes=["support"])
    try:
        port = proc.wait_listening(count=2)
        assert f"prometheus metrics on http://127.0.0.1:{base}/metrics (worker 0)" in proc.output()
        assert f"http://127.0.0.1:{base + 1}/metrics (worker 1)" in proc.output()
        calls = 0
        served: set[str] = set()
        deadline = time.monotonic() + 60
        # new connections until both workers (SO_REUSEPORT picks one per connection) answered
        while len(served) < 2 and time.monotonic() < deadline and calls < 40:
            _round_trip(devenv, port, token)
            calls += 1
            served = {
                sample.labels["service_instance_id"]
                for offset in (0, 1)
                for sample in _scrape(base + offset).get("keybroker_decisions_total", [])
            }
        scrapes = [_scrape(base), _scrape(base + 1)]
    finally:
        assert proc.stop() == 0
        receiver.server.stop(None)
    instances = []
    for worker, samples in enumerate(scrapes):
        (healthy,) = samples["keybroker_hsm_healthy"]
        assert healthy.value == 1
        assert healthy.labels["keybroker_worker"] == str(worker)
        instance = healthy.labels["service_instance_id"]
        instances.append(instance)
        staleness = {
            s.labels["store"]: s.value for s in samples["keybroker_state_staleness_seconds"]
        }
        assert set(staleness) == {"keys", "privacy"}
        assert all(0 <= age < 30 for age in staleness.values())
        (backlog,) = samples["keybroker_journal_backlog"]
        assert backlog.value == 0
        (journal,) = samples["keybroker_journal_healthy"]
        assert journal.value == 1
        (lag,) = samples["keybroker_journal_export_lag"]
        assert lag.value >= 0
        for series in samples.values():  # every keybroker series names its worker
            for sample in series:
                if sample.name.startswith("keybroker_"):
                    assert sample.labels["service_instance_id"] == instance
        assert samples["process_resident_memory_bytes"][0].value > 0
    assert len(set(instances)) == 2
    assert len(served) == 2, f"one worker answered all {calls} connections"
    assert {instance for instance, _worker in _resource_ids(receiver)} == set(instances)
    assert {worker for _instance, worker in _resource_ids(receiver)} == {0, 1}
