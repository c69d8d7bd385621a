"""Requests looked up by their ids read their rows from the primary key, however many requests are open.

The stamping schema's partial indexes on status (``requests_open``, ``requests_on_quota``) serve the scans
that want every open request. A lookup of a few ids that also tests the status could be planned over them
instead: their row count in ``pg_class`` is the one of the last vacuum or analyze, and taken while the queue
was empty it costs a scan of them as nothing, however many requests a surge has opened since. Then each call
read every open request (22 ms for 4 ids beside 1,327 open ones, 6 December). Here a table of finished
requests is vacuumed with none open, a surge's worth of requests is opened, and each lookup's generic plan is
read with its buffers."""

from __future__ import annotations

import json

import pytest

from services.stamping import fair_queue, tracker
from services.stamping.http_intake import FORGET
from tests.component import handler_support as hs

OPEN = 3000          # requests open beside the few looked up
FINISHED = 50_000    # the history the table holds, vacuumed while none was open
PARTIAL = {"requests_open", "requests_on_quota"}


@pytest.fixture(scope="module")
async def pool():
    hs.postgres_up()
    async with hs.service_pool(hs.settings(), "stamping", max_size=2) as pool:
        yield pool


def _indexes(plan: dict) -> set[str]:
    found = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", []):
        found |= _indexes(child)
    return found


def _buffers(plan: dict) -> int:
    return plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)


async def _explained(pool, statement: str, *args) -> tuple[dict, list]:
    """The statement's generic plan as run (EXPLAIN ANALYZE, rolled back), and what it returned (run again,
    rolled back)."""
    async with pool.acquire() as conn:
        tr = conn.transaction()
        await tr.start()
        try:
            # the plan a prepared statement keeps after its first runs (asyncpg prepares every statement)
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", *args))
        finally:
            await tr.rollback()
        tr = conn.transaction()
        await tr.start()
        try:
            rows = await conn.fetch(statement, *args)
        finally:
            await tr.rollback()
    return plan[0]["Plan"], rows


async def _after_a_quiet_hour(pool, open_status: str) -> None:
    """``FINISHED`` completed requests, the statistics taken with none open (as after a quiet hour), then a
    surge's ``OPEN`` requests, ``open-1`` .. ``open-N``, in ``open_status`` (an SQL expression of ``i``)."""
    await pool.execute("DELETE FROM schedule")
    await pool.execute("DELETE FROM requests")
    await pool.execute(
        "INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at, finished_at) "
        "SELECT 'done-' || i, 'ch', 'acct', 'completed', now() - interval '1 day', now() - interval '1 day' "
        "FROM generate_series(1, $1) AS i", FINISHED)
    await pool.execute("VACUUM ANALYZE requests")
    await pool.execute(
        "INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at) "
        f"SELECT 'open-' || i, 'ch-' || (i % 4), 'acct', {open_status}, now() - make_interval(secs => i) "
        "FROM generate_series(1, $1) AS i", OPEN)


async def test_lookups_by_id_read_the_primary_key_beside_a_surge_of_open_requests(pool):
    await _after_a_quiet_hour(pool, "CASE WHEN i % 2 = 0 THEN 'reserved' ELSE 'queued' END")
    await pool.execute(
        "INSERT INTO requests (request_id, channel_id, account_id, status, sn) "
        "SELECT 'signed-' || i, 'ch-0', 'acct', 'signed', 'SN-' || i FROM generate_series(1, 4) AS i")
    signed = [f"signed-{i}" for i in range(1, 5)]
    queued = [f"open-{i}" for i in range(1, 16, 2)]            # odd: queued
    asked = {
        "the tracker's signed rows": (tracker._SIGNED_ROWS, [*signed, "open-2"], set(signed)),
        "the tracker's release": (tracker._RELEASE, [*signed, "open-2"], set(signed)),
        "the fair queue's reserved": (fair_queue._SHOW_RESERVED, [*queued, "open-2", "signed-1"], len(queued)),
    }
    wrong = []
    for name, (statement, ids, expected) in asked.items():
        plan, rows = await _explained(pool, statement, ids)
        used = _indexes(plan)
        if used & PARTIAL or "requests_pkey" not in used:
            wrong.append(f"{name}: planned over {sorted(used)}")
        # a probe per id asked; a scan of the open requests touches hundreds of pages
        if _buffers(plan) >= 20 * len(ids):
            wrong.append(f"{name}: {_buffers(plan)} buffers for {len(ids)} ids")
        if isinstance(expected, set):
            assert {r["request_id"] for r in rows} == expected, name
        else:
            assert len(rows) == expected, name     # only the queued ones move to reserved
    assert wrong == []


async def test_a_refused_requests_row_is_removed_by_its_primary_key_and_only_while_queued(pool):
    """The door's ``_forget``: one id, the same trap (the refusal path runs in a surge's spike)."""
    await _after_a_quiet_hour(pool, "CASE WHEN i = 1 THEN 'reserved' ELSE 'queued' END")
    plan, _ = await _explained(pool, FORGET, "open-2")
    assert _indexes(plan) == {"requests_pkey"}
    assert _buffers(plan) < 20
    assert await pool.execute(FORGET, "open-1") == "DELETE 0"        # moved on: stays
    assert await pool.execute(FORGET, "open-2") == "DELETE 1"
