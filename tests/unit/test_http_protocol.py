"""The platform's HTTP protocol (services/kernel/http_protocol.py): httptools with a bounded request head,
served by uvicorn on a loopback port and spoken to over raw sockets (a head is bytes, not a client's idea
of one)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import uvicorn
from fastapi import APIRouter, Request

from services.kernel import errors, http, metrics
from services.kernel.http_protocol import HEAD_LIMIT_BYTES, REFUSED_ROUTE, BoundedHead


def _app():
    r = APIRouter()

    @r.get("/head")
    async def head(request: Request):
        return {"x_big": len(request.headers.get("x-big", ""))}

    @r.post("/body")
    async def body(request: Request):
        return {"bytes": len(await request.body())}
    return http.create_app("t", [r], default_max_body_bytes=1_000_000)


@contextlib.asynccontextmanager
async def _served():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_app(), log_config=None, lifespan="off", http=BoundedHead))
    server.install_signal_handlers = lambda: None
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await serving


def _get(big: int) -> bytes:
    return b"GET /head HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * big + b"\r\n\r\n"


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(lines[0].split()[1]), headers, body


def _refusals() -> float:
    return metrics.HTTP_REQUESTS.labels(REFUSED_ROUTE, "431")._value.get()


async def test_heads_under_the_limit_are_served_one_after_another_on_one_connection():
    async with _served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # each head alone is under the limit, three together are not: the count starts again per request
        for size in (20_000, 20_000, 20_000):
            writer.write(_get(size))
            status, headers, body = await _answer(reader)
            assert (status, json.loads(body)) == (200, {"x_big": size})
            assert headers.get("connection") != "close"
        writer.close()


async def test_a_small_head_and_a_large_body_in_one_write_are_served():
    """The body's bytes arriving in the head's read are not head: only a head unfinished after a read counts."""
    async with _served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"z" * 200_000
        writer.write(b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status, _, answer = await _answer(reader)
        assert (status, json.loads(answer)) == (200, {"bytes": len(body)})
        writer.close()


async def test_a_head_over_the_limit_is_431_with_its_code_and_the_connection_closed():
    before = _refusals()
    async with _served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /head HTTP/1.1\r\nHost: t\r\n")
        for _ in range(4):                         # a head arriving in parts, as a slow client sends it
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"X-Big: " + b"a" * (HEAD_LIMIT_BYTES // 3) + b"\r\n")
        status, headers, body = await _answer(reader)
        assert status == errors.REQUEST_HEAD_TOO_LARGE.http_status == 431
        assert f"{HEAD_LIMIT_BYTES // 1024} KiB" in errors.REQUEST_HEAD_TOO_LARGE.meaning   # docs/errors.md
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        answer = json.loads(body)
        assert answer["code"] == "REQUEST_HEAD_TOO_LARGE" and str(HEAD_LIMIT_BYTES) in answer["detail"]
        assert headers["traceparent"].split("-")[1] == answer["trace_id"]
        assert await asyncio.wait_for(reader.read(), 5) == b""       # closed by the server
        writer.close()
    assert _refusals() == before + 1


async def test_a_head_without_end_is_cut_off_near_the_limit_not_buffered():
    """20 MB of one header, streamed: refused within one read past the limit, in well under a second."""
    async with _served() as port:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        chunk, sent, started = b"a" * 16_384, 0, time.perf_counter()
        await loop.sock_sendall(sock, b"GET /head HTTP/1.1\r\nHost: t\r\nX-Big: ")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 20_000_000:
                await asyncio.wait_for(loop.sock_sendall(sock, chunk), 5)
                sent += len(chunk)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while data := await asyncio.wait_for(loop.sock_recv(sock, 65_536), 5):
                answer += data
        sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    assert sent < HEAD_LIMIT_BYTES + 256 * 1024 + 2 * 65_536, sent   # the limit, one read, the socket buffers
    assert time.perf_counter() - started < 5


async def test_a_malformed_request_is_still_a_400():
    async with _served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /head HTTP/1.1\r\nHost t\r\n\r\n")      # a header line without its colon
        head = await asyncio.wait_for(reader.read(), 5)
        assert head.startswith(b"HTTP/1.1 400 ")
        writer.close()
