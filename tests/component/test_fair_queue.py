"""The fair queue on real PostgreSQL (``services/stamping/fair_queue.py``): a flood does not starve a small
channel, weights set the shares, positions follow the order, and a taker's row is free again when its
connection dies (a killed worker), never lost and never signed by two at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import pytest

from services.contracts.bubuh.v1 import quota_pb2
from services.kernel import database, events
from services.stamping.fair_queue import Enqueue, FairQueue, Takers
from services.stamping.tracker import TYPES
from tests.component import handler_support as hs

WHERE = {"consumer": "stamping.worker", "dead_letter_topic": "stamp.dead-letter"}   # as service.py names them


@pytest.fixture
async def pool(settings):
    async with hs.service_pool(settings, "stamping", max_size=6) as pool:
        yield pool


def _reserved(channel: str, n: int) -> list:
    return [hs.event(quota_pb2.QuotaReserved(request_id=f"{channel}-{uuid.uuid4().hex[:8]}-{i}", channel_id=channel,
                                             account_id="acct"), producer="quota", topic="quota.events")
            for i in range(n)]


async def _enqueue(pool, queue: FairQueue, batch: list) -> None:
    await Enqueue(pool, queue).process(batch)


async def _take_all(settings, pool, limit: int | None = None) -> list[str]:
    """Take (and 'stamp') up to ``limit`` queued requests, one at a time; their channels in order."""
    order: list[str] = []

    async def stamp(event) -> None:
        order.append(event.payload.channel_id)

    takers = Takers(settings, pool, stamp, count=1, **WHERE)
    while (limit is None or len(order) < limit) and await takers.take_one():
        pass
    return order


async def test_a_flood_queued_first_does_not_keep_a_small_channel_waiting(settings, pool):
    queue = FairQueue()
    await _enqueue(pool, queue, _reserved("flood", 100))
    await _enqueue(pool, queue, _reserved("small", 5))
    order = await _take_all(settings, pool)
    assert len(order) == 105
    last_small = max(i for i, c in enumerate(order) if c == "small")
    assert last_small <= 10, order[:12]     # one each, turn about: the fifth small one is 10th, not 105th


async def test_a_channel_that_arrives_late_starts_at_the_head_not_behind_the_flood(settings, pool):
    queue = FairQueue()
    await _enqueue(pool, queue, _reserved("flood", 60))
    assert await _take_all(settings, pool, limit=40) == ["flood"] * 40
    await _enqueue(pool, queue, _reserved("late", 3))
    order = await _take_all(settings, pool)
    assert [i for i, c in enumerate(order) if c == "late"] == [1, 3, 5], order[:8]


async def test_weights_set_each_backlogged_channels_share(settings, pool):
    queue = FairQueue({"heavy": 3})
    batch = [e for pair in zip(_reserved("heavy", 90), _reserved("light", 90), strict=True) for e in pair]
    await _enqueue(pool, queue, batch)
    first = await _take_all(settings, pool, limit=80)
    assert first.count("heavy") == pytest.approx(60, abs=2)
    assert first.count("light") == pytest.approx(20, abs=2)


async def test_positions_are_per_channel(settings, pool):
    queue = FairQueue()
    flood, small = _reserved("flood", 50), _reserved("small", 2)
    await _enqueue(pool, queue, flood)
    await _enqueue(pool, queue, small)
    async with pool.acquire() as conn:
        assert await queue.ahead_of(conn, flood[0].payload.request_id) == 0
        assert await queue.ahead_of(conn, small[0].payload.request_id) == 1     # after the flood's first
        assert await queue.ahead_of(conn, flood[-1].payload.request_id) == 51
        assert await queue.ahead_of(conn, "not-queued") is None
        # a new request: a small channel's goes near the head, the flood's behind its own backlog
        order = await queue.order(conn)
        assert order.ahead_of_new("other", 0, queue.weight) <= 2
        assert order.ahead_of_new("small", 0, queue.weight) <= 5
        assert order.ahead_of_new("flood", 0, queue.weight) == 52
        assert order.ahead_of_new("flood", 10, queue.weight) == 52 + 10   # and behind its own on quota


async def test_a_request_queued_twice_keeps_its_place(settings, pool):
    queue = FairQueue()
    first = _reserved("a", 3)
    await _enqueue(pool, queue, first)
    await _enqueue(pool, queue, _reserved("b", 3))
    await _enqueue(pool, queue, first[:1])                # a redelivery of a record already queued
    assert await pool.fetchval("SELECT count(*) FROM schedule") == 6
    async with pool.acquire() as conn:
        assert await queue.ahead_of(conn, first[0].payload.request_id) == 0


async def test_a_taken_row_is_skipped_by_others_and_free_again_when_its_taker_dies(settings, pool):
    queue = FairQueue()
    batch = _reserved("a", 2)
    await _enqueue(pool, queue, batch)
    holder = await database.connect(settings)
    await holder.execute(f'SET search_path TO "{settings.schema("stamping")}"')
    tx = holder.transaction()
    await tx.start()
    held = await holder.fetchrow("SELECT request_id FROM schedule ORDER BY start_tag, seq LIMIT 1 "
                                 "FOR UPDATE SKIP LOCKED")
    assert held["request_id"] == batch[0].payload.request_id
    taken: list[str] = []

    async def stamp(event) -> None:
        taken.append(event.payload.request_id)

    takers = Takers(settings, pool, stamp, count=1, **WHERE)
    assert await takers.take_one()
    assert not await takers.take_one()                     # the held one is someone else's
    assert taken == [batch[1].payload.request_id]
    # the holder's process is killed: its backend goes, and so does its lock
    await pool.execute("SELECT pg_terminate_backend($1)", holder.get_server_pid())
    with contextlib.suppress(Exception):
        await holder.close(timeout=2)
    for _ in range(50):
        if await takers.take_one():
            break
        await asyncio.sleep(0.05)
    assert taken == [batch[1].payload.request_id, batch[0].payload.request_id]
    assert await pool.fetchval("SELECT count(*) FROM schedule") == 0


async def test_a_stamp_that_fails_leaves_its_request_queued(settings, pool):
    queue = FairQueue()
    (one,) = _reserved("a", 1)
    await _enqueue(pool, queue, [one])

    async def broken(event) -> None:
        raise ConnectionError("document store away")

    with pytest.raises(ConnectionError):
        await Takers(settings, pool, broken, count=1, **WHERE).take_one()
    assert await pool.fetchval("SELECT request_id FROM schedule") == one.payload.request_id


def test_a_weight_of_zero_is_refused():
    with pytest.raises(ValueError, match="above 0"):
        FairQueue({"x": 0})


async def test_a_request_that_crashes_its_taker_goes_to_the_back_then_to_the_dead_letter_topic(settings, pool):
    """A crash (not an outage) must not hold the head of the queue: the request is queued again behind the
    others, and after the crash retries it is dead-lettered with HANDLER_CRASHED, its unit kept reserved."""
    queue = FairQueue()
    poison, *others = _reserved("a", 3)
    await _enqueue(pool, queue, [poison, *others])
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status) VALUES ($1, 'a', 'acct', "
                       "'stamping')", poison.payload.request_id)
    taken: list[str] = []

    async def stamp(event) -> None:
        taken.append(event.payload.request_id)
        if event.payload.request_id == poison.payload.request_id:
            raise KeyError("a bug this document finds")

    takers = Takers(settings, pool, stamp, count=1, **WHERE)
    while await takers.take_one():
        pass
    rid = poison.payload.request_id
    # first the poison, then the two others (it went to the back), then the poison's retries
    assert taken[:3] == [rid, others[0].payload.request_id, others[1].payload.request_id]
    assert taken[3:] == [rid] * settings.consumer_crash_retries
    assert await pool.fetchval("SELECT count(*) FROM schedule") == 0
    (dlq,) = await pool.fetch("SELECT topic, value, headers FROM outbox WHERE topic = 'stamp.dead-letter'")
    assert dlq["value"] == poison.raw
    headers = dict(json.loads(dlq["headers"]))
    assert headers["bubuh-dlq-reason"] == "HANDLER_CRASHED" and "KeyError" in headers["bubuh-dlq-detail"]
    assert headers["bubuh-dlq-consumer"] == "stamping.worker"
    assert await pool.fetchval("SELECT status FROM requests WHERE request_id = $1", rid) == "dead_lettered"


def _rows_read(plan: dict, table: str) -> int:
    """Rows the plan's scans of ``table`` returned, over all their loops."""
    own = plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1) if plan.get("Relation Name") == table else 0
    return own + sum(_rows_read(p, table) for p in plan.get("Plans", []))


