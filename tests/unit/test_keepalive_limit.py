"""An API connection is closed after ``http_keepalive_requests`` requests (services/kernel/http.py,
``KeepAliveLimit``): served by uvicorn on a loopback port, read by a client that keeps one connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import uvicorn
from fastapi import APIRouter, Request

from services.kernel import http
from services.kernel.http import KeepAliveLimit
from services.kernel.http_protocol import BoundedHead


def _app(limit: int):
    r = APIRouter()

    @r.get("/who")
    async def who(request: Request):
        return {"port": request.client.port}      # the client's end of this connection
    return http.create_app("t", [r], keepalive_requests=limit)


@contextlib.asynccontextmanager
async def _served(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off", timeout_keep_alive=30,
                                           http=BoundedHead))      # the platform's protocol
    server.install_signal_handlers = lambda: None
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await serving


async def test_a_connection_is_closed_after_its_limit_and_the_client_carries_on_over_a_new_one():
    async with _served(_app(3)) as url, httpx.AsyncClient(
            base_url=url, limits=httpx.Limits(max_connections=1)) as client:
        answers = [await client.get("/who") for _ in range(7)]
    assert all(a.status_code == 200 for a in answers)
    closing = [i for i, a in enumerate(answers, 1) if a.headers.get("connection") == "close"]
    assert closing == [3, 6]                        # the third request of each connection
    ports = [a.json()["port"] for a in answers]
    assert ports[0] == ports[1] == ports[2] != ports[3] == ports[4] == ports[5] != ports[6]


async def test_no_limit_keeps_one_connection():
    async with _served(_app(0)) as url, httpx.AsyncClient(
            base_url=url, limits=httpx.Limits(max_connections=1)) as client:
        answers = [await client.get("/who") for _ in range(7)]
    assert len({a.json()["port"] for a in answers}) == 1
    assert not any(a.headers.get("connection") == "close" for a in answers)


async def test_the_connections_remembered_are_bounded_and_each_is_counted_apart():
    seen: list[bool] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit = KeepAliveLimit(app, limit=2, remembered=3)

    async def call(port: int) -> None:
        sent = []

        async def send(message):
            sent.append(message)
        await limit({"type": "http", "client": ("127.0.0.1", port)}, None, send)
        seen.append((b"connection", b"close") in sent[0]["headers"])

    for port in (1, 2, 1, 2):                    # two connections, each closed on its second request
        await call(port)
    assert seen == [False, False, True, True]
    for port in range(10, 20):
        await call(port)
    assert len(limit._served) == 3                # only the most recent connections are remembered
