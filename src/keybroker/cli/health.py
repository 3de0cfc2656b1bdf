"""``keybroker health``: ask the health port (``[server] health_listen``) whether the broker is
ready and live, for exec probes, scripts and people.

Prints one line per service (``readiness``, ``liveness``) with its status. Exit codes, as for
every command: 0 every service asked is SERVING; 1 one is not, or the health port does not
answer (a runtime failure: the message names the address); 2 the settings give no health port
(a configuration error).
"""

from __future__ import annotations

import argparse

from keybroker.cli.common import EXIT_FAILURE, EXIT_OK, load_settings
from keybroker.errors import ConfigurationError

SERVICES = ("readiness", "liveness")
_ANY_HOST = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - the wildcard


def probe_target(health_listen: str) -> str:
    """Where this host reaches ``[server] health_listen`` (a wildcard address: loopback)."""
    host, _, port = health_listen.rpartition(":")
    host = host.strip("[]")
    host = _ANY_HOST.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _run(args: argparse.Namespace) -> int:
    import sys

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    listen = load_settings(args).server.health_listen
    if not listen:
        raise ConfigurationError(
            "[server] health_listen is not set: the broker has no health port to ask; set it "
            '(e.g. health_listen = "0.0.0.0:8081") and restart the broker'
        )
    target = probe_target(listen)
    services = [args.service] if args.service else list(SERVICES)
    statuses: dict[str, str] = {}
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=args.timeout
                )
            except grpc.RpcError as exc:
                print(f"keybroker: health port {target}: {exc.code().name}", file=sys.stderr)
                return EXIT_FAILURE
            statuses[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    width = max(len(s) for s in statuses)
    for service, status in statuses.items():
        print(f"{service.ljust(width)}  {status}")
    return EXIT_OK if all(s == "SERVING" for s in statuses.values()) else EXIT_FAILURE


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "health",
        help="ask the broker's health port whether it is ready and live",
        description="Ask the plaintext health port ([server] health_listen of the settings "
        "file; a wildcard address is asked on loopback) for readiness (HSM, state store and "
        "journal usable) and liveness (the broker's loops turn). Exit 0 when every service "
        "asked is SERVING, 1 when one is not or the port does not answer, 2 when the settings "
        "give no health port.",
    )
    p.add_argument("--config", help="TOML settings file (default: $KEYBROKER_CONFIG)")
    p.add_argument(
        "--service",
        choices=SERVICES,
        help="ask only this one (an exec readiness or liveness probe); default: both",
    )
    p.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for each answer (default 3)"
    )
    p.set_defaults(func=_run)