async def test_enqueueing_reads_each_channels_last_tag_not_its_whole_backlog(settings, pool):
    """A GROUP BY over the channels' queued rows read every one of them for each batch (6 ms at 20,000
    queued); a batch's tags now cost the queue's head (an index probe) and a row per channel, and its
    insert reads no queued row, however long the queue."""
    from services.stamping import fair_queue

    queue = FairQueue()
    await _enqueue(pool, queue, _reserved("flood", 3000))
    await pool.execute("ANALYZE schedule")
    batch = _reserved("flood", 2) + _reserved("small", 1)
    [tags_plan] = json.loads(await pool.fetchval(     # ANALYZE runs it: the tags are taken
        "EXPLAIN (ANALYZE, FORMAT JSON) " + fair_queue._TAGS, ["flood", "small"], [2, 1], [1.0, 1.0]))
    assert _rows_read(tags_plan["Plan"], "schedule") <= 10, tags_plan
    assert _rows_read(tags_plan["Plan"], "channel_tags") <= 10, tags_plan
    [plan] = json.loads(await pool.fetchval(          # ANALYZE runs it: the batch is queued
        "EXPLAIN (ANALYZE, FORMAT JSON) " + fair_queue._ENQUEUE,
        [e.payload.request_id for e in batch], [e.payload.channel_id for e in batch], [3000.0, 3001.0, 0.0],
        ["t"] * 3, [0] * 3, [0] * 3, [b""] * 3, ["{}"] * 3, [e.raw for e in batch]))
    assert _rows_read(plan["Plan"], "schedule") <= 10, plan
    assert await pool.fetchval("SELECT count(*) FROM schedule") == 3003
    assert await pool.fetchval("SELECT last_tag FROM channel_tags WHERE channel_id = 'flood'") == 3001.0


