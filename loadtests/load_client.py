"""The load generators' HTTP client: channels' requests at the least CPU this box can spend on them.

The load generator runs on the same two cores as the platform, Kafka and PostgreSQL, so every
millisecond it spends per request is taken from what it measures. httpx cost it 1.9-2.4 ms of CPU per
status read and aiohttp 0.21-0.26 ms (16 readers against the running API, 5 s each, two rounds; the
API then answered 1,100-1,300 reads/s instead of 380-480). Channels' own clients run on their own
machines; ours should take as little of the platform's as it can.

``request`` sends one request and returns an ``Answer`` (status, headers, body), or raises one of
``TRANSPORT_ERRORS`` (no answer: refused, reset, timed out); a timeout cancels the request cleanly
(with httpx, a request cancelled while it waited for a pool connection could keep that slot for good,
encode/httpcore#1093).
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from dataclasses import dataclass
from typing import Any

import aiohttp

TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


# docs/channels.md, "When POST /v1/stamps answers 503": sent back with the retry, it keeps the request's place
TICKET_HEADER = "Bubuh-Queue-Ticket"


def bearer(api_key: str) -> dict[str, str]:
    """A channel's request headers: its API key as the bearer token (docs/channels.md)."""
    return {"Authorization": f"Bearer {api_key}"}


@dataclass(frozen=True)
class Answer:
    status_code: int
    headers: dict[str, str]
    content: bytes

    def header(self, name: str) -> str | None:
        """One header of the answer, its name in any case."""
        name = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == name), None)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class LoadClient:
    """One connection pool of ``max_connections`` to ``base_url``; requests beyond them wait their turn."""

    def __init__(self, base_url: str, *, max_connections: int = 16, timeout_s: float = 30.0) -> None:
        self._base = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)

    async def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                      json: Any = None, form: dict[str, str] | None = None,
                      file: tuple[str, bytes, str] | None = None, timeout_s: float | None = None) -> Answer:
        """``form`` and ``file`` (name, content, media type: the part named ``file``) send multipart/form-data."""
        data = None
        if form is not None or file is not None:
            data = aiohttp.FormData()
            for name, value in (form or {}).items():
                data.add_field(name, value)
            if file is not None:
                filename, content, media_type = file
                data.add_field("file", content, filename=filename, content_type=media_type)
        timeout = aiohttp.ClientTimeout(total=timeout_s if timeout_s is not None else self._timeout_s)
        async with self._session.request(method, self._base + path, headers=headers, json=json, data=data,
                                         timeout=timeout) as r:
            return Answer(r.status, dict(r.headers), await r.read())

    async def get(self, path: str, **kw) -> Answer:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw) -> Answer:
        return await self.request("POST", path, **kw)

    async def aclose(self) -> None:
        await self._session.close()
        await asyncio.sleep(0)      # let the connector close its transports before the loop may end

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
