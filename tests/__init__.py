"""Tests.

The servers the suite starts in-process run with the gRPC core settings `keybroker serve`
applies (keybroker.server.grpc_settings), which only take effect before grpc is first imported:
pytest imports this package before any test module or conftest.
"""

from keybroker.server import grpc_settings

GRPC_PREPARED = grpc_settings.prepare()