async def test_queued_requests_show_reserved_in_the_transaction_that_queues_them(settings, pool):
    """The worker's consumer marks its batch's requests 'reserved' (reserved_at: when they joined the queue)
    as it queues them; the status tracker no longer reads QuotaReserved at all. A request already past
    'queued' is left alone, and a row another transaction holds is skipped, not waited for."""
    assert events.type_name(quota_pb2.QuotaReserved) not in TYPES
    batch = _reserved("ch", 4)
    ids = [e.payload.request_id for e in batch]
    await pool.executemany("INSERT INTO requests (request_id, channel_id, account_id, status) "
                           "VALUES ($1, 'ch', 'acct', $2)",
                           [(ids[0], "queued"), (ids[1], "queued"), (ids[2], "stamping"), (ids[3], "queued")])
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM requests WHERE request_id = $1 FOR UPDATE", ids[3])
        await asyncio.wait_for(_enqueue(pool, FairQueue(), batch), 5)      # not waiting for the held row
    rows = {r["request_id"]: r for r in await pool.fetch(
        "SELECT r.request_id, r.status, r.reserved_at, s.enqueued_at FROM requests r "
        "LEFT JOIN schedule s USING (request_id) WHERE r.request_id = ANY($1::text[])", ids)}
    assert [rows[i]["status"] for i in ids] == ["reserved", "reserved", "stamping", "queued"]
    assert rows[ids[0]]["reserved_at"] == rows[ids[0]]["enqueued_at"], "not the queueing transaction's moment"
    assert rows[ids[2]]["reserved_at"] is None and rows[ids[3]]["enqueued_at"] is not None


async def test_batches_queued_at_once_give_each_channel_one_tag_per_request(settings, pool):
    """The worker's consumer queues the batches of a poll's partitions at once, and two workers share the
    queue. Each batch read its channels' last tags without the others' rows (not committed yet): a flood
    whose events came in four batches at once got four rows a tag, four times a small channel's share."""
    queue = FairQueue()
    await _enqueue(pool, queue, _reserved("flood", 4))                      # a backlog to follow
    await asyncio.gather(*(_enqueue(pool, queue, _reserved("flood", 10)) for _ in range(5)))
    tags = [r["start_tag"] for r in await pool.fetch(
        "SELECT start_tag FROM schedule WHERE channel_id = 'flood' ORDER BY start_tag")]
    assert len(tags) == 54
    assert len(set(tags)) == 54, f"{54 - len(set(tags))} rows share a tag with another of their channel"
    assert tags == [tags[0] + i for i in range(54)]                         # 1/w apart
    await _enqueue(pool, queue, _reserved("small", 1))
    order = await _take_all(settings, pool, limit=3)
    assert "small" in order[:2], order                                       # right behind the head


