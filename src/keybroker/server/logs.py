"""Logging set-up for `keybroker serve` and its workers: one line per event on stderr.

Two formats (``[telemetry] log_format``):

- ``text``: ``time LEVEL pid logger: message``, for people;
- ``json``: one JSON object a line, for log pipelines: ``time`` (UTC, RFC 3339 with
  milliseconds), ``level``, ``logger``, ``message``, ``pid``, ``worker`` (the worker process's
  index; absent in the supervisor of several workers), ``trace_id`` and ``span_id`` while the
  line belongs to a call that carried a W3C ``traceparent`` (or while an OpenTelemetry span is
  current), and ``exception`` with the traceback when there is one.

The JSON formatter writes exactly these fields: never a log record's ``extra`` attributes or
arguments on their own, so no request payload, key, wrapped key or token can reach a log line
through it; the message is the same text the text format prints.

A call's trace context is set by :func:`call_trace` (keybroker.server.guard, around each call):
only the caller's ``traceparent`` header, checked for its shape there, is kept in a context
variable and parsed when a line is actually written, so calls pay nothing for it otherwise.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"

#: The W3C ``traceparent`` of the call this thread (or task) is serving, if it sent one.
_call_traceparent: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "keybroker_call_traceparent", default=None
)


CallTrace = contextvars.Token[str | None] | None


def enter_call(traceparent: str | None) -> CallTrace:
    """Until :func:`leave_call`, log lines of this thread carry the ids of ``traceparent`` (a W3C
    version-00 header already checked for its shape; None or "": the call has none). Plain
    functions rather than a context manager: this runs on every call of the data plane."""
    return _call_traceparent.set(traceparent) if traceparent else None


def leave_call(entered: CallTrace) -> None:
    if entered is not None:
        _call_traceparent.reset(entered)


@contextmanager
def call_trace(traceparent: str | None) -> Iterator[None]:
    """:func:`enter_call` and :func:`leave_call` around a block."""
    entered = enter_call(traceparent)
    try:
        yield
    finally:
        leave_call(entered)


def _trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) as lower-case hex: the call's traceparent, else the current span."""
    header = _call_traceparent.get()
    if header is not None:
        parts = header.split("-")
        if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
            return parts[1], parts[2]
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        return f"{context.trace_id:032x}", f"{context.span_id:016x}"
    return None


_worker: list[int] = []  # this process's worker index, once known


def set_worker(worker: int) -> None:
    """Record this process's worker index (JSON lines carry it as ``worker``)."""
    _worker[:] = [worker]


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with a fixed set of fields (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if _worker:
            line["worker"] = _worker[0]
        ids = _trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


_installed: list[logging.Handler] = []


def configure_logging(level: str = "INFO", fmt: str = "text", worker: int | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``); ``worker``: this process's
    worker index (JSON lines carry it). A second call replaces the handler of the first (and
    leaves any other handler alone)."""
    if worker is not None:
        set_worker(worker)
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    while _installed:
        root.removeHandler(_installed.pop())
    root.addHandler(handler)
    root.setLevel(level.upper())
    _installed.append(handler)
