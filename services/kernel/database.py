"""The PostgreSQL pool of a service, bound to that service's own schema.

Every connection's ``search_path`` is the service's schema, so SQL is written unqualified and a
service cannot read another's tables by accident. What a database error means (wait, retry, or
the record is bad) is decided in one place: ``kernel/failures.py``.

TLS: ``BUBUH_DATABASE_SSL=auto`` (the default) talks plain TCP to a server on a loopback address,
where TLS protects nothing and costs a handshake per connection and a cipher per round trip, and
leaves every other host to the URL's ``sslmode`` (libpq's default, ``prefer``). Production sets
``require`` or ``verify-full``.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from services.kernel.settings import Settings

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _is_loopback(host: str | None) -> bool:
    if not host:
        return True                      # no host: a Unix socket
    if host.startswith("/") or host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ssl_mode(settings: Settings) -> str | None:
    """The ``ssl`` argument for asyncpg: a mode, or None to follow the URL."""
    mode = settings.database_ssl.lower()
    if mode != "auto":
        return mode
    url = urlsplit(settings.database_url)
    if "sslmode" in parse_qs(url.query):
        return None
    return "disable" if _is_loopback(url.hostname) else None


def connect_kwargs(settings: Settings) -> dict[str, Any]:
    mode = ssl_mode(settings)
    return {} if mode is None else {"ssl": mode}


async def connect(settings: Settings, **kw) -> asyncpg.Connection:
    """One connection outside any pool (LISTEN, probes, tools), with the same TLS choice as the pools."""
    return await asyncpg.connect(settings.database_url, **connect_kwargs(settings), **kw)


async def create_pool(settings: Settings, service: str, *, min_size: int | None = None,
                      max_size: int | None = None) -> asyncpg.Pool:
    schema = settings.schema(service)
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min if min_size is None else min_size,
        max_size=max_size or settings.db_pool_max,
        command_timeout=settings.db_command_timeout_s,
        server_settings={"search_path": schema, "application_name": f"bubuh-{service}"},
        **connect_kwargs(settings),
    )


async def healthy(pool: asyncpg.Pool, timeout_s: float = 2.0) -> bool:
    """Does the database answer a trivial query and accept writes now? (the probe behind ``suspect``)"""
    try:
        async with pool.acquire(timeout=timeout_s) as conn:
            return await conn.fetchval("SELECT NOT pg_is_in_recovery()", timeout=timeout_s) is True
    except Exception:  # noqa: BLE001 - any failure of the probe means: not healthy now
        return False
