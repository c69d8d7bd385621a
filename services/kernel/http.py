"""The HTTP front shared by the services' routers: one error shape, trace ids, metrics, health, body limits.

Every error answer is ``{"code", "message", "detail", "trace_id"}`` with the status from the error
catalogue, whether it came from a ``BubuhError``, a malformed body or an unknown route.

Body limits (``BodyLimits``): a route that takes a body declares its limit with ``body_limit`` (it
lands in the OpenAPI document as ``x-max-body-bytes``); every other route gets the small default.
The limit is enforced while the body arrives, so no route can buffer more than it, and a route
answers (a 401, say) before reading the body at all: a route that needs an API key checks it first
and reads the body through ``request.stream()`` / ``request.form()`` afterwards, never through
FastAPI's ``File``/``Form``/model parameters, which parse the whole body before the handler runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.kernel import errors, failures, logs, metrics, tracing
from services.kernel.direct_lane import DirectLane
from services.kernel.door_pressure import DoorMark
from services.kernel.retry_after import TICKET_EARLY_S, TICKET_HEADER, Spread, Tickets

log = logs.get(__name__)


def error_body(code: errors.ErrorCode, detail: str = "", trace_id: str | None = None) -> dict[str, str]:
    """The one shape of an error answer (``ErrorBody``), also where no route answers (http_protocol.py)."""
    return {"code": code.code, "message": code.meaning, "detail": detail or code.meaning,
            "trace_id": trace_id or tracing.current()}


def error_response(code: errors.ErrorCode, detail: str = "", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=code.http_status, content=error_body(code, detail), headers=headers)


def bubuh_error_response(request: Request, exc: errors.BubuhError) -> JSONResponse:
    """The answer to a ``BubuhError`` a route raised: its catalogued status, with ``Retry-After`` when retryable."""
    headers = {"Retry-After": retry_after(request)} if exc.code.retryable else None
    return error_response(exc.code, exc.detail, headers)


def retry_after(request: Request) -> str:
    """The ``Retry-After`` of a 503 from this request's route: spread by the route's ``Spread`` when
    it has an admission bound (kernel/retry_after.py), else 2 s."""
    spreads: dict[str, Spread] = getattr(request.app.state, "retry_after", {})
    spread = spreads.get(getattr(request.scope.get("route"), "path", ""))
    return str(spread.refused()) if spread else "2"


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """An exception no route turned into an answer: 503 with Retry-After when a dependency is away
    (a read-only or missing database, Kafka), else 500 (a bug, logged with its trace)."""
    route = getattr(request.scope.get("route"), "path", "unmatched")
    failure = failures.observe(f"http {route}", exc)
    if failure.waits:
        log.warning("dependency unavailable", route=route, kind=failure.kind.value, sqlstate=failure.sqlstate,
                    error=repr(exc)[:300])
        return error_response(errors.UNAVAILABLE, f"{type(exc).__name__}: retry after a moment",
                              {"Retry-After": retry_after(request)})
    if failure.kind is failures.Kind.BAD:
        return error_response(errors.BODY_INVALID, "the request carries text the platform cannot store "
                                                   "(a NUL or an invalid character)")
    log.error("request failed", route=route, error=repr(exc)[:500], exc_info=exc)
    return error_response(errors.INTERNAL, "an unexpected error; operations can find it by trace_id")


# the status counted (never sent) for a request whose caller left before it was read: nginx's 499
CLIENT_CLOSED = 499
MAX_BODY = "x-max-body-bytes"
# requests of a route in progress in this process at most; the next is answered 503 UNAVAILABLE with
# Retry-After before its body is read (BodyLimits)
MAX_IN_FLIGHT = "x-max-in-flight"
# ... counted in uploads of the route's largest size: a smaller one counts as its share of the largest, and at
# least this share of one (BodyLimits; absent: each request counts as one)
SMALLEST_SHARE = "x-smallest-share"
TOO_LARGE_CODE = "x-body-too-large-code"
DEFAULT_MAX_BODY_BYTES = 16 * 1024   # routes that declare no limit (they take no body)
# an answer that comes before the body was read drops the rest of it when that is at most this
# much (declared, arriving within the time): closing instead would make the kernel reset the
# connection, which can erase the answer before a client that is still sending reads it
DRAIN_BYTES = 64 * 1024
DRAIN_SECONDS = 2.0


def body_limit(limit: int, too_large: errors.ErrorCode = errors.BODY_TOO_LARGE,
               request_body: dict[str, Any] | None = None, max_in_flight: int | None = None,
               smallest_share: float = 1.0) -> dict[str, Any]:
    """``openapi_extra`` of a route that takes a body: its size limit (enforced by ``BodyLimits``
    while the body arrives), the code a larger body gets, and the body's OpenAPI description; with
    ``max_in_flight``, how many of its requests one process works on at once (more: 503 at once). With
    ``smallest_share`` under 1, that many of its largest uploads: a request declaring a smaller body counts
    as its share of the largest, at least ``smallest_share`` of one (so up to ``max_in_flight /
    smallest_share`` small ones)."""
    extra: dict[str, Any] = {MAX_BODY: limit, TOO_LARGE_CODE: too_large.code}
    if max_in_flight:
        extra[MAX_IN_FLIGHT] = max_in_flight
        if smallest_share < 1.0:
            extra[SMALLEST_SHARE] = smallest_share
    if request_body is not None:
        full = (f"{max_in_flight} are already in progress" if smallest_share >= 1.0 else
                f"the uploads in progress add up to {max_in_flight} x {limit} bytes (each counts as its "
                f"`Content-Length`, at least {math.ceil(limit * smallest_share)} bytes, so up to "
                f"{int(max_in_flight / smallest_share)} small uploads; one without `Content-Length` as {limit})")
        busy = (f" When {full}, the answer is 503 `UNAVAILABLE` with "
                f"`Retry-After`, before the body is read; for a request with an `Idempotency-Key`, also with a "
                f"`Bubuh-Queue-Ticket` to send back with the retry, which keeps its place in line "
                f"(docs/channels.md)." if max_in_flight else "")
        extra["requestBody"] = {**request_body, "description": (
            request_body.get("description", "") + f" At most {limit} bytes (chunked or not): a larger "
            f"declared `Content-Length` is refused at once, a larger streamed body as soon as it passes the "
            f"limit, with 413 `{too_large.code}` and `Connection: close`." + busy).strip()}
    return extra


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the catalogued error shape under each status it can answer."""
    return {s: {"model": ErrorBody, "description": _STATUS_MEANING.get(s, "See `code` (docs/errors.md).")}
            for s in statuses}


