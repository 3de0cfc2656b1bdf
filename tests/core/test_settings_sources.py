"""Settings errors say where a value came from; `[server] listen` is checked as host:port;
Kubernetes service-link variables are not settings, a misspelt key still is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from keybroker.errors import ConfigurationError
from keybroker.settings import NO_CONFIGURATION, is_service_link, load, validate_for_serving

SERVICE_LINKS = {
    "KEYBROKER_SERVICE_HOST": "10.96.0.12",
    "KEYBROKER_SERVICE_PORT": "50051",
    "KEYBROKER_SERVICE_PORT_GRPC": "50051",
    "KEYBROKER_PORT": "tcp://10.96.0.12:50051",
    "KEYBROKER_PORT_50051_TCP": "tcp://10.96.0.12:50051",
    "KEYBROKER_PORT_50051_TCP_PROTO": "tcp",
    "KEYBROKER_PORT_50051_TCP_PORT": "50051",
    "KEYBROKER_PORT_50051_TCP_ADDR": "10.96.0.12",
    "KEYBROKER_METRICS_SERVICE_HOST": "10.96.0.13",  # a Service named keybroker-metrics
    "KEYBROKER_METRICS_PORT_9464_TCP": "tcp://10.96.0.13:9464",
}


def test_service_links_are_ignored() -> None:
    """The variables the kubelet injects for Services named keybroker… load without error."""
    assert all(is_service_link(k, v) for k, v in SERVICE_LINKS.items())
    assert load(None, environ=SERVICE_LINKS).server.listen == "127.0.0.1:50051"


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("KEYBROKER_SERVER_PORT", "50051", "[server] port"),  # meant listen: not a link
        ("KEYBROKER_SERVER_LISTN", "0.0.0.0:50051", "[server] listn"),
        ("KEYBROKER_TELEMETRY_SERVICE_NAM", "kb", "[telemetry] service_nam"),
    ],
)
def test_misspelt_keys_of_known_sections_still_stop_start_up(
    var: str, value: str, named: str
) -> None:
    """A mistake in a real setting's name is refused, naming the variable."""
    with pytest.raises(ConfigurationError) as info:
        load(None, environ={**SERVICE_LINKS, var: value})
    assert named in info.value.message
    assert f"environment variable {var}" in info.value.message


def test_a_service_name_setting_is_not_taken_for_a_link() -> None:
    """`[telemetry] service_name` set by environment is still a setting."""
    s = load(None, environ={"KEYBROKER_TELEMETRY_SERVICE_NAME": "kb-eu"})
    assert s.telemetry.service_name == "kb-eu"


def test_errors_name_the_toml_line(tmp_path: Path) -> None:
    """A wrong value in the file names file and line; the same from the environment names the
    variable."""
    path = tmp_path / "keybroker.toml"
    path.write_text('# c\n[server]\nlisten = "127.0.0.1:1"\nthreads = "many"\n')
    with pytest.raises(ConfigurationError) as info:
        load(path, environ={})
    assert f"{path}, line 4" in info.value.message
    with pytest.raises(ConfigurationError) as info:
        load(None, environ={"KEYBROKER_SERVER_THREADS": "many"})
    assert "environment variable KEYBROKER_SERVER_THREADS" in info.value.message


@pytest.mark.parametrize(
    "listen",
    [
        "127.0.0.1:50051",
        "0.0.0.0:0",
        "[::]:50051",
        "[::1]:1",
        "localhost:65535",
        "unix:/run/kb.sock",
    ],
)
def test_listen_addresses_that_are_accepted(listen: str) -> None:
    """host:port with a name, an IPv4 address or a bracketed IPv6 address; unix sockets."""
    assert load(None, environ={"KEYBROKER_SERVER_LISTEN": listen}).server.listen == listen


@pytest.mark.parametrize(
    "listen", ["bogus", ":50051", "::1:50051", "host:port", "127.0.0.1:70000", "a b:1"]
)
def test_listen_addresses_that_are_refused(listen: str) -> None:
    """Anything else is refused at load, naming the key and the form it needs."""
    with pytest.raises(ConfigurationError) as info:
        load(None, environ={"KEYBROKER_SERVER_LISTEN": listen})
    assert "[server] listen" in info.value.message
    assert "HOST:PORT" in info.value.message


def test_serving_without_any_configuration_says_so() -> None:
    """No file and no settings: the message names --config and KEYBROKER_CONFIG."""
    with pytest.raises(ConfigurationError) as info:
        validate_for_serving(load(None, environ={}))
    assert info.value.message == NO_CONFIGURATION
    assert "--config" in NO_CONFIGURATION
    assert "KEYBROKER_CONFIG" in NO_CONFIGURATION
