"""Trace ids: W3C traceparent in, trace id on every log line and event out.

The current trace id lives in a context variable so that logs, outgoing events and HTTP answers
of one request share it without passing it through every call.
"""

from __future__ import annotations

import contextvars
import re
import secrets
import uuid

_TRACE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("bubuh_trace_id", default="")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def new_trace_id() -> str:
    return secrets.token_hex(16)


def parse_traceparent(value: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` header, or None when absent or malformed."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if not m or m.group(1) == "0" * 32:
        return None
    return m.group(1)


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{secrets.token_hex(8)}-01"


def current() -> str:
    return _TRACE_ID.get()


def bind(trace_id: str | None) -> contextvars.Token:
    """Make ``trace_id`` (or a fresh one) the current trace; returns the token for ``reset``."""
    return _TRACE_ID.set(trace_id or new_trace_id())


def reset(token: contextvars.Token) -> None:
    _TRACE_ID.reset(token)


def new_event_id() -> str:
    return str(uuid.uuid4())
