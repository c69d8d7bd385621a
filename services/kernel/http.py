"""The HTTP front shared by the services' routers: one error shape, trace ids, metrics, health.

Every error answer is ``{"code", "message", "detail", "trace_id"}`` with the status from the error
catalogue, whether it came from a ``BubuhError``, a malformed body or an unknown route.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.kernel import errors, failures, logs, metrics, tracing

log = logs.get(__name__)


def error_response(code: errors.ErrorCode, detail: str = "", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=code.http_status,
        content={"code": code.code, "message": code.meaning, "detail": detail or code.meaning,
                 "trace_id": tracing.current()},
        headers=headers,
    )


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """An exception no route turned into an answer: 503 with Retry-After when a dependency is away
    (a read-only or missing database, Kafka), else 500 (a bug, logged with its trace)."""
    route = getattr(request.scope.get("route"), "path", "unmatched")
    failure = failures.observe(f"http {route}", exc)
    if failure.waits:
        log.warning("dependency unavailable", route=route, kind=failure.kind.value, sqlstate=failure.sqlstate,
                    error=repr(exc)[:300])
        return error_response(errors.UNAVAILABLE, f"{type(exc).__name__}: retry after a moment",
                              {"Retry-After": "2"})
    log.error("request failed", route=route, error=repr(exc)[:500], exc_info=exc)
    return error_response(errors.INTERNAL, "an unexpected error; operations can find it by trace_id")


def create_app(title: str, routers: Sequence[APIRouter], lifespan=None, version: str = "0.1.0") -> FastAPI:
    app = FastAPI(title=title, version=version, lifespan=lifespan,
                  description="Bubuh e-Meterai platform API. Error codes: see docs/errors.md.")
    for router in routers:
        app.include_router(router)

    @app.middleware("http")
    async def trace_and_measure(request: Request, call_next):
        token = tracing.bind(tracing.parse_traceparent(request.headers.get("traceparent")))
        started = time.perf_counter()
        status = 500
        try:
            try:
                response = await call_next(request)
            except Exception as exc:  # noqa: BLE001 - classified: a dependency away is 503, never 500
                response = _unexpected(request, exc)
            status = response.status_code
            response.headers["traceparent"] = tracing.traceparent(tracing.current())
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            metrics.HTTP_REQUESTS.labels(path, str(status)).inc()
            metrics.HTTP_SECONDS.labels(path).observe(elapsed)
            if path not in ("/metrics", "/healthz"):
                log.info("http", method=request.method, route=path, status=status,
                         duration_ms=round(elapsed * 1000, 2))
            tracing.reset(token)

    @app.exception_handler(errors.BubuhError)
    async def bubuh_error(_request: Request, exc: errors.BubuhError):
        headers = {"Retry-After": "2"} if exc.code.retryable else None
        return error_response(exc.code, exc.detail, headers)

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
