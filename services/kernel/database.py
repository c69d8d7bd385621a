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

import asyncio
import contextlib
import functools
import ipaddress
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import asyncpg.transaction

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


class Connection(asyncpg.Connection):
    """Every connection of ours: it sends its transaction's wake-ups (NOTIFY) after the commit.

    PostgreSQL serialises the commits of all transactions that issued NOTIFY, cluster-wide (one lock
    on the notification queue, held through the commit's WAL flush), so every outbox write waited
    for the others' fsync: the lock waits over 50 ms the surge logged (issue 12). A transaction owes
    its wake-ups instead (``owe_wake``), and the connection sends them once the outermost commit
    returned, in a statement of their own that writes nothing and holds the lock for microseconds.
    A wake-up is a hint (listeners also poll): one lost to a failure right after the commit costs
    latency, never work; a rolled-back transaction owes nothing.
    """

    __slots__ = ("_owed_wakes", "schema")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._owed_wakes: set[tuple[str, bool]] = set()
        self.schema: str | None = None          # a pool's connections: the service schema its search_path names

    def get_reset_query(self) -> str:
        """Nothing for the pool to reset on release, so no round trip: asyncpg's default sends
        ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` every time a connection goes
        back (about 11 times per stamp across the tiers, each a message PostgreSQL parses and answers).
        Our pool connections keep no session state to undo: LISTEN has connections of its own
        (``listener.py``), cursors live inside transactions, advisory locks are transaction-scoped or
        released where taken (``migrations.py``, which also resets its search_path), and nothing else
        issues SET. An open transaction is still rolled back on release (asyncpg does that itself)."""
        return ""

    def owe_wake(self, channel: str, in_schema: bool = False) -> None:
        """``in_schema``: the channel is ``<current schema><channel>``."""
        self._owed_wakes.add((channel, in_schema))

    def transaction(self, *, isolation=None, readonly=False, deferrable=False) -> asyncpg.transaction.Transaction:
        self._check_open()
        return _WakingTransaction(self, isolation, readonly, deferrable)

    async def _after_transaction(self, committed: bool) -> None:
        if self.is_in_transaction():
            return                          # a savepoint ended; the wake-ups wait for the outermost commit
        owed, self._owed_wakes = self._owed_wakes, set()
        if not committed:
            return
        wakes = sorted((c, s) for c, s in owed if not wake_here(self, c, s))   # the rest are NOTIFYs
        if wakes:
            with contextlib.suppress(Exception):
                await self.execute("SELECT pg_notify(CASE WHEN s THEN current_schema() || c ELSE c END, '') "
                                   "FROM unnest($1::text[], $2::bool[]) AS u(c, s)",
                                   [c for c, _ in wakes], [s for _, s in wakes])


class _WakingTransaction(asyncpg.transaction.Transaction):
    __slots__ = ()

    async def __aexit__(self, extype, ex, tb) -> None:
        try:
            await super().__aexit__(extype, ex, tb)
        except BaseException:
            await self._connection._after_transaction(committed=False)
            raise
        await self._connection._after_transaction(committed=extype is None)


async def notify(conn: asyncpg.Connection, channel: str, *, in_schema: bool = False) -> None:
    """Wake the listeners of ``channel`` (``in_schema``: ``<current schema><channel>``) once the
    caller's transaction commits, none if it rolls back. On a connection of ours inside a transaction
    the NOTIFY follows the commit (``Connection``); elsewhere it is issued at once (NOTIFY is
    transactional: delivered at commit)."""
    owe = getattr(conn, "owe_wake", None)      # through a pool's proxy too
    if owe is not None and conn.is_in_transaction():
        owe(channel, in_schema)
    elif not wake_here(conn, channel, in_schema):
        await conn.execute("SELECT pg_notify(CASE WHEN $2 THEN current_schema() || $1 ELSE $1 END, '')",
                           channel, in_schema)


# The listeners of this process that are the only ones of their channel anywhere: an outbox's channel is heard by
# its relay's leader alone (kernel/outbox.py), and while that leader is in this process a wake-up sent from here is
# a call, not a round trip to PostgreSQL (and back through its LISTEN connection). Registered by ``Listener.run``.
_SOLE_LISTENERS: dict[str, Callable[[], None]] = {}


def hear_alone(channel: str, poke: Callable[[], None]) -> Callable[[], None]:
    """``poke`` is this process's listener of ``channel``, and no other process listens to it: wake-ups sent from
    here for it call ``poke`` instead of NOTIFY. Returns the undo (call it when the listener stops)."""
    _SOLE_LISTENERS[channel] = poke

    def undo() -> None:
        if _SOLE_LISTENERS.get(channel) is poke:
            del _SOLE_LISTENERS[channel]
    return undo


def wake_here(conn: asyncpg.Connection, channel: str, in_schema: bool) -> bool:
    """Wake ``channel``'s sole listener if it is in this process (True); False: NOTIFY it."""
    if not _SOLE_LISTENERS:
        return False
    if in_schema:
        schema = getattr(conn, "schema", None)
        if schema is None:
            return False
        channel = schema + channel
    poke = _SOLE_LISTENERS.get(channel)
    if poke is None:
        return False
    poke()
    return True


def connect_kwargs(settings: Settings) -> dict[str, Any]:
    mode = ssl_mode(settings)
    return {} if mode is None else {"ssl": mode}


async def connect(settings: Settings, **kw) -> asyncpg.Connection:
    """One connection outside any pool (LISTEN, probes, tools), with the same TLS choice as the pools."""
    return await asyncpg.connect(settings.database_url, connection_class=Connection, **connect_kwargs(settings), **kw)


async def close_quietly(conn: asyncpg.Connection) -> None:
    """Close a connection of its own (LISTEN, a leadership lock) within 2 s; the server gone, drop the socket."""
    try:
        await asyncio.wait_for(conn.close(), 2)
    except Exception:  # noqa: BLE001 - the server is gone; drop the socket
        with contextlib.suppress(Exception):
            conn.terminate()


async def create_pool(settings: Settings, service: str, *, min_size: int | None = None,
                      max_size: int | None = None) -> asyncpg.Pool:
    schema = settings.schema(service)
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min if min_size is None else min_size,
        max_size=max_size or settings.db_pool_max,
        command_timeout=settings.db_command_timeout_s,
        server_settings={"search_path": schema, "application_name": f"bubuh-{service}"},
        connection_class=Connection,
        init=functools.partial(_know_schema, schema),
        **connect_kwargs(settings),
    )


async def _know_schema(schema: str, conn: Connection) -> None:
    conn.schema = schema


async def healthy(pool: asyncpg.Pool, timeout_s: float = 2.0) -> bool:
    """Does the database answer a trivial query and accept writes now? (the probe behind ``suspect``)"""
    try:
        async with pool.acquire(timeout=timeout_s) as conn:
            return await conn.fetchval("SELECT NOT pg_is_in_recovery()", timeout=timeout_s) is True
    except Exception:  # noqa: BLE001 - any failure of the probe means: not healthy now
        return False
