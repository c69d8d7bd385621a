"""The HTTP client (httpx over httpcore: the webhook sender, the CLI, the load generator) does not search
the import path on every request.

httpcore 1.0 runs ``import sniffio`` each time it makes a lock, an event or a cancellation shield, and
anyio >= 4.11 no longer installs sniffio. Python does not remember a failed import, so without sniffio
every request searched sys.path several times: a fifth of the load generator's CPU in a surge (py-spy),
on the same two cores as the platform. pyproject.toml names sniffio for that reason.
"""

from __future__ import annotations

import asyncio
import sys

import httpx


class _Searches:
    """A finder ahead of Python's own that only records which modules were looked for."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name, path=None, target=None):
        self.names.append(name)
        return None


async def _requests(n: int) -> list[str]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionResetError):
            pass
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    async with server, httpx.AsyncClient() as client:
        assert (await client.get(url)).text == "ok"      # the first request imports what it needs
        searches = _Searches()
        sys.meta_path.insert(0, searches)
        try:
            for _ in range(n):
                assert (await client.get(url)).status_code == 200
        finally:
            sys.meta_path.remove(searches)
    return searches.names


def test_requests_after_the_first_import_nothing() -> None:
    searched = asyncio.run(_requests(20))
    assert searched == [], f"each request searched the import path for {sorted(set(searched))}"
