"""Probe the broker's gRPC health service over mTLS: the container's exec probe.

The broker serves ``grpc.health.v1.Health`` only behind mutual TLS, and kubelet's built-in gRPC
probe cannot present a client certificate, so Kubernetes runs this script inside the pod instead
(deploy/kubernetes). It needs a client certificate the broker's ``[tls] client_ca_file`` trusts.

``--ready`` (readiness): exit 0 only when the broker answers ``SERVING`` (HSM logged in, the
default key found, the journal writable). ``--live`` (liveness): exit 0 when the broker answers at
all, ``SERVING`` or ``NOT_SERVING``: an HSM or database outage makes a replica not ready, but
restarting it would not help. Exit 1 otherwise, with one line on standard error saying why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROBE_DIR = Path("/etc/keybroker/probe")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ready", action="store_true", help="succeed only when SERVING (default)")
    mode.add_argument("--live", action="store_true", help="succeed on any health answer")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument(
        "--server-name",
        default="keybroker",
        help="name the server certificate must carry (default: keybroker)",
    )
    parser.add_argument("--ca", type=Path, default=PROBE_DIR / "ca.crt")
    parser.add_argument("--cert", type=Path, default=PROBE_DIR / "tls.crt")
    parser.add_argument("--key", type=Path, default=PROBE_DIR / "tls.key")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        credentials = grpc.ssl_channel_credentials(
            args.ca.read_bytes(), args.key.read_bytes(), args.cert.read_bytes()
        )
    except OSError as exc:
        print(f"healthcheck: cannot read probe certificates: {exc}", file=sys.stderr)
        return 1
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    with grpc.secure_channel(args.target, credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"healthcheck: {args.target}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if args.live or reply.status == health_pb2.HealthCheckResponse.SERVING:
        return 0
    print(f"healthcheck: {args.target}: {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
