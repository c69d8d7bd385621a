"""The direct lane (kernel/direct_lane.py): a route handed to it is answered by its handler inside our
middleware, with the same routing, error answers, traces and metrics as through FastAPI; the OpenAPI
document does not change."""

from __future__ import annotations

from unittest.mock import MagicMock

import httpx
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

from services.kernel import direct_lane, errors, http, metrics
from services.kernel.settings import Settings
from services.stamping import api as stamping_api

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class _Items:
    """A router with a direct route, a route declared before it that shares its paths, and a handler
    that fails as told."""

    def __init__(self) -> None:
        self.declared_calls = 0
        r = APIRouter()

        @r.get("/items/special")
        async def special():
            return {"special": True}

        async def item(request: Request) -> Response:
            fail = request.query_params.get("fail")
            if fail == "busy":
                raise errors.BubuhError(errors.UNAVAILABLE, "try later")
            if fail == "key":
                raise errors.BubuhError(errors.UNAUTHENTICATED)
            if fail == "bug":
                raise RuntimeError("a bug")
            return JSONResponse({"id": request.path_params["item_id"], "auth": request.headers.get("authorization")})

        @r.get("/items/{item_id}")
        async def item_declared(request: Request, item_id: str, authorization: str | None = Header(None)):
            """An item."""
            self.declared_calls += 1
            return await item(request)

        direct_lane.serve_directly(r, item)
        self.router = r

    def client(self) -> httpx.AsyncClient:
        app = http.create_app("t", [self.router])
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})

    async def answers(self, *requests: tuple[str, str]) -> list[httpx.Response]:
        """Each ``(method, path)`` through the app ``create_app`` builds, in turn."""
        async with self.client() as c:
            return [await c.request(method, path) for method, path in requests]


async def test_a_direct_route_is_answered_by_its_handler_traced_and_counted_under_its_route():
    items = _Items()
    before = metrics.HTTP_REQUESTS.labels("/items/{item_id}", "200")._value.get()
    async with items.client() as c:
        r = await c.get("/items/a1", headers={"Authorization": "Bearer k"})
    assert (r.status_code, r.json()) == (200, {"id": "a1", "auth": "Bearer k"})
    assert items.declared_calls == 0                  # not through FastAPI's endpoint
    assert TRACE in r.headers["traceparent"]
    assert metrics.HTTP_REQUESTS.labels("/items/{item_id}", "200")._value.get() == before + 1


async def test_its_errors_are_the_catalogued_answers_and_a_bug_is_a_coded_500():
    busy, key, bug = await _Items().answers(("GET", "/items/a1?fail=busy"), ("GET", "/items/a1?fail=key"),
                                            ("GET", "/items/a1?fail=bug"))
    assert (busy.status_code, busy.json()["code"], busy.json()["detail"]) == (503, "UNAVAILABLE", "try later")
    assert busy.headers["retry-after"] == "2" and busy.json()["trace_id"] == TRACE
    assert (key.status_code, key.json()["code"], "retry-after" in key.headers) == (401, "UNAUTHENTICATED", False)
    assert (bug.status_code, bug.json()["code"]) == (500, "INTERNAL")


async def test_routing_stays_fastapis_an_earlier_route_keeps_its_path_and_other_methods_are_refused():
    items = _Items()
    special, post, deeper = await items.answers(("GET", "/items/special"), ("POST", "/items/a1"),
                                                ("GET", "/items/a1/more"))
    assert (special.status_code, special.json()) == (200, {"special": True})
    assert (post.status_code, post.json()["code"]) == (405, "METHOD_NOT_ALLOWED")
    assert (deeper.status_code, deeper.json()["code"]) == (404, "NOT_FOUND")
    assert items.declared_calls == 0


async def test_without_the_lane_the_declared_operation_gives_the_same_answer():
    """A router mounted without ``create_app`` (no lane) still answers, through the declared endpoint."""
    from fastapi import FastAPI

    items = _Items()
    bare = FastAPI()
    bare.include_router(items.router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=bare), base_url="http://t") as c:
        r = await c.get("/items/a1", headers={"Authorization": "Bearer k"})
    assert (r.status_code, r.json(), items.declared_calls) == (200, {"id": "a1", "auth": "Bearer k"}, 1)


def test_the_stamp_request_and_the_status_read_take_the_lane_and_keep_their_contract():
    settings = Settings()
    router = stamping_api.router(settings, *(MagicMock() for _ in range(4)))
    direct = {(route.path, *sorted(route.methods)) for route in router.routes
              if direct_lane.handler_of(route) is not None}
    assert direct == {("/v1/stamps", "POST"), ("/v1/stamps/{request_id}", "GET")}
    doc = http.create_app("Bubuh", [router]).openapi()
    post = doc["paths"]["/v1/stamps"]["post"]
    assert {(p["in"], p["name"]) for p in post["parameters"]} == {("header", "authorization"),
                                                                  ("header", "Idempotency-Key")}
    assert "multipart/form-data" in post["requestBody"]["content"] and "202" in post["responses"]
    get = doc["paths"]["/v1/stamps/{request_id}"]["get"]
    assert {(p["in"], p["name"]) for p in get["parameters"]} == {("path", "request_id"), ("header", "authorization")}
