"""Wake-ups (NOTIFY) leave the transaction: a connection of ours sends them after the commit.

PostgreSQL serialises the commits of every transaction that issued NOTIFY through one cluster-wide
lock held across the WAL flush; the surge logged those waits over 50 ms (issue 12). These tests pin
what the deferral must keep: a listener hears a committed transaction's wake-up, never a rolled-back
one's, a savepoint's only when the outer transaction commits, and nothing before the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.kernel import database, outbox
from services.kernel.events import Outgoing
from tests.component import handler_support as hs


@pytest.fixture(scope="module")
async def db():
    hs.postgres_up()
    s = hs.settings()
    async with hs.service_pool(s, "quota", max_size=2) as pool:
        yield s, pool


class Heard:
    def __init__(self) -> None:
        self.channels: list[str] = []
        self.changed = asyncio.Event()

    def __call__(self, _conn, _pid, channel, _payload) -> None:
        self.channels.append(channel)
        self.changed.set()

    async def within(self, seconds: float) -> list[str]:
        try:
            await asyncio.wait_for(self.changed.wait(), seconds)
        except TimeoutError:
            pass
        return list(self.channels)


@contextlib.asynccontextmanager
async def _listening(s, *channels: str) -> AsyncIterator[Heard]:
    """What a LISTEN connection of its own hears on ``channels`` while the block runs."""
    conn = await database.connect(s)
    heard = Heard()
    try:
        for c in channels:
            await conn.add_listener(c, heard)
        yield heard
    finally:
        await conn.close()


async def test_a_committed_transaction_wakes_after_its_commit_and_only_then(db):
    s, pool = db
    async with _listening(s, "wake-a") as heard:
        async with pool.acquire() as conn:
            assert hasattr(conn, "owe_wake")                      # a pool connection is ours
            async with conn.transaction():
                await database.notify(conn, "wake-a")
                await database.notify(conn, "wake-a")             # owed once
                assert await heard.within(0.3) == []               # nothing before the commit
            assert await heard.within(3) == ["wake-a"]
        await asyncio.sleep(0.2)
        assert heard.channels == ["wake-a"]


async def test_a_rolled_back_transaction_wakes_nobody(db):
    s, pool = db
    async with _listening(s, "wake-b") as heard:
        async with pool.acquire() as conn:
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await database.notify(conn, "wake-b")
                    raise RuntimeError("the handler failed")
            # the next transaction on the same connection does not carry the rolled-back wake-up
            async with conn.transaction():
                await conn.execute("SELECT 1")
        assert await heard.within(0.5) == []


async def test_a_savepoints_wake_up_waits_for_the_outer_commit(db):
    s, pool = db
    async with _listening(s, "wake-c") as heard:
        async with pool.acquire() as conn, conn.transaction():
            async with conn.transaction():
                await database.notify(conn, "wake-c")
            assert await heard.within(0.3) == []
        assert await heard.within(3) == ["wake-c"]


async def test_the_outbox_wakes_its_own_schemas_relay_after_the_commit(db):
    s, pool = db
    channel = f"{s.schema('quota')}_outbox"
    async with _listening(s, channel) as heard:
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, [Outgoing("t", b"k", b"v", [], "event-1")])
            assert await heard.within(0.3) == []
        assert await heard.within(3) == [channel]
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE event_id = 'event-1'") == 1


async def test_a_plain_connection_still_notifies_inside_its_transaction(db):
    """A connection that is not ours (a tool's asyncpg.connect) gets NOTIFY in the transaction, as before."""
    s, _ = db
    plain = await asyncpg.connect(s.database_url, **database.connect_kwargs(s))
    try:
        async with _listening(s, "wake-d") as heard:
            assert not hasattr(plain, "owe_wake")
            async with plain.transaction():
                await database.notify(plain, "wake-d")
            assert await heard.within(3) == ["wake-d"]
    finally:
        await plain.close()
