"""The ``keybroker`` command line.

Importing it sets the broker's gRPC core settings (keybroker.server.grpc_settings) before any
subcommand imports grpc, so that ``keybroker serve`` and the workers it spawns run with them.
"""

from keybroker.server import grpc_settings

GRPC_PREPARED = grpc_settings.prepare()
