"""``outbox.add_if``: a state change and the records it publishes, as one statement (its own transaction
outside one), on real PostgreSQL: queued only when the change applied, never without it."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from services.kernel import outbox
from services.kernel.events import Outgoing

GUARD = "UPDATE things SET state = $2 WHERE id = $1 AND state <> $2 RETURNING 1"


@pytest.fixture
async def things(pool):
    await pool.execute("CREATE TABLE things (id text PRIMARY KEY, state text NOT NULL)")
    await pool.execute("INSERT INTO things VALUES ('a', 'new')")
    return pool


def _records(tag: str, n: int = 1) -> list[Outgoing]:
    return [Outgoing("t", b"a", f"{tag}-{i}".encode(), [("h", b"v\xff")], f"{tag}-{i}") for i in range(n)]


async def _queued(pool) -> list[tuple[str, bytes, list]]:
    rows = await pool.fetch("SELECT event_id, value, headers FROM outbox ORDER BY id")
    return [(r["event_id"], r["value"], r["headers"]) for r in rows]


async def test_records_are_queued_with_the_change_and_not_again_once_it_is_done(things):
    async with things.acquire() as conn:
        assert await outbox.add_if(conn, GUARD, ["a", "done"], _records("first", 2)) is True
        assert await outbox.add_if(conn, GUARD, ["a", "done"], _records("again")) is False
    assert await things.fetchval("SELECT state FROM things WHERE id = 'a'") == "done"
    queued = await _queued(things)
    assert [e for e, _, _ in queued] == ["first-0", "first-1"]           # in list order, once
    assert queued[0][1] == b"first-0"
    assert json.loads(queued[0][2]) == [["h", "vÿ"]]                      # as the relay reads them back


async def test_nothing_is_queued_when_the_guard_matches_no_row(things):
    async with things.acquire() as conn:
        assert await outbox.add_if(conn, GUARD, ["missing", "done"], _records("x")) is False
    assert await _queued(things) == []


async def test_inside_a_transaction_a_rollback_takes_the_change_and_the_records(things):
    with pytest.raises(RuntimeError):
        async with things.acquire() as conn, conn.transaction():
            assert await outbox.add_if(conn, GUARD, ["a", "done"], _records("rolled")) is True
            raise RuntimeError("the caller fails after the change")
    assert await things.fetchval("SELECT state FROM things WHERE id = 'a'") == "new"
    assert await _queued(things) == []


async def test_a_failing_insert_leaves_the_change_undone(things):
    """One statement: a record the outbox refuses (no topic) undoes the state change too."""
    with pytest.raises(asyncpg.NotNullViolationError):
        async with things.acquire() as conn:
            await outbox.add_if(conn, GUARD, ["a", "done"], [Outgoing(None, b"a", b"v", [], "e")])
    assert await things.fetchval("SELECT state FROM things WHERE id = 'a'") == "new"
    assert await _queued(things) == []


async def test_two_callers_racing_for_one_change_queue_its_records_once(things):
    async def attempt(tag: str) -> bool:
        async with things.acquire() as conn:
            return await outbox.add_if(conn, GUARD, ["a", "done"], _records(tag))

    won = await asyncio.gather(*(attempt(f"r{i}") for i in range(6)))
    assert sorted(won) == [False] * 5 + [True]
    assert len(await _queued(things)) == 1


async def test_the_guard_and_the_records_are_one_round_trip_and_the_wake_one_more(things):
    sent: list[str] = []

    def log(q) -> None:
        sent.append(q.query)

    await things.execute("INSERT INTO things VALUES ('b', 'new')")
    async with things.acquire() as conn:
        await outbox.add_if(conn, GUARD, ["b", "done"], _records("warm"))   # asyncpg learns the types once
        conn.add_query_logger(log)
        try:
            await outbox.add_if(conn, GUARD, ["a", "done"], _records("one"))
        finally:
            conn.remove_query_logger(log)
    assert len(sent) == 2, sent
    assert sent[0].startswith("WITH guard AS (UPDATE things") and "pg_notify" in sent[1]


async def test_records_are_required(things):
    async with things.acquire() as conn:
        with pytest.raises(ValueError):
            await outbox.add_if(conn, GUARD, ["a", "done"], [])
    assert await things.fetchval("SELECT state FROM things WHERE id = 'a'") == "new"