async def test_two_members_queueing_one_channel_at_once_give_it_one_tag_per_request(settings, pool):
    """Two stamping workers (members) share the queue, each with a FairQueue of its own. Member A's insert is
    held up (another transaction holds one of its request ids, as a redelivered batch does), and member B
    queues the same channel meanwhile. When each read the channel's last tag from the queued rows inside its
    own transaction, B saw none of A's rows and gave the channel the same tags: two rows a tag, twice its
    share beside a small channel."""
    a, b = FairQueue(), FairQueue()
    await _enqueue(pool, a, _reserved("flood", 3))                                  # a backlog to follow
    batch_a, batch_b = _reserved("flood", 5), _reserved("flood", 5)
    async with pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("INSERT INTO schedule (request_id, channel_id, start_tag, topic, \"partition\", "
                             "\"offset\", headers, event) VALUES ($1, 'flood', 0, 't', 0, 0, '{}', '')",
                             batch_a[-1].payload.request_id)
        member_a = asyncio.create_task(_enqueue(pool, a, batch_a))
        for _ in range(100):                          # A's insert waits for the holder's row
            if await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND query LIKE '%INSERT INTO schedule%'"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("member A's insert never waited: the interleaving was not produced")
        await asyncio.wait_for(_enqueue(pool, b, batch_b), 5)                        # B, while A waits
        await tx.rollback()
    await asyncio.wait_for(member_a, 5)
    tags = [r["start_tag"] for r in await pool.fetch(
        "SELECT start_tag FROM schedule WHERE channel_id = 'flood' ORDER BY start_tag")]
    assert len(tags) == 13
    assert len(set(tags)) == 13, f"{13 - len(set(tags))} rows share a tag with another of their channel"
    assert tags == [tags[0] + i for i in range(13)]                                  # 1/w apart, no gap
    await _enqueue(pool, b, _reserved("small", 1))
    assert "small" in (await _take_all(settings, pool, limit=2)), "a small channel goes right behind the head"


async def test_a_channel_served_last_does_not_go_back_to_the_head_of_an_emptied_queue(settings, pool):
    """With nothing queued, a channel's next tag follows the tags given out so far (V: the largest of them),
    so a channel served just now does not jump ahead of one that was not, once the queue has emptied."""
    queue = FairQueue()
    await _enqueue(pool, queue, _reserved("early", 4))
    assert len(await _take_all(settings, pool)) == 4                                 # emptied
    await _enqueue(pool, queue, _reserved("early", 2) + _reserved("late", 2))
    order = await _take_all(settings, pool)
    assert order == ["late", "early", "late", "early"], order


async def test_a_deep_queue_is_read_as_its_head_and_a_sample_and_positions_stay_within_a_stride(settings, pool):
    """The queue order is read once a second by each API process. Shipping every row's place, sorted twice, took
    220-250 ms at 60,000 queued, and the tier slowed as its backlog grew (make surge-sustained, 5 December).
    The order now reads the head exactly and every ORDER_STRIDE-th row beyond it: positions in the head are
    exact, positions behind it counted by tag between two rows read (at most a stride off), and a new
    request's place behind the whole backlog exact."""
    from services.stamping.fair_queue import ORDER_HEAD, ORDER_STRIDE

    n = 12_000
    # a flood (4 in 5 rows, weight 1) and a small channel, their tags 1 apart within each, interleaved as _TAGS has it
    await pool.execute(
        "INSERT INTO schedule (request_id, channel_id, start_tag, topic, \"partition\", \"offset\", headers, event) "
        "SELECT 'r' || g, CASE WHEN g % 5 = 0 THEN 'small' ELSE 'flood' END, "
        "       CASE WHEN g % 5 = 0 THEN g / 5 ELSE g - g / 5 END, 'quota.events', 0, g, '{}', '\\x00' "
        "  FROM generate_series(1, $1) AS g", n)
    await pool.execute("INSERT INTO channel_tags (channel_id, last_tag) VALUES ('flood', $1), ('small', $2)",
                       float(n - n // 5), float(n // 5))
    rows = [(r["start_tag"], r["seq"]) for r in await pool.fetch("SELECT start_tag, seq FROM schedule "
                                                                  "ORDER BY start_tag, seq")]
    queue = FairQueue()
    async with pool.acquire() as conn:
        order = await queue.order(conn)
    assert len(order.places) <= ORDER_HEAD + n // ORDER_STRIDE + 1          # not every row
    assert order.last_tags == {"flood": float(n - n // 5), "small": float(n // 5)}
    for rank in list(range(0, ORDER_HEAD, 7)) + list(range(ORDER_HEAD, n, 37)) + [n - 1]:
        got = order.ahead_of(rows[rank])
        if rank < ORDER_HEAD:
            assert got == rank
        else:
            assert abs(got - rank) <= 2, (rank, got)     # counted by tag between two rows read: near exact here
    # between two rows read: the count follows the tag, not a jump to either side
    middle = (rows[5010][0] + rows[5011][0]) / 2
    assert abs(order.before((middle, float("inf"))) - 5011) <= 2
    assert order.ahead_of_new("flood", 0, queue.weight) == n                 # behind every queued row
    assert order.ahead_of_new("other", 0, queue.weight) <= 2                 # a quiet channel: at the head
