"""gRPC core's transport settings for the server loop, applied before grpc is first imported.

gRPC core 1.85 does socket I/O, TLS and HTTP/2 framing on its EventEngine threads by default and
hands each completed operation to the thread polling the completion queue. The server loop
(:mod:`keybroker.server.loop`) answers a call on that polling thread anyway, so each hand-over is a
thread wake-up, which on a small VM costs more than the work. With the EventEngine listener and
endpoints turned off (two gRPC core *experiments*, read once from ``GRPC_EXPERIMENTS`` when grpc is
imported), the polling thread does the I/O itself: a process answers a call on one thread. Measured
side by side: docs/PERFORMANCE.md ("One thread per call").

An operator's own ``GRPC_EXPERIMENTS`` is left alone. This module imports nothing of grpc.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

#: gRPC core experiments turned off for the broker (pyproject.toml pins grpcio to 1.85.x).
GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints"


def prepare(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set the broker's ``GRPC_EXPERIMENTS`` unless the environment already has one.

    Must run before ``grpc`` is imported in this process (gRPC core reads the variable once, at
    import); processes started afterwards inherit it. Returns False if it came too late for this
    process (grpc already imported) — the broker then still works, only on gRPC's defaults."""
    env = os.environ if environ is None else environ
    env.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    return "grpc" not in sys.modules