class StrictBody(BaseModel):
    """A request body that refuses fields it does not know (a typo is a 422, never silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    code: str
    message: str
    detail: str
    trace_id: str


_STATUS_MEANING = {
    401: "`UNAUTHENTICATED`: no or unknown API key; answered before the body is read.",
    403: "`CHANNEL_INACTIVE`: the channel is suspended.",
    413: "The body passed the route's `x-max-body-bytes` (`BODY_TOO_LARGE`, or `PDF_TOO_LARGE` for "
         "documents); sent with `Connection: close`, possibly before the body was read.",
    415: "`UNSUPPORTED_MEDIA_TYPE`.",
    422: "A catalogued refusal of the body (`BODY_INVALID`, `PDF_*`, ...): see `code`.",
    429: "`RATE_LIMITED`: too many requests from this client; retry after `Retry-After` seconds.",
    503: "`UNAVAILABLE`: retry after `Retry-After` seconds.",
}


class BodyLimits:
    """ASGI middleware: every request body is held to its route's limit while it arrives.

    Why at the ASGI level and not in each route: the count has to sit between the server and
    whatever reads the body (Starlette's form parser, a JSON reader), and a declared length has
    to be refused before anything reads at all. A response that starts before the body was read
    whole (a 401, a 413) carries ``Connection: close``: the server then drops the connection
    instead of draining the rest of the upload, and the client stops sending. (Unless the rest is
    small and declared: then it is read and dropped, and the connection lives on.)
    """

    def __init__(self, app: ASGIApp, routers: Sequence[APIRouter], default_limit: int = DEFAULT_MAX_BODY_BYTES,
                 spreads: dict[str, Spread] | None = None, tickets: Tickets | None = None,
                 caller: Callable[[str | None], str | None] | None = None, door: DoorMark | None = None) -> None:
        self.app = app
        self._default = default_limit
        self._door = door       # marks the door busy for the stamping workers sharing this box (door_pressure.py)
        # the routers' own routes (the app mounts them without a prefix), read once: matching a
        # request against them is what the router does next anyway
        self._table = [(r, int(r.openapi_extra[MAX_BODY]),
                        errors.lookup(r.openapi_extra.get(TOO_LARGE_CODE, errors.BODY_TOO_LARGE.code)),
                        int(r.openapi_extra.get(MAX_IN_FLIGHT) or 0))
                       for router in routers for r in router.routes
                       if isinstance(r, APIRoute) and r.openapi_extra and MAX_BODY in r.openapi_extra]
        self._smallest = {r.path: float(r.openapi_extra.get(SMALLEST_SHARE, 1.0)) for r, *_ in self._table}
        # Admission: a route's requests in progress here. Past its bound the request is answered at
        # once: under a surge, requests queued inside the server past every client's patience were
        # still parsed, checked and stored, for callers long gone, while the next ones waited behind them.
        # The bound is in the route's largest uploads (``_weight``): it keeps the bodies held within what
        # the process may buffer (64 uploads of 10 MiB), and lets a spike of small documents in. Counted in
        # whole requests, a spike of 1.5 KB letters at 3x met it at 64 in progress, and 24-104 of about
        # 10,900 arrivals were answered 503 (make surge-open, 7 December).
        self._in_flight: dict[str, int] = {}        # requests in progress (the door's busy mark counts these)
        self._held: dict[str, int] = {}             # ... and their weights, in bytes of the largest upload
        # and how long those turned away should wait: spread over the time the route needs to take them
        self._spreads = spreads if spreads is not None else {}
        # ... and their places in line, for those whose retry is the same request (kernel/retry_after.py)
        # booked only for a known caller (``caller``: its channel from its Authorization header, or None),
        # so requests with made-up keys cannot fill the line ahead of real ones
        self._tickets = tickets or Tickets()
        self._caller = caller
        for route, _, _, bound in self._table:
            if bound:
                self._spreads.setdefault(route.path, Spread())
                for outcome in TICKET_OUTCOMES:      # each series from the start, at 0 (a panel reads the rate)
                    metrics.QUEUE_TICKETS.labels(route.path, outcome)

    def _limit_for(self, scope: Scope) -> tuple[int, errors.ErrorCode, str | None, int]:
        for route, limit, code, bound in self._table:
            if route.matches(scope)[0] is Match.FULL:
                # named now, for the metrics and the log (TraceAndMeasure): an answer given here, before the
                # router runs (a 413, a 503 at the admission bound), was counted as route "unmatched"
                scope.setdefault("route", route)
                return limit, code, route.path, bound
        return self._default, errors.BODY_TOO_LARGE, None, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, code, path, bound = self._limit_for(scope)
        if bound:
            spread = self._spreads[path]
            weight = self._weight(scope, path, limit)
            refused = self._admission(scope, path, bound * limit - weight, spread)
            if refused is not None:
                if self._door is not None:
                    self._door.turned_away()
                # the body is read and dropped (within the route's limit), not parsed: an answer sent
                # while a client still uploads is often lost to the reset that closing causes
                log.info("busy: body dropped unparsed", path=scope["path"], in_flight=self._in_flight.get(path, 0),
                         held_bytes=self._held.get(path, 0), ticket=TICKET_HEADER in refused)
                full = (f"{bound} requests in progress here" if self._smallest[path] >= 1.0 else
                        f"uploads of {bound} x {limit} bytes in progress here")
                if await _dropped(receive, limit):
                    response = error_response(errors.UNAVAILABLE, f"{full}; retry after Retry-After", refused)
                    await response(scope, _no_body, send)
                else:
                    await _refuse(scope, send, errors.UNAVAILABLE, full, refused)
                return
            self._in_flight[path] = self._in_flight.get(path, 0) + 1
            self._held[path] = self._held.get(path, 0) + weight
            if self._door is not None:
                self._door.busy(self._in_flight[path], bound)
            status = 0

            async def seen_send(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)
            try:
                await self._limited(scope, receive, seen_send, limit, code)
            finally:
                self._in_flight[path] -= 1
                self._held[path] -= weight
                if 0 < status < 500:
                    spread.completed()
            return
        await self._limited(scope, receive, send, limit, code)

    def _weight(self, scope: Scope, path: str, limit: int) -> int:
        """What a request counts for against its route's bound, in bytes of the largest upload: its declared
        ``Content-Length``, at least the route's smallest share of the largest; without one (chunked), the
        largest. (A declared length over the limit is refused before it is read, ``_limited``.)"""
        smallest = self._smallest[path]
        if smallest >= 1.0:
            return limit
        declared = _header(scope, b"content-length")
        if declared is None or not declared.strip().isdigit():
            return limit
        return min(limit, max(int(declared), math.ceil(limit * smallest)))

    def _admission(self, scope: Scope, path: str, room: int, spread: Spread) -> dict[str, str] | None:
        """None: let the request in. Else the headers of its 503: ``Retry-After``, and for a request that
        can come back as itself (an ``Idempotency-Key``) its place in line, ``Bubuh-Queue-Ticket``.
        ``room``: the most the route's requests in progress may weigh for this one to fit (``_weight``).

        First turned away, first taken: a request with a ticket whose time has come is let in ahead of
        newcomers, up to the bound (at it, it is given a turn a second on, still ahead of those booked
        behind it); while callers are booked for times still to come, newcomers are let in only below
        half the bound (so the door keeps working, and learns its rate, when booked callers do not come
        back) and are otherwise booked behind them. A ticket that came back early keeps its place and is
        told the rest of its wait; one that is not this request's, or expired, counts for nothing (the
        request is a newcomer). Holders were let in up to half the bound over it at first: the more in
        progress, the slower each (deadline day, same arrivals: 390 requests of the spike unanswered in
        30 s, against 75 at the bound)."""
        held = self._held.get(path, 0)
        binding = self._ticket_binding(scope)
        shown = _header(scope, _TICKET_NAME) if binding is not None else None
        due_in = self._tickets.due_in(path, binding, shown) if shown else None
        if shown and due_in is None:
            metrics.QUEUE_TICKETS.labels(path, "invalid").inc()
        if due_in is not None and due_in > TICKET_EARLY_S:
            metrics.QUEUE_TICKETS.labels(path, "early").inc()
            return {"Retry-After": str(math.ceil(due_in)), TICKET_HEADER: shown}
        if due_in is not None:
            if held <= room:
                metrics.QUEUE_TICKETS.labels(path, "honoured").inc()
                return None
            metrics.QUEUE_TICKETS.labels(path, "full").inc()       # its turn, but full even for it: at the front
            return {"Retry-After": "1", TICKET_HEADER: self._tickets.issue(path, binding, 1.0)}
        if held <= (room // 2 if spread.booked_ahead() else room):
            return None
        if binding is None:
            return {"Retry-After": str(spread.refused())}
        wait = spread.book()
        metrics.QUEUE_TICKETS.labels(path, "issued").inc()
        return {"Retry-After": str(max(1, math.ceil(wait))), TICKET_HEADER: self._tickets.issue(path, binding, wait)}

    def _ticket_binding(self, scope: Scope) -> bytes | None:
        """What a queue ticket is signed for: one request (its ``Idempotency-Key``) of one caller (its
        channel, or without ``caller`` its credentials, hashed); None without a key (a retry without one
        is another request) or from an unknown caller."""
        key = _header(scope, b"idempotency-key")
        if not key:
            return None
        credentials = _header(scope, b"authorization")
        if self._caller is None:
            who = hashlib.sha256((credentials or "").encode("latin-1")).hexdigest()[:32]
        elif (who := self._caller(credentials)) is None:
            return None
        return f"{key}\x1f{who}".encode("latin-1", "replace")

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int, code: errors.ErrorCode) -> None:
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            log.info("body refused unread", path=scope["path"], declared=int(declared), limit=limit)
            await _refuse(scope, send, code, f"Content-Length {int(declared)} > {limit} bytes")
            return
        complete = not chunked and (declared is None or int(declared or b"0") == 0)
        received = 0

        async def limited_receive() -> Message:
            nonlocal complete, received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    log.info("body refused at its limit", path=scope["path"], received=received, limit=limit)
                    raise errors.BubuhError(code, f"more than {limit} bytes")
                if not message.get("more_body", False):
                    complete = True
            return message

        async def drained() -> bool:
            """Read and drop the rest of a small body: the connection stays usable and is not reset."""
            nonlocal complete
            if chunked or declared is None or int(declared) - received > DRAIN_BYTES:
                return False
            try:
                async with asyncio.timeout(DRAIN_SECONDS):
                    while not complete:
                        message = await receive()
                        if message["type"] != "http.request":
                            return False
                        complete = not message.get("more_body", False)
            except TimeoutError:
                return False
            return True

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete and not await drained():
                log.info("answered before the body; closing", path=scope["path"], status=message["status"],
                         received=received)
                message = {**message, "headers": _with_close(message.get("headers", []))}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


_TICKET_NAME = TICKET_HEADER.lower().encode()
TICKET_OUTCOMES = ("issued", "honoured", "early", "full", "invalid")   # bubuh_http_queue_tickets_total{outcome}


def _header(scope: Scope, name: bytes) -> str | None:
    value = next((v for k, v in scope["headers"] if k == name), None)
    return value.decode("latin-1") if value is not None else None


def _with_close(headers) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() != b"connection"]
    return out + [(b"connection", b"close")]


async def _refuse(scope: Scope, send: Send, code: errors.ErrorCode, detail: str,
                  headers: dict[str, str] | None = None) -> None:
    """Answer before the app (and before a ``100 Continue``): the body is never read."""
    response = error_response(code, detail, {"Connection": "close", **(headers or {})})
    await response(scope, _no_body, send)


async def _dropped(receive: Receive, limit: int) -> bool:
    """Read the request's body to its end without keeping it; False when it passes ``limit`` or the
    client goes away first."""
    received = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        received += len(message.get("body", b""))
        if received > limit:
            return False
        if not message.get("more_body", False):
            return True


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class KeepAliveLimit:
    """ASGI middleware: a connection is closed after ``limit`` requests, with ``Connection: close`` on the
    answer to the last one (as nginx's ``keepalive_requests``); the client opens a new one.

    Several API members behind one port (``SO_REUSEPORT``), or pods behind a Kubernetes Service, are
    chosen per connection, never per request. A client that keeps a few connections alive for a whole
    surge would leave the members' shares to the luck of those few choices (one run: 63/37); a new
    connection every ``limit`` requests is placed again. A connection is known by its client address
    and port; the most recent ``remembered`` are counted (a closed one is forgotten in time, and a port
    reused by a new connection only brings its close forward)."""

    def __init__(self, app: ASGIApp, limit: int, remembered: int = 65_536) -> None:
        self.app, self.limit, self._remembered = app, limit, remembered
        self._served: OrderedDict[tuple, int] = OrderedDict()     # connection -> requests so far, oldest first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit <= 0 or not scope.get("client"):
            await self.app(scope, receive, send)
            return
        key = tuple(scope["client"])
        served = self._served.pop(key, 0) + 1
        if served < self.limit:
            self._served[key] = served
            if len(self._served) > self._remembered:
                self._served.popitem(last=False)
            await self.app(scope, receive, send)
            return

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _with_close(message.get("headers", []))}
            await send(message)

        await self.app(scope, receive, closing_send)


class TraceAndMeasure:
    """ASGI middleware, outermost of ours: binds the trace id, answers an exception no route turned
    into an answer (``_unexpected``), sets ``traceparent`` on the answer, and counts, times and logs
    every request.

    A plain ASGI class, not Starlette's ``@app.middleware("http")``: that one runs each request's
    handler in a task group of its own and streams the answer through a memory channel, about a
    tenth of the API process's CPU per stamp request under a surge (py-spy).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent = next((v for k, v in scope["headers"] if k == b"traceparent"), None)
        token = tracing.bind(tracing.parse_traceparent(traceparent.decode("latin-1") if traceparent else None))
        started = time.perf_counter()
        status = 500
        answered = False

        async def traced_send(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"traceparent", tracing.traceparent(tracing.current()).encode())]}
            await send(message)

        try:
            try:
                await self.app(scope, receive, traced_send)
            except ClientDisconnect:    # the caller left mid-upload: nobody to answer, nothing went wrong here
                status = CLIENT_CLOSED
                log.info("client went away before its request was read", path=scope["path"])
            except Exception as exc:  # noqa: BLE001 - classified: a dependency away is 503, never 500
                if answered:        # too late for an answer of its own: the server drops the connection
                    raise
                await _unexpected(Request(scope), exc)(scope, receive, traced_send)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - started
            metrics.HTTP_REQUESTS.labels(path, str(status)).inc()
            metrics.HTTP_SECONDS.labels(path).observe(elapsed)
            if path not in ("/metrics", "/healthz"):
                log.info("http", method=scope["method"], route=path, status=status,
                         duration_ms=round(elapsed * 1000, 2))
            tracing.reset(token)


