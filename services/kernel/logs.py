"""Logs for machines and for people, always with the current trace id.

``json`` (production): one JSON object per line, for the log pipeline. ``console``: one readable line
per event, coloured when the stream is a terminal. ``auto`` (the default) picks ``console`` when the
log stream (stderr) is a terminal, as under ``make run``, and ``json`` otherwise (a container, a pipe,
a file), so nothing has to be set for either.

Libraries (aiokafka, faust, uvicorn) log through the standard ``logging`` module: their records go
through the same processors and renderer, so a log holds one format whoever wrote the line. Their
levels are left alone: what the platform does about a library's noise is to give it no reason for it
(e.g. ``readiness.wait_for_group_coordinator`` before a consumer joins its group). What it cannot
prevent is a library repeating itself while something it needs is away: with the broker restarting,
aiokafka's clients in one process wrote some 600 lines a second ("Unable connect to node", "Unable
to update metadata"), 35,000 a minute, each one rendered on the event loop that was also answering
channels. So a library line (same logger, level and message template) is written once per
``REPEAT_WINDOW_S``; the next one written after the window says how many were dropped in between.
Our own lines are never dropped.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import IO

import orjson
import structlog

from services.kernel import tracing

FORMATS = ("auto", "json", "console")
REPEAT_WINDOW_S = 10.0


def _add_trace_id(_logger, _name, event_dict):
    trace_id = tracing.current()
    if trace_id and "trace_id" not in event_dict:
        event_dict["trace_id"] = trace_id
    return event_dict


def is_terminal(stream: IO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):     # no isatty, or a closed stream
        return False


def resolve_format(fmt: str, stream: IO) -> str:
    """``json`` or ``console``: what ``fmt`` means for logs written to ``stream``."""
    fmt = (fmt or "auto").lower()
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)} (BUBUH_LOG_FORMAT)")
    if fmt == "auto":
        return "console" if is_terminal(stream) else "json"
    return fmt


class _Ours(logging.StreamHandler):
    """The root handler ``configure`` installs (and replaces when called again)."""


class Repeats(logging.Filter):
    """A library's line once per ``window`` seconds per (logger, level, message template); the next one
    let through carries how many were dropped since the last (``[N more like this in S s]``)."""

    def __init__(self, window: float = REPEAT_WINDOW_S, clock=time.monotonic) -> None:
        super().__init__()
        self.window, self.clock = window, clock
        self._seen: dict[tuple[str, int, str], list] = {}     # key -> [last written at, dropped since]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window:
                seen[1] += 1
                return False
            dropped = seen[1] if seen is not None else 0
            since = now - seen[0] if seen is not None else 0.0
            if len(self._seen) > 10_000:               # templates are few; never grow without bound
                self._seen.clear()
            self._seen[key] = [now, 0]
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in {since:.0f} s]"
        return True


def _json_str(obj, **kw) -> str:
    return orjson.dumps(obj, **kw).decode()


def configure(service: str, level: str = "info", fmt: str = "auto", stream: IO | None = None) -> str:
    """Set up structlog and the standard library's root logger; returns the format chosen."""
    stream = stream if stream is not None else sys.stderr
    chosen = resolve_format(fmt, stream)
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_id,
    ]
    if chosen == "json":
        # orjson, written as bytes: the stdlib encoder was a tenth of a consumer's CPU at one line per record
        native = [*shared, structlog.processors.format_exc_info,
                  structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        buffer = getattr(stream, "buffer", None)
        factory = structlog.BytesLoggerFactory(file=buffer) if buffer is not None else None
        if factory is None:       # a text-only stream (a test's StringIO): the same lines, as text
            native[-1] = structlog.processors.JSONRenderer(serializer=_json_str)
            factory = structlog.PrintLoggerFactory(file=stream)
        foreign_render = [structlog.processors.format_exc_info,
                          structlog.processors.JSONRenderer(serializer=_json_str)]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=is_terminal(stream))
        native = [*shared, renderer]        # the renderer formats exceptions itself (readably)
        factory = structlog.PrintLoggerFactory(file=stream)
        foreign_render = [renderer]
    structlog.configure(
        processors=native,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)

    # The standard library's records (aiokafka, faust, uvicorn): same fields, same renderer.
    handler = _Ours(stream)
    handler.addFilter(Repeats())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *foreign_render],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if type(h) in (_Ours, logging.StreamHandler)]:
        root.removeHandler(old)       # ours from an earlier call, or a basicConfig one (not pytest's)
    root.addHandler(handler)
    # libraries' info lines are chatter at our info level; their warnings and errors always show
    root.setLevel(max(lvl, logging.WARNING))
    return chosen


def get(name: str | None = None):
    return structlog.get_logger(name)
