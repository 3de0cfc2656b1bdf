"""The one mapping between domain errors and gRPC status codes, both ways. Never UNKNOWN.

The table and both directions live in :mod:`keybroker.wire`, which the client SDK shares without
importing the server; this module is the server's name for them.
"""

from __future__ import annotations

from keybroker.wire import REASON_METADATA, STATUS_TABLE, error_from_status, status_for

__all__ = ["REASON_METADATA", "STATUS_TABLE", "error_from_status", "status_for"]
