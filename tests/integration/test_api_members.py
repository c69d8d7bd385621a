"""Several API processes behind one port (BUBUH_HTTP_REUSE_PORT): the kernel spreads connections
over them, a connection kept alive is closed after BUBUH_HTTP_KEEPALIVE_REQUESTS so it is spread
again, each shows its own work on its own /metrics port, and a process that did not ask to share
still finds the port taken."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests import stack
from tests.platform import PlatformProcess, cli

pytestmark = pytest.mark.usefixtures("local_stack")


def _answered(metrics_port: int) -> float:
    """Requests this member answered, by its own /metrics (probes and scrapes not counted)."""
    body = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(float(m[2]) for m in re.finditer(r'^bubuh_http_requests_total\{route="([^"]*)",[^}]*\} (\S+)$',
                                                body, re.M) if m[1] not in ("/metrics", "/healthz"))


async def test_two_api_members_share_one_port_and_both_answer(settings):
    ports = [stack.free_port(), stack.free_port()]
    members = [PlatformProcess(settings, api="stamping", workers="none", name=f"api-{i}",
                               BUBUH_HTTP_REUSE_PORT="true", BUBUH_METRICS_PORT=str(port),
                               BUBUH_HTTP_KEEPALIVE_REQUESTS="5")
               for i, port in enumerate(ports, start=1)]
    try:
        await asyncio.gather(*(m.start() for m in members))
        # a fresh connection per request: the kernel picks a member for each
        for _ in range(60):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10) as c:
                r = await c.get("/v1/stamps/not-a-request")
                assert r.status_code == 401 and r.json()["code"]
        answered = [_answered(p) for p in ports]
        assert sum(answered) == 60, answered
        assert all(n >= 10 for n in answered), f"one member took (nearly) all connections: {answered}"

        # one client keeping one connection alive: each member closes it after 5 requests, and each new
        # connection is placed again (20 of them: both members answer, whatever the kernel's luck)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10,
                                     limits=httpx.Limits(max_connections=1)) as c:
            kept = [await c.get("/v1/stamps/not-a-request") for _ in range(100)]
        assert sum(r.headers.get("connection") == "close" for r in kept) == 20
        more = [_answered(p) - before for p, before in zip(ports, answered, strict=True)]
        assert sum(more) == 100 and all(n >= 10 for n in more), f"one kept-alive client stuck to one member: {more}"

        # sharing is opt-in: a process that did not ask for it is refused the port, in one clear line
        alone = cli(settings, "serve", "--api", "stamping", "--workers", "none", check=False)
        assert alone.returncode == 2 and f"port 127.0.0.1:{settings.http_port} is taken" in alone.stderr

        # one member gone: the other still serves the port
        members[0].kill()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10) as c:
            for _ in range(10):
                assert (await c.get("/v1/stamps/not-a-request")).status_code == 401
    finally:
        await asyncio.gather(*(m.stop() for m in members))