def create_app(title: str, routers: Sequence[APIRouter], lifespan=None, version: str = "0.1.0",
               default_max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, keepalive_requests: int = 0,
               ticket_key: bytes | None = None, caller: Callable[[str | None], str | None] | None = None,
               door_busy_file: str = "") -> FastAPI:
    """``ticket_key``: the platform key, so every API process honours the others' queue tickets
    (kernel/retry_after.py); without it, tickets hold in this process only. ``caller``: the channel an
    ``Authorization`` header names, or None; only known callers are given a place in line. ``door_busy_file``:
    where this process marks the door busy for the stamping workers on its box (kernel/door_pressure.py)."""
    app = FastAPI(title=title, version=version, lifespan=lifespan,
                  description="Bubuh e-Meterai platform API. Error codes: see docs/errors.md. Every route "
                              "that takes a body names its size limit (`x-max-body-bytes`); a route with an "
                              "API key checks it before reading the body.")
    for router in routers:
        app.include_router(router)
    # innermost of ours: the routes served directly (kernel/direct_lane.py) pass every check below first
    app.add_middleware(DirectLane, routers=routers, answer_error=bubuh_error_response)
    # added before the trace middleware, so it runs inside it: its refusals are traced and measured too
    app.state.retry_after = {}
    app.add_middleware(BodyLimits, routers=routers, default_limit=default_max_body_bytes,
                       spreads=app.state.retry_after, tickets=Tickets(ticket_key), caller=caller,
                       door=DoorMark(door_busy_file) if door_busy_file else None)
    if keepalive_requests > 0:
        app.add_middleware(KeepAliveLimit, limit=keepalive_requests)
    app.add_middleware(TraceAndMeasure)

    @app.exception_handler(errors.BubuhError)
    async def bubuh_error(request: Request, exc: errors.BubuhError):
        return bubuh_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(errors.BODY_INVALID, f"{where}: {first.get('msg', 'invalid')}".strip(": "))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(errors.NOT_FOUND, "no such route")
        if exc.status_code == 405:
            return JSONResponse(status_code=405, content={"code": "METHOD_NOT_ALLOWED", "message": str(exc.detail),
                                                          "detail": str(exc.detail), "trace_id": tracing.current()})
        return JSONResponse(status_code=exc.status_code,
                            content={"code": "HTTP_ERROR", "message": str(exc.detail), "detail": str(exc.detail),
                                     "trace_id": tracing.current()})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    return app


async def read_json_body(request: Request, limit: int) -> bytes:
    """The raw body of a JSON route, refused early when too large or not JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise errors.BubuhError(errors.UNSUPPORTED_MEDIA_TYPE, f"got {ctype or 'no content type'}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise errors.BubuhError(errors.BODY_TOO_LARGE, f"{declared} bytes > {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise errors.BubuhError(errors.BODY_TOO_LARGE, f"more than {limit} bytes")
    return bytes(body)
