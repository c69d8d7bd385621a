"""The queue's expected times from the stamping schema on real PostgreSQL: before the window has
seen a stamp finish, the pace the last stamps kept when busy stands in for the rate (a surge's first
202s got the cold guess, 20/s, against 40-55/s in make surge), and the pipeline's own time is the
median of the recent stamps' times with their wait in the fair queue left out."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import asyncpg
import pytest

from services.stamping.metrics import DOOR_COST
from services.stamping.pace import BURST_FLOOR, BURST_HOLDS_S, BURST_LEFT_S
from services.stamping.queue import QueueView
from tests.component import handler_support as hs


@pytest.fixture(scope="module")
async def pool():
    hs.postgres_up()
    async with hs.service_pool(hs.settings(), "stamping", max_size=2) as pool:
        yield pool


async def _finished(pool, n: int, seconds: int, took_s: float, ago_s: float, offset: int = 0,
                    queued_s: float = 0.0) -> None:
    """``n`` stamps finished over ``seconds`` busy seconds, ``ago_s`` seconds ago, each after ``took_s``, of
    which ``queued_s`` waiting in the fair queue (reserved, then started)."""
    await pool.execute(
        "INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at, reserved_at, started_at, "
        "finished_at) "
        "SELECT 'r' || ($5 + i), 'ch', 'acct', 'completed', a, a + interval '0.1 s', "
        "a + interval '0.1 s' + make_interval(secs => $6), f "
        "FROM generate_series(0, $1 - 1) AS i, "
        "LATERAL (SELECT now() - make_interval(secs => $4) + make_interval(secs => (i % $2)) AS f) AS t, "
        "LATERAL (SELECT t.f - make_interval(secs => $3) AS a) AS acc",
        n, seconds, took_s, ago_s, offset, queued_s)


async def test_before_the_window_counts_a_finish_the_recent_busy_pace_stands_in(pool):
    await pool.execute("DELETE FROM requests")
    await _finished(pool, 100, 2, 1.5, ago_s=600, queued_s=1.1)   # a surge ten minutes ago: 50/s when busy
    await _finished(pool, 3, 1, 0.4, ago_s=590, offset=1000)       # its first stamps met no queue
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status) "
                       "SELECT 'q' || i, 'ch', 'acct', 'queued' FROM generate_series(1, 60) AS i")
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(103 / 3)              # 103 stamps over 3 busy seconds
    assert facts.base_s == pytest.approx(0.4, abs=0.01)            # 1.5 s, less 1.1 s in the queue
    assert facts.reserve_s == pytest.approx(0.1, abs=0.01)         # of which 0.1 s to be reserved
    assert facts.eta_seconds(60) == pytest.approx(60 / (103 / 3) + 0.3, abs=0.06)


async def test_the_pipelines_own_time_leaves_out_the_wait_in_the_queue(pool):
    """Position / rate stands for the wait in the queue. The fastest 2% of the last 500 stamps, accepted to
    completed, was the pipeline's own time only while some had met no queue: after a surge whose every
    stamp waited 20 s it read 21 s, and a request with nobody ahead was told 21 s for its 1 s."""
    await pool.execute("DELETE FROM requests")
    await _finished(pool, 500, 20, 21.0, ago_s=30, queued_s=20.0)
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.base_s == pytest.approx(1.0, abs=0.01)            # 21 s less 20 s queued
    assert facts.eta_seconds(0) == pytest.approx(1.0, abs=0.1)


def test_the_wait_for_a_reservation_overlaps_the_wait_for_the_requests_ahead():
    """A request on quota waits for its reservation while the requests ahead are being signed: its wait
    is the longer of the two, not their sum (added, a held queue's first ETAs read 15-25% long). Once
    reserved, only the requests ahead; being signed (position 0), only its own signing."""
    from services.stamping.queue import QueueFacts

    facts = QueueFacts(per_second=40.0, reserve_s=3.0, finish_s=0.5)
    assert facts.eta_seconds(400) == pytest.approx(10.0 + 0.5)                 # 10 s ahead > 3 s to reserve
    assert facts.eta_seconds(40) == pytest.approx(3.0 + 0.5)                   # 1 s ahead < 3 s to reserve
    assert facts.eta_seconds(40, reserved=True) == pytest.approx(1.0 + 0.5)
    assert facts.eta_seconds(0, reserved=True) == pytest.approx(0.5)


def test_in_a_burst_at_the_door_the_pipelines_own_hops_are_slowed_as_the_tier_is():
    """The reservation and the signing share the cores the door takes: while its burst goes on they take as
    much longer as the tier's pace is slower (here 40 against 20 a second: twice), at most
    ``HOPS_STRETCH_AT_MOST`` times; a signing that falls after the burst takes its time as before, and one
    across its end, its part within it slowed."""
    from services.stamping.queue import HOPS_STRETCH_AT_MOST, QueueFacts

    quiet = QueueFacts(per_second=40.0, reserve_s=0.3, finish_s=0.5)
    burst = QueueFacts(per_second=40.0, reserve_s=0.3, finish_s=0.5, burst_per_second=20.0, burst_s=8.0)
    assert burst.hop_stretch() == 2.0 and quiet.hop_stretch() == 1.0
    assert quiet.eta_seconds(2) == pytest.approx(0.3 + 0.5)
    assert burst.eta_seconds(2) == pytest.approx(0.6 + 1.0)                # 0.1 s ahead < 0.6 s to reserve
    assert burst.eta_seconds(100) == pytest.approx(5.0 + 1.0)              # signed within the burst's 8 s
    assert burst.eta_seconds(150) == pytest.approx(7.5 + 0.5 + 0.25, abs=0.06)   # half its signing in it, slowed
    assert burst.eta_seconds(200) == pytest.approx(8.0 + 40 / 40 + 0.5)    # after it: 160 in it, 40 at 40/s
    crawl = QueueFacts(per_second=40.0, reserve_s=0.3, finish_s=0.5, burst_per_second=2.0, burst_s=8.0)
    assert crawl.hop_stretch() == HOPS_STRETCH_AT_MOST


async def test_stamps_finishing_in_the_window_give_the_rate_per_busy_second(pool):
    """The schema's count (no stream in this process) is a rate per busy second, as the stream's is: a
    surge's first seconds after a quiet minute are measured at their pace. Divided by the whole window it
    read 100 stamps in 2 s as 1.7/s, and the ETAs were many times the actual time."""
    await pool.execute("DELETE FROM requests")
    await _finished(pool, 30, 30, 2.0, ago_s=40)                   # one a second for 30 of the last 60 s
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(30 / 30)
    await pool.execute("DELETE FROM requests")
    await _finished(pool, 100, 2, 0.5, ago_s=4)                    # a surge's first two seconds: 50/s
    await _finished(pool, 500, 10, 0.5, ago_s=600, offset=1000)    # long before the window: not counted
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(50.0)
    assert facts.eta_seconds(500) == pytest.approx(500 / 50 + facts.finish_s, abs=0.06)


async def test_a_queue_drains_at_the_pace_the_tier_kept_with_a_backlog_not_at_what_came(pool):
    """Seconds in which fewer requests came than the tier signs count what came: a trickle of 5 a second
    read with a surge's 40 a second made the tier look twice as slow, and the next queue's ETAs twice as
    long. Only the seconds in which every stamp that finished had waited in the fair queue count."""
    await pool.execute("DELETE FROM requests")
    await _finished(pool, 160, 4, 6.0, ago_s=30, queued_s=5.0)                  # 4 s with a backlog: 40/s
    await _finished(pool, 50, 10, 0.5, ago_s=20, offset=1000)                   # then a trickle, no wait: 5/s
    await _finished(pool, 5, 1, 0.5, ago_s=5, offset=2000, queued_s=0.05)       # a second that barely waited
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(40.0)
    assert facts.eta_seconds(400) == pytest.approx(10.0 + facts.finish_s, abs=0.06)
    # too few such seconds to tell: the window's pace per busy second, as before
    await pool.execute("DELETE FROM requests WHERE request_id IN (SELECT request_id FROM requests "
                       "WHERE finished_at < now() - interval '27.5 s')")
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx((40 + 50 + 5) / (1 + 10 + 1))
    await pool.execute("DELETE FROM requests")


async def test_the_pace_counts_whole_seconds_only(pool):
    """The second under way is still filling and the oldest of the last 500 stamps is cut by the limit:
    counted, each is a second with a fraction of its stamps. A steady 40 a second read as 500 stamps over
    14 seconds, 35.7/s, and a held queue's ETAs came out about 10% long (make surge-eta, 3 December)."""
    await pool.execute("DELETE FROM requests")
    await _finished(pool, 520, 13, 6.0, ago_s=14, queued_s=5.0)     # 13 whole seconds at 40/s, with a backlog
    # 10 in a second still under way (the one after the insert's, so it still is when the facts are read)
    await _finished(pool, 10, 1, 6.0, ago_s=-1, offset=1000, queued_s=5.0)
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(40.0)     # 480 stamps over the 12 whole seconds the 500 hold
    await pool.execute("UPDATE requests SET started_at = reserved_at")    # no second with a backlog now
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(40.0)     # the window's 520 over its 13 whole busy seconds
    await pool.execute("DELETE FROM requests")


async def test_the_pace_is_read_from_its_window_whatever_the_registry_behind_it(pool):
    """The registry keeps every stamp. Read in one statement, the pace's window began at a bound the planner
    could not see (a sub-select over the latest 500 stamps), so it costed the window as a third of the
    registry: with 3.1 million stamps, their rows no longer in finishing order on disk, it read the whole
    table, 2.1 s a read, past the read's budget, and 202s and status reads went without an ETA (7 December).
    With the bounds read first and given as values, every scan of the registry is costed at the window."""
    import json

    from services.stamping.queue import _RECENT, _SECONDS

    await pool.execute("DELETE FROM requests")
    # the registry: 30,000 stamps of a day ago, stored out of their finishing order (as updates leave them)
    await pool.execute(
        "INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at, reserved_at, started_at, "
        "finished_at) SELECT 'old' || i, 'ch', 'acct', 'completed', f, f, f, f FROM generate_series(1, 30000) AS i, "
        "LATERAL (SELECT now() - interval '1 day' + i * interval '1 s' AS f) AS t ORDER BY random()")
    await _finished(pool, 300, 10, 6.0, ago_s=12, offset=100000, queued_s=5.0)   # the latest 10 s: 30/s, a backlog
    await pool.execute("ANALYZE requests")

    async def estimates(statement: str, *args) -> list[int]:
        (plan,) = json.loads(await pool.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args))
        found, nodes = [], [plan["Plan"]]
        while nodes:
            node = nodes.pop()
            nodes.extend(node.get("Plans", []))
            if node.get("Relation Name") == "requests":
                found.append(node["Plan Rows"])
        return found

    recent = await pool.fetchrow(_RECENT, 0)
    scans = await estimates(_SECONDS, recent["from_s"], recent["came_from"])
    assert scans and max(scans) <= 2000, scans         # in the one statement: 10,000 (a third of 30,300)
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(30.0)     # the latest 300 over their 10 busy seconds
    await pool.execute("DELETE FROM requests")


async def test_a_queue_drains_at_the_pace_of_the_latest_seconds_with_a_backlog(pool):
    """500 stamps are 10 s of a tier at 50/s but 70 s of one at 7/s: read over all of them, a tier that had
    warmed up or got its cores back was read at the pace it had left behind for a minute (CI, 3 December:
    a held queue's stamps took 0.71 of their first ETAs). The latest 15 seconds with a backlog count."""
    await pool.execute("DELETE FROM requests")
    await _finished(pool, 100, 10, 6.0, ago_s=27, queued_s=5.0)                  # 10 s at 10/s, then
    await _finished(pool, 300, 15, 6.0, ago_s=16, offset=1000, queued_s=5.0)     # 15 s at 20/s
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(20.0)     # over all 25 seconds: 16/s, ETAs 25% long
    assert facts.eta_seconds(400) == pytest.approx(20.0 + facts.finish_s, abs=0.06)
    await pool.execute("DELETE FROM requests")


async def test_a_fast_tiers_pace_is_read_over_15_seconds_not_over_its_last_500_stamps(pool):
    """Two stamping workers signed 105-135 stamps/s: the last 500 stamps were 4-5 s of them, and the pace of
    those few seconds (it moves by a third from one 5 s to the next) set every ETA of the next second. The
    latest 15 seconds count, however many stamps they hold."""
    await pool.execute("DELETE FROM requests")
    await _finished(pool, 320, 8, 6.0, ago_s=13, queued_s=5.0)                   # 8 s at 40/s, then
    await _finished(pool, 600, 4, 6.0, ago_s=5, offset=1000, queued_s=5.0)       # 4 s at 150/s: 600 > 500
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(920 / 12, rel=0.02)     # the last 500 alone: 150/s, ETAs half
    await pool.execute("DELETE FROM requests")


async def test_positions_follow_the_fair_queue_per_channel(pool):
    """A small channel's request is near the head while a flood's is behind the flood's own backlog; a new
    request's position (the 202's) is counted against the queue read once a second, and each 202 given for
    the channel since that read lands one step of its tag further."""
    import datetime as dt

    from services.contracts.bubuh.v1 import quota_pb2
    from services.stamping.fair_queue import Enqueue, FairQueue

    await pool.execute("DELETE FROM requests")
    await pool.execute("DELETE FROM schedule")
    fair = FairQueue()
    flood = [hs.event(quota_pb2.QuotaReserved(request_id=f"f{i}", channel_id="flood", account_id="a"),
                      producer="quota") for i in range(40)]
    small = [hs.event(quota_pb2.QuotaReserved(request_id="s0", channel_id="small", account_id="a"), producer="quota")]
    await Enqueue(pool, fair).process(flood)
    await Enqueue(pool, fair).process(small)
    now = dt.datetime.now(dt.UTC)
    view = QueueView(pool, window_s=60.0, fair=fair, order_s=0.0)       # every call reads the queue
    assert await view.position_of("s0", "small", "reserved", now) == 1
    assert await view.position_of("f39", "flood", "reserved", now) == 40
    assert await view.position_of("s0", "small", "stamping", now) == 0
    # still on quota: behind its own channel's earlier requests on quota, at its channel's next tag
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at) "
                       "VALUES ('q1', 'flood', 'a', 'queued', $1), ('q2', 'flood', 'a', 'queued', $2)",
                       now - dt.timedelta(seconds=2), now - dt.timedelta(seconds=1))
    assert await view.position_of("q2", "flood", "queued", now - dt.timedelta(seconds=1)) == 41 + 1
    assert await view.position_for_new("small") <= 3
    first = await view.position_for_new("flood")
    assert first == 41 + 2
    cached = QueueView(pool, window_s=60.0, fair=fair)                  # the queue read once a second
    assert await cached.position_for_new("flood") == first
    assert await cached.position_for_new("flood") == first + 1          # the next 202 in the same second
    await pool.execute("DELETE FROM schedule")
    await pool.execute("DELETE FROM requests")


async def test_a_status_reads_position_comes_with_its_row_and_matches_the_position_read_apart(pool):
    """A status read is one statement (``STATUS_ROW``): the row, its place in the fair queue, or its channel's
    requests on quota before it. The position from it is the one read apart, for a request queued in the fair
    queue, one reserved but taken from it since, and one still on quota; a row not waiting needs neither."""
    from services.contracts.bubuh.v1 import quota_pb2
    from services.stamping.fair_queue import Enqueue, FairQueue
    from services.stamping.queue import STATUS_ROW

    await pool.execute("DELETE FROM requests")
    await pool.execute("DELETE FROM schedule")
    fair = FairQueue()
    now = dt.datetime.now(dt.UTC)
    reserved = [hs.event(quota_pb2.QuotaReserved(request_id=f"f{i}", channel_id="flood", account_id="a"),
                         producer="quota") for i in range(30)]
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at) "
                       "SELECT 'f' || i, 'flood', 'a', 'queued', $1 FROM generate_series(0, 29) AS i",
                       now - dt.timedelta(seconds=10))
    await Enqueue(pool, fair).process(reserved)
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at) "
                       "SELECT 'q' || i, 'flood', 'a', 'queued', $1::timestamptz + make_interval(secs => i) "
                       "FROM generate_series(1, 5) AS i", now - dt.timedelta(seconds=8))
    await pool.execute("DELETE FROM schedule WHERE request_id = 'f0'")          # taken by a worker since
    view = QueueView(pool, window_s=60.0, fair=fair, order_s=0.0)
    seen = {}
    for rid in ("f7", "f29", "f0", "q1", "q4"):
        row = await pool.fetchrow(STATUS_ROW, rid, "flood")
        assert row["request_id"] == rid and row["status"] in ("reserved", "queued")
        assert (row["queue_tag"] is None) == (rid in ("f0", "q1", "q4"))
        assert (row["on_quota_before"] is None) == (row["queue_tag"] is not None)
        seen[rid] = await view.position_of(rid, "flood", row["status"], row["accepted_at"], waiting=row)
        assert seen[rid] == await view.position_of(rid, "flood", row["status"], row["accepted_at"])
    assert seen["f7"] == 6 and seen["f29"] == 28                 # f0 is out of the queue: 29 queued before q's
    assert seen["q1"] == 29 and seen["q4"] == 29 + 3              # behind the queue and their channel's on quota
    assert await pool.fetchrow(STATUS_ROW, "f7", "another-channel") is None     # a channel reads only its own
    await pool.execute("UPDATE requests SET status = 'stamping' WHERE request_id = 'f7'")
    row = await pool.fetchrow(STATUS_ROW, "f7", "flood")
    assert row["on_quota_before"] is None
    assert await view.position_of("f7", "flood", row["status"], row["accepted_at"], waiting=row) == 0
    await pool.execute("DELETE FROM schedule")
    await pool.execute("DELETE FROM requests")


async def test_a_new_requests_position_counts_other_channels_requests_still_on_quota(pool):
    """A surge's first seconds: most accepted requests are still on quota (not yet in the queue), and each
    channel's go before the later ones of the others by the same fair rule. Counting only the queued rows
    and the channel's own on quota told the first 202s a third of their true place (make surge-tiers:
    position 11 against 34 stamped first, 61 against 94)."""
    from services.stamping.fair_queue import FairQueue

    await pool.execute("DELETE FROM requests")
    await pool.execute("DELETE FROM schedule")
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status) "
                       "SELECT c || i, c, 'a', 'queued' FROM generate_series(1, 10) AS i, "
                       "unnest(ARRAY['a', 'b', 'c']) AS c")
    view = QueueView(pool, window_s=60.0, fair=FairQueue(), order_s=0.0)
    # a's 11th: behind its own 10 and the first 10 of b and of c (tags 0..9 each, all before its tag 10)
    assert await view.position_for_new("a") == 30
    # a fourth channel's first: tag 0, after the first of a, b and c (equal tags: they were accepted first)
    assert await view.position_for_new("d") == 3
    weighted = QueueView(pool, window_s=60.0, fair=FairQueue({"a": 2.0}), order_s=0.0)
    # a at twice the weight: its 11th at tag 5, after b's and c's tags 0..5
    assert await weighted.position_for_new("a") == 10 + 6 + 6
    await pool.execute("DELETE FROM requests")


async def test_the_202s_given_since_the_queue_was_read_count_for_every_channel(pool):
    """The queue is read once a second; the 202s given since, for requests accepted after the read, are on
    quota and not in the read. Each goes before later requests of the other channels by the fair rule, not
    only of its own. One accepted before the read is in it already, and is not counted again."""
    from services.stamping.fair_queue import FairQueue

    await pool.execute("DELETE FROM requests")
    await pool.execute("DELETE FROM schedule")
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at) "
                       "SELECT c || i, c, 'a', 'queued', now() - interval '1 minute' "
                       "FROM generate_series(1, 10) AS i, unnest(ARRAY['a', 'b', 'c']) AS c")
    view = QueueView(pool, window_s=60.0, fair=FairQueue(), order_s=30.0)   # one read serves the test
    assert await view.position_for_new("a") == 30                       # as read: 10 of each before its tag 10
    assert await view.position_for_new("b") == 31                       # and a's 11th, given since the read
    assert await view.position_for_new("c") == 32                       # a's and b's 11th
    assert await view.position_for_new("a") == 33                       # its own 11th, b's and c's
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)       # a row the read counted on quota
    assert await view.position_for_new("b", earlier) == 10 + 11 + 11   # its channel's 11 less itself: 10
    assert await view.position_for_new("c") == 11 + 12 + 11             # b's count did not grow for it
    await pool.execute("DELETE FROM requests")


async def _buffers(pool, statement: str, *args) -> int:
    """Shared buffers the statement touched, as EXPLAIN (ANALYZE, BUFFERS) counts them."""
    import json

    (plan,) = json.loads(await pool.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", *args))
    top = plan["Plan"]
    return top["Shared Hit Blocks"] + top["Shared Read Blocks"]


async def test_counting_the_requests_on_quota_reads_them_not_the_backlog_behind_them(pool):
    """Behind a surge 30,000 requests were queued and 20 on quota; the queue order (once a second per API
    process) and a channel's earlier requests on quota (per status read of one) were counted by reading
    every open request: 29,000 heap pages, 130-430 ms a read (make surge-sustained, 5 December). With the
    requests on quota indexed apart (migration 0007), the reads stay small whatever the backlog."""
    import datetime as dt

    from services.stamping.fair_queue import _ORDER, FairQueue
    from services.stamping.queue import _ON_QUOTA_BEFORE

    await pool.execute("DELETE FROM requests")
    await pool.execute("DELETE FROM schedule")
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, reserved_at) "
                       "SELECT 'r' || i, 'ch' || (i % 4), 'a', 'reserved', now() FROM generate_series(1, 20000) AS i")
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status) "
                       "SELECT 'q' || i, 'ch1', 'a', 'queued' FROM generate_series(1, 3) AS i")
    await pool.execute("ANALYZE requests")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    assert await pool.fetchval(_ON_QUOTA_BEFORE, "ch1", later) == 3
    assert await _buffers(pool, _ON_QUOTA_BEFORE, "ch1", later) < 20          # about 200 before
    async with pool.acquire() as conn:
        assert (await FairQueue.order(conn)).on_quota == {"ch1": 3}
    assert await _buffers(pool, _ORDER) < 20
    await pool.execute("DELETE FROM requests")


async def test_the_queue_order_reads_the_queue_once_whatever_the_channels_ever_seen_or_its_statistics(pool):
    """``channel_tags`` keeps every channel that ever stamped, and the queue's table swings between empty and
    thousands of rows faster than autoanalyze follows. The order read took each channel's last tag by a
    lookup per channel in ``channel_tags``; with the table analyzed empty, the planner made each lookup a
    scan of the whole queue: 130 ms a read at 1,500 queued beside 539 channels, up to 866 ms (6 December).
    Read from the one pass over the queue, its cost follows the queue, and the answer is the same."""
    import json

    from services.stamping.fair_queue import _ORDER, ORDER_HEAD, ORDER_STRIDE, FairQueue

    await pool.execute("DELETE FROM requests")
    await pool.execute("DELETE FROM schedule")
    await pool.execute("DELETE FROM channel_tags")
    await pool.execute("INSERT INTO channel_tags (channel_id, last_tag) "
                       "SELECT 'gone-' || i, i FROM generate_series(1, 600) AS i")
    await pool.execute("INSERT INTO channel_tags (channel_id, last_tag) VALUES ('big', 1500), ('small', 20)")
    await pool.execute("ANALYZE schedule")           # the statistics of a moment the queue was empty
    await pool.execute(
        "INSERT INTO schedule (request_id, channel_id, start_tag, topic, \"partition\", \"offset\", headers, event) "
        "SELECT 'r' || i, CASE WHEN i % 75 = 0 THEN 'small' ELSE 'big' END, i, 't', 0, i, '{}', '\\x00' "
        "FROM generate_series(1, 1500) AS i")
    pages = await pool.fetchval("SELECT pg_relation_size('schedule') / current_setting('block_size')::int")
    async with pool.acquire() as conn:
        order = await FairQueue.order(conn)
    assert order.last_tags == {"big": 1499.0, "small": 1500.0}
    assert len(order.places) == ORDER_HEAD + (1500 - ORDER_HEAD) // ORDER_STRIDE
    assert order.ahead_of((1200.5, 0)) == 1200
    # one pass over the queue (its pages, and its index once), not one per channel: 600 scans of it before
    touched = await _buffers(pool, _ORDER)
    assert touched < 3 * pages + 100, (touched, pages)
    assert json.loads(await pool.fetchval("SELECT last_tags::text FROM (" + _ORDER + ") AS o")) == order.last_tags
    await pool.execute("DELETE FROM schedule")
    await pool.execute("DELETE FROM channel_tags")


async def test_the_depth_gauge_follows_the_queue_without_anyone_asking(pool):
    """An idle API process kept the depth of its last intake call; dashboards read the max over
    processes, so a stale high depth hid a drained queue. The worker's backlog reading keeps it on its own
    timer (and the API processes no longer count every open request each second for it)."""
    import asyncio

    from services.kernel.channels import ChannelView
    from services.stamping.backlog import Backlog
    from services.stamping.metrics import QUEUE_DEPTH

    await pool.execute("DELETE FROM requests")
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status) "
                       "SELECT 'd' || i, 'ch', 'acct', CASE WHEN i % 2 = 0 THEN 'queued' ELSE 'reserved' END "
                       "  FROM generate_series(1, 40) AS i")
    stop = asyncio.Event()
    running = asyncio.ensure_future(Backlog(pool, ChannelView(hs.settings()), interval_s=0.1).run(stop))
    try:
        async def depth_is(n: float) -> None:
            for _ in range(100):
                if QUEUE_DEPTH._value.get() == n:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"depth {QUEUE_DEPTH._value.get()}, expected {n}")
        await depth_is(40)         # queued on quota and reserved alike
        await pool.execute("UPDATE requests SET status = 'completed', finished_at = now() WHERE request_id LIKE 'd%'")
        await depth_is(0)          # drained, and nobody called intake or read a status
    finally:
        stop.set()
        await running


class _BacklogMember:
    """A stamping member's backlog reading under the tier's lock, its reads and clears logged in ``events``
    as (member, what, the depth gauge just after)."""

    def __init__(self, pool, settings, lock: str, name: str, events: list) -> None:
        from services.kernel.channels import ChannelView
        from services.kernel.leadership import Leadership
        from services.stamping.backlog import Backlog
        from services.stamping.metrics import QUEUE_DEPTH

        class Logged(Backlog):
            async def read(self) -> None:
                await super().read()
                events.append((name, "read", QUEUE_DEPTH._value.get()))

            def clear(self) -> None:
                super().clear()
                events.append((name, "cleared", QUEUE_DEPTH._value.get()))

        self.stop = asyncio.Event()
        self.backlog = Logged(pool, ChannelView(settings), interval_s=0.05)
        self.leadership = Leadership(settings, lock)
        self.task = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.leadership.lead(self.stop, self.backlog.run,
                                                                on_standby=self.backlog.clear))

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


async def _backlog_of(pool, n: int) -> tuple:
    """``n`` requests queued on quota (ids ``m1``...), settings that retry the lock every 0.1 s, a lock name
    of the test's own and its event log."""
    await pool.execute("DELETE FROM requests")
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status) "
                       "SELECT 'm' || i, 'ch', 'acct', 'queued' FROM generate_series(1, $1) AS i", n)
    events: list[tuple[str, str, float]] = []
    return hs.settings(leader_retry_s=0.1), f"stamping backlog test {id(events)}", events


async def _until(check, what: str, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(what)


async def test_one_stamping_member_reads_the_backlog_and_one_that_finds_another_leading_clears_its_gauges(pool):
    """The backlog statement reads every open request (about 150 ms at 23,000 open) and ran in every
    stamping member every 5 s. Under the tier's backlog lock one member reads it. A member that finds
    another leading sets what it showed back to 0: dashboards read the max over processes, and a former
    leader's figure would outlive the queue it counted."""
    settings, lock, events = await _backlog_of(pool, 30)
    a, b = _BacklogMember(pool, settings, lock, "a", events), _BacklogMember(pool, settings, lock, "b", events)
    try:
        a.start()
        await _until(lambda: ("a", "read", 30) in events, f"a never read: {events}")
        await b.backlog.read()              # b showed a figure of its own (a former leader, say)
        b.start()
        await _until(lambda: ("b", "cleared", 0) in events, f"b kept its figure on standing by: {events}")
        await _until(lambda: events[-1] == ("a", "read", 30), f"a stopped reading: {events}")
        later = events[events.index(("b", "cleared", 0)):]
        assert {name for name, what, _ in later if what == "read"} == {"a"}    # b stands by, reading nothing
        assert a.leadership.leading.is_set() and not b.leadership.leading.is_set()
        await a.close()
        await _until(lambda: ("b", "read", 30) in events[len(later):], f"b did not take over: {events}")
    finally:
        await a.close()
        await b.close()
        await pool.execute("DELETE FROM requests WHERE request_id LIKE 'm%'")     # no queue left for the next test


async def test_a_backlog_leader_that_loses_its_lock_connection_keeps_its_figures_until_it_reads_again(pool):
    """While PostgreSQL is away the queue is still there, and an alert on a depth with no completions
    should keep firing: the leader whose lock connection is cut keeps its last figures (it does not fall
    to 0), and reads again once it holds the lock again."""
    from services.stamping.metrics import QUEUE_DEPTH

    settings, lock, events = await _backlog_of(pool, 20)
    a = _BacklogMember(pool, settings, lock, "a", events)
    try:
        a.start()
        await _until(lambda: ("a", "read", 20) in events, f"a never read: {events}")
        cut = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid::bigint = (hashtext($1)::bigint >> 32) & 4294967295 "
            "AND objid::bigint = hashtext($1)::bigint & 4294967295", lock)
        assert cut == 1                                         # the lock's session, and only it
        await _until(lambda: not a.leadership.leading.is_set(), "the cut connection was never noticed")
        depth_while_away = QUEUE_DEPTH._value.get()
        seen = len(events)
        await _until(lambda: a.leadership.leading.is_set(), "a never led again")
        await _until(lambda: ("a", "read", 20) in events[seen:], f"a did not read again: {events}")
        assert depth_while_away == 20
        assert ("a", "cleared", 0) not in events
    finally:
        await a.close()
        await pool.execute("DELETE FROM requests WHERE request_id LIKE 'm%'")


async def test_a_reserved_requests_position_is_counted_against_the_order_read_once_a_second(pool):
    """Counting the rows ahead in every status read cost PostgreSQL work in proportion to the position; a
    read now looks up its own place (one statement) and counts against the order read at most a second ago."""
    import asyncio
    import datetime as dt

    from services.contracts.bubuh.v1 import quota_pb2
    from services.stamping.fair_queue import Enqueue, FairQueue

    await pool.execute("DELETE FROM schedule")
    fair = FairQueue()
    await Enqueue(pool, fair).process([hs.event(quota_pb2.QuotaReserved(request_id=f"o{i}", channel_id="c",
                                                                        account_id="a"), producer="quota")
                                       for i in range(30)])
    view = QueueView(pool, window_s=60.0, fair=fair)
    now = dt.datetime.now(dt.UTC)
    assert await view.position_of("o29", "c", "reserved", now) == 29
    await pool.execute("DELETE FROM schedule WHERE request_id IN ('o0', 'o1', 'o2', 'o3', 'o4')")   # taken
    sent: list[str] = []

    def log(q) -> None:
        sent.append(q.query)

    async with pool.acquire() as a, pool.acquire() as b:
        for conn in (a, b):
            conn.add_query_logger(log)
    try:
        assert await view.position_of("o29", "c", "reserved", now) == 29     # the order of a moment ago
        assert await view.position_of("o10", "c", "reserved", now) == 10
    finally:
        async with pool.acquire() as a, pool.acquire() as b:
            for conn in (a, b):
                conn.remove_query_logger(log)
    assert len(sent) == 2 and all("WHERE request_id = $1" in q for q in sent), sent
    await asyncio.sleep(1.05)
    assert await view.position_of("o29", "c", "reserved", now) == 24     # read again: the taken are gone
    assert await view.position_of("gone", "c", "reserved", now) == 25     # not queued here: behind its channel
    await pool.execute("DELETE FROM schedule")


class _Counted:
    """The real pool, counting the statements run through it."""

    def __init__(self, pool) -> None:
        self._pool, self.statements = pool, 0

    async def fetchrow(self, *args, **kwargs):
        self.statements += 1
        return await self._pool.fetchrow(*args, **kwargs)

    async def fetchval(self, *args, **kwargs):
        self.statements += 1
        return await self._pool.fetchval(*args, **kwargs)


async def test_callers_that_find_the_facts_stale_at_once_share_one_read(pool):
    """A surge's intake and status calls found the cached facts stale in the same moment and each read
    them again: 289 reads of the last 500 stamps in a 45 s surge, six a second, for one a second."""
    await pool.execute("DELETE FROM requests")
    await _finished(pool, 30, 30, 2.0, ago_s=40)
    counted = _Counted(pool)
    view = QueueView(counted, window_s=60.0)
    answers = await asyncio.gather(*(view.facts() for _ in range(40)))
    await view._backfill                        # the span before the first read: once a process, aside
    assert counted.statements == 3 + 1, f"{counted.statements} statements for 40 callers"
    assert len({id(a) for a in answers}) == 1 and answers[0].per_second == pytest.approx(30 / 30)


class _Held(_Counted):
    """The real pool, each statement held until ``go`` is set (a read under way in a busy database)."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.go = asyncio.Event()
        self.go.set()

    async def fetchrow(self, *args, **kwargs):
        await self.go.wait()
        return await super().fetchrow(*args, **kwargs)

    async def fetchval(self, *args, **kwargs):
        await self.go.wait()
        return await super().fetchval(*args, **kwargs)


async def test_while_the_facts_are_read_again_callers_get_the_last_ones_at_once(pool):
    """In a surge's spike each 202 waited for the read of the second (44 ms on average); now one caller
    reads and the rest are answered from the last read, while it is at most STALE_SERVES_S old."""
    from services.stamping import queue as module

    await pool.execute("DELETE FROM requests")
    await _finished(pool, 30, 30, 2.0, ago_s=40)
    held = _Held(pool)
    view = QueueView(held, window_s=60.0)
    first = await view.facts()
    await asyncio.sleep(1.05)                                   # stale now
    held.go.clear()
    reader = asyncio.create_task(view.facts())                  # reads again, held
    await asyncio.sleep(0.05)
    assert not reader.done()
    started = time.monotonic()
    assert await asyncio.gather(*(view.facts() for _ in range(20))) == [first] * 20
    assert time.monotonic() - started < 0.1, "callers waited for the read under way"
    held.go.set()
    assert view._backfill.done()
    assert (await reader) is not first and held.statements == 3 + 1 + 3  # two reads of three, the span before once
    # too old to serve: a caller waits for the read, as the first ever did
    view._cached = (time.monotonic() - module.STALE_SERVES_S - 1, first)
    held.go.clear()
    reader = asyncio.create_task(view.facts())
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(view.facts())
    await asyncio.sleep(0.1)
    assert not waiting.done(), "facts older than STALE_SERVES_S were served"
    held.go.set()
    assert (await waiting) is (await reader)


async def test_while_the_order_is_read_again_new_requests_get_positions_from_the_last_read_at_once(pool):
    """The same for the queue order behind a new request's position (``position_for_new``)."""
    from services.stamping.fair_queue import FairQueue

    class HeldOrder(FairQueue):
        go = asyncio.Event()
        reads = 0

        async def order(self, conn):
            await self.go.wait()
            HeldOrder.reads += 1
            return await FairQueue.order(conn)

    await pool.execute("DELETE FROM schedule")
    await pool.execute("DELETE FROM requests")
    fair = HeldOrder()
    fair.go.set()
    view = QueueView(pool, window_s=60.0, fair=fair)
    assert await view.position_for_new("c") == 0
    await asyncio.sleep(1.05)                                   # stale now
    fair.go.clear()
    reader = asyncio.create_task(view.position_for_new("c"))    # reads again, held
    await asyncio.sleep(0.05)
    assert not reader.done()
    started = time.monotonic()
    # each 202 since the last read lands one step further back, as with a fresh read
    assert [await view.position_for_new("c") for _ in range(3)] == [1, 2, 3]
    assert time.monotonic() - started < 0.1, "callers waited for the read under way"
    fair.go.set()
    assert await reader == 0 and HeldOrder.reads == 2           # the new read: nothing on quota in the table


async def test_a_database_that_does_not_answer_is_waited_for_once_a_second_not_by_every_caller():
    """A database that accepts connections and never answers (a failover in progress): the first read
    gives up after its timeout and every caller gets no facts (intake still answers, without a position);
    for the rest of that second callers are answered at once instead of each waiting out its own timeout."""
    silent: list[asyncio.StreamWriter] = []

    async def accept(_reader, writer):
        silent.append(writer)                         # holds the connection open, says nothing

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    away = await asyncpg.create_pool(f"postgresql://bubuh@127.0.0.1:{port}/none", min_size=0, max_size=2)
    try:
        view = QueueView(away, window_s=60.0)
        assert await asyncio.gather(*(view.facts() for _ in range(20))) == [None] * 20
        assert silent, "the pool never reached the silent server: the test proves nothing"
        started = time.monotonic()
        assert await view.facts() is None
        assert time.monotonic() - started < 0.2, "the next caller waited out its own timeout"
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await asyncio.wait_for(away.close(), 5)


async def test_a_slow_read_of_the_order_serves_longer_so_reading_it_stays_a_small_share_of_the_process(pool):
    """Behind a deep backlog the order's read passes over every queued row (126 ms at 43,000 queued on the
    loaded box); read once a second by each API process it was an eighth of a core. A read serves for
    1 / ORDER_SHARE times as long as it took, and at least a second."""
    from services.stamping.fair_queue import FairQueue
    from services.stamping.queue import ORDER_SHARE

    class SlowOrder(FairQueue):
        reads = 0
        took_s = 0.0

        async def order(self, conn):
            SlowOrder.reads += 1
            await asyncio.sleep(self.took_s)
            return await FairQueue.order(conn)

    await pool.execute("DELETE FROM schedule")
    fair = SlowOrder()
    view = QueueView(pool, window_s=60.0, fair=fair)
    await view.position_for_new("c")
    await asyncio.sleep(1.05)
    await view.position_for_new("c")
    assert SlowOrder.reads == 2                      # a fast read serves a second
    SlowOrder.took_s = 0.1
    await asyncio.sleep(1.05)
    await view.position_for_new("c")                 # this read takes 0.1 s: it serves 0.1 / ORDER_SHARE
    read_at = time.monotonic()
    assert SlowOrder.reads == 3
    await asyncio.sleep(1.05)
    await view.position_for_new("c")
    assert SlowOrder.reads == 3, "a slow read was read again after a second"
    while SlowOrder.reads == 3 and time.monotonic() - read_at < 10:
        await asyncio.sleep(0.05)
        await view.position_for_new("c")
    assert SlowOrder.reads == 4                      # and it is read again, once it has served its time
    assert time.monotonic() - read_at >= 0.1 / ORDER_SHARE - 0.1


async def _second(pool, base, ago: int, came: int, done: int, offset: int) -> None:
    """In the second ``ago`` seconds before ``base``: ``came`` stamp requests accepted (still queued) and
    ``done`` stamps finished after a wait in the fair queue (accepted long before the read)."""
    at = base - dt.timedelta(seconds=ago - 0.5)
    await pool.execute(                                     # spread over the second, as a door takes them
        "INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at) "
        "SELECT 'c' || ($3 + i), 'ch', 'acct', 'queued', $1::timestamptz + ((i - 0.5) / $2 - 0.5) * interval '1 s' "
        "FROM generate_series(1, $2) AS i", at, came, offset)
    await pool.execute(
        "INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at, reserved_at, started_at, "
        "finished_at) SELECT 'd' || ($3 + i), 'ch', 'acct', 'completed', $4, $5, $6, $1 "
        "FROM generate_series(1, $2) AS i", at, done, offset,
        at - dt.timedelta(seconds=100), at - dt.timedelta(seconds=99.9), at - dt.timedelta(seconds=0.3))


async def _shared_box(pool, came_now: int, cost: float):
    """37 backlogged seconds, the door taking 40 and 120 a second in turn, the tier signing 120 stamps/s less
    ``cost`` per request/s (no burst seen in them: at 120, twice what it signs at most); then the door taking
    ``came_now`` a second (in the whole seconds before the read, however many seconds the inserts take: up to
    8 past the start). Returns the start's second."""
    await pool.execute("DELETE FROM requests")
    base = await pool.fetchval("SELECT date_trunc('second', now())")
    for ago in range(4, 41):
        came = 40 if ago % 2 else 120
        await _second(pool, base, ago, came, round(120 - cost * came), offset=ago * 1000)
    for ago in range(-8, 4):
        await _second(pool, base, ago, came_now, 0, offset=100_000 + ago * 1000)
    return base


async def _facts_within_one_second(pool):
    """A fresh view's facts and the whole second they were read in (read again when the read crossed one)."""
    for _ in range(5):
        before = await pool.fetchval("SELECT date_trunc('second', now())")
        facts = await QueueView(pool, window_s=60.0).facts()
        if await pool.fetchval("SELECT date_trunc('second', now())") == before:
            return facts, before
    pytest.fail("five reads of the queue's facts each crossed a whole second")


@pytest.mark.parametrize(("came_now", "expected", "in_burst"), [(0, 120.0, None), (40, 100.0, None), (300, 80.0, 48.0)])
async def test_a_pace_read_while_the_door_took_a_burst_is_forecast_at_the_doors_intake_now(pool, came_now, expected,
                                                                                          in_burst):
    """On a box where the door and the tier share the cores, the tier signs fewer while the door takes more
    (here 120 stamps/s less half a stamp per request/s). The pace read over the latest seconds (70/s) is
    forecast at what the door takes now, and at most at the tier's own pace (80/s: as many coming as leaving)
    beyond the burst's next seconds (``BURST_HOLDS_S``), in which it is the pace at the burst's intake (here
    under the floor: 0.4 of 120)."""
    base = await _shared_box(pool, came_now, cost=0.5)
    facts, read_s = await _facts_within_one_second(pool)
    late = int((read_s - base).total_seconds())             # whole seconds the inserts took (0 on a quiet box)
    assert late <= 8, f"the inserts took {late} s: past the burst's seconds"
    assert facts.per_second == pytest.approx(expected, abs=1.0)
    wait = 1200 / expected
    if in_burst is not None:
        assert facts.burst_per_second == pytest.approx(in_burst, abs=1.0)
        # its three seconds, the 160 before them and any second the inserts took have gone
        held = max(BURST_HOLDS_S - 4 - late, BURST_LEFT_S)
        assert facts.burst_s == held
        wait = held + (1200 - in_burst * held) / expected
    else:
        assert facts.burst_s == 0.0
    assert facts.eta_seconds(1200, reserved=True) == pytest.approx(wait + facts.finish_s, rel=0.02)
    assert DOOR_COST._value.get() == pytest.approx(0.5, abs=0.01)
    await pool.execute("DELETE FROM requests")


async def test_a_burst_at_the_door_is_told_the_pace_the_tier_kept_in_the_bursts_before_it(pool):
    """A faster box's fills came in at twice the intakes the door's cost was fitted over, and the tier signed
    0.29 of its pace after in them, where the line and its floor told 0.4-0.55 (make surge-eta, 7 December):
    once the span holds three backlogged seconds of a burst, a burst is told the pace the tier kept in them."""
    base = await _shared_box(pool, 300, cost=0.5)
    for ago, done in ((44, 30), (43, 40), (42, 50)):        # an earlier burst: 260 a second, 40 signed in each
        await _second(pool, base, ago, 260, done, offset=200_000 + ago * 1000)
    facts, _ = await _facts_within_one_second(pool)
    assert facts.burst_s > 0
    assert facts.burst_per_second == pytest.approx(40.0, abs=0.5)
    assert facts.per_second > 60                            # after the burst: the line's pace, as before
    await pool.execute("DELETE FROM requests")


async def test_a_process_reads_the_fits_span_before_its_first_read_once(pool):
    """A process's first read covers the last 60 s, and the door's cost is fitted over 30 backlogged seconds:
    after `bubuh up` the first round of make surge-eta read the fill's slow pace into the held queue (86% and
    72% held, 7 December). The seconds of the fit's span before the first read are read once, aside, and
    the door's cost counts them; recent seconds as read are kept as read."""
    await pool.execute("DELETE FROM requests")
    base = await pool.fetchval("SELECT date_trunc('second', now())")
    for ago in range(200, 280):                      # a shared box minutes ago: 120 - 0.5 x intake (each stamp
                                                     # accepted 100 s before it finished: not in these seconds)
        came = 40 if ago % 2 else 160
        await _second(pool, base, ago, came, round(120 - 0.5 * came), offset=ago * 1000)
    for ago in range(4, 21):                         # the last seconds: a steady door, no cost to read in them
        await _second(pool, base, ago, 60, 90, offset=ago * 1000)
    view = QueueView(pool, window_s=60.0)
    facts = await view.facts()
    assert facts.per_second == pytest.approx(90.0)   # the first read: no cost fitted (17 seconds), the pace read
    await view._backfill
    assert view._pace.door_cost() == pytest.approx(0.5, abs=0.02)
    assert all(view._pace._seconds[at].done == 90 for at in range(int(base.timestamp()) - 20,
                                                                  int(base.timestamp()) - 4))
    view._cached = None
    # nothing came in the last 3 s: the pace with an idle door, P0 = 90 read at 60 a second, + 0.5 x 60
    assert (await view.facts()).per_second == pytest.approx(90 + 0.5 * 60, abs=1.0)
    assert DOOR_COST._value.get() == pytest.approx(0.5, abs=0.02)
    await pool.execute("DELETE FROM requests")


async def test_where_the_doors_intake_does_not_slow_the_tier_the_pace_is_the_one_read(pool):
    await _shared_box(pool, 0, cost=0.0)
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.per_second == pytest.approx(120.0)
    assert DOOR_COST._value.get() == 0.0
    await pool.execute("DELETE FROM requests")


class _Yielded:
    """Where the tier yielded to a busy door (kernel/door_pressure.py's ``DoorWatch``, which reads it from the
    mark's time at each look): a stretch given by the test."""

    def __init__(self, first: float, last: float) -> None:
        self.stretch: tuple[float, float] | None = (first, last)

    def yielded_since_last_look(self):
        stretch, self.stretch = self.stretch, None
        return stretch


async def test_the_seconds_the_tier_yielded_to_the_door_in_are_left_out_of_the_pace(pool):
    """A spike marks the door busy and the stamping workers yield their cores: the 10 seconds of it sign 20 a
    second. A queue that a spike builds drains mostly after it; read at the yielded pace, the first ETAs in
    make surge-open's spike were 1.75 times the time taken (median)."""
    await pool.execute("DELETE FROM requests")
    base = await pool.fetchval("SELECT date_trunc('second', now())")
    for ago in range(11, 41):
        await _second(pool, base, ago, 60, 90, offset=ago * 1000)
    for ago in range(1, 11):
        await _second(pool, base, ago, 150, 20, offset=ago * 1000)
    for ago in range(-3, 1):                    # the spike's intake goes on to the read, however long the inserts take
        await _second(pool, base, ago, 150, 0, offset=100_000 + ago * 1000)
    assert (await QueueView(pool, window_s=60.0).facts()).per_second < 80
    spike = base.timestamp()
    facts = await QueueView(pool, window_s=60.0, door=_Yielded(spike - 10, spike + 3)).facts()
    assert facts.per_second == pytest.approx(90.0)
    await pool.execute("DELETE FROM requests")


async def test_the_doors_intake_lately_shows_a_burst_before_a_whole_second_does(pool):
    """A held queue's fill: three channels send at once into a quiet door. Its first second's 202s were told
    no burst until a whole second showed one (took/ETA 1.5-2.1 in the first half second, 7 December): the
    requests accepted in the last half second show it at the read."""
    await _shared_box(pool, 40, cost=0.5)                   # whole seconds: a quiet door, 100/s after them
    assert (await QueueView(pool, window_s=60.0).facts()).burst_s == 0.0
    while time.time() % 1 > 0.3:                            # early in a second: the burst stays in the one
        await asyncio.sleep(0.02)                           # under way, not in a whole second, at the read
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at) "
                       "SELECT 'late' || i, 'ch', 'acct', 'queued', now() "
                       "FROM generate_series(1, 150) AS i")   # 300 a second over the last half second
    facts = await QueueView(pool, window_s=60.0).facts()
    assert facts.burst_s == BURST_HOLDS_S and facts.burst_per_second == pytest.approx(BURST_FLOOR * 120, abs=1.0)
    assert facts.per_second == pytest.approx(100.0, abs=1.0)     # after the burst: as the whole seconds say
    await pool.execute("DELETE FROM requests")


async def test_a_202s_own_count_of_the_doors_intake_lately_shows_a_burst_without_a_read(pool):
    """The facts are read once a second (earlier for a process giving many 202s), and a fill's burst showed
    in them 0.4-0.6 s into it: the 202s before were told the quiet door's pace, and took 1.1-1.3 times their
    ETAs at the median (make surge-eta, 7 December 19:56). Each 202's own statement counts every API
    process's requests accepted in the quarter second before it (``http_intake.RECORD``): past the burst's
    line (here the tier's own pace, 80 a second: twice the 40 the door took in the whole seconds before is as
    much) the facts show the burst at once, from the seconds the last read recorded, with no read of their
    own; under it they stay as read."""
    await _shared_box(pool, 40, cost=0.5)                   # whole seconds: a quiet door, 100/s after them
    view = QueueView(pool, window_s=60.0)
    read = await view.facts()
    assert read.burst_s == 0.0 and read.per_second == pytest.approx(100.0, abs=1.0)
    await pool.execute("DELETE FROM requests")              # a read from here on would find no pace at all
    assert await view.facts(came_lately=18) is read         # 72 a second: under 80
    assert await view.facts(came_lately=None) is read
    burst = await view.facts(came_lately=75)                # 300 a second
    assert burst.burst_s == BURST_HOLDS_S and burst.burst_per_second == pytest.approx(BURST_FLOOR * 120, abs=1.0)
    assert burst.per_second == read.per_second and burst.finish_s == read.finish_s
    assert await view.facts() is burst                      # and they serve as read, for the rest of their time
    assert burst.eta_seconds(100) > read.eta_seconds(100) * 1.5


async def test_the_202s_statement_counts_every_processs_requests_accepted_in_the_quarter_second_before_it(pool):
    """``lately`` in ``http_intake.RECORD``: open requests of any channel accepted in the ``LATELY_AT_DOOR_S`` before
    the one it records; not those before that, not those finished, not the one recorded."""
    from services.stamping.http_intake import RECORD

    await pool.execute("DELETE FROM requests")
    at = await pool.fetchval("SELECT now()")
    for i, (ago_s, status) in enumerate([(0.05, "queued"), (0.1, "reserved"), (0.15, "stamping"), (0.2, "signed"),
                                         (0.24, "queued"), (0.1, "completed"), (0.3, "queued"), (1.0, "reserved")]):
        await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at) "
                           "VALUES ($1, $2, 'acct', $3, $4)", f"r{i}", f"ch{i % 2}", status,
                           at - dt.timedelta(seconds=ago_s))
    row = await pool.fetchrow(RECORD, "new", "ch0", "acct", None, None, "", at, None)
    assert row["recorded"] and row["lately"] == 5
    assert await pool.fetchval("SELECT count(*) FROM requests WHERE request_id = 'new'") == 1
    await pool.execute("DELETE FROM requests")


async def test_a_process_giving_many_202s_reads_the_facts_again_before_their_second_is_out(pool):
    """The facts serve for a second; a process that has given half a second of the tier's pace in 202s since
    they were read reads them again after FACTS_EARLY_S: a burst shows in them (the test above) only once
    read."""
    from services.stamping.queue import FACTS_EARLY_S

    await _shared_box(pool, 40, cost=0.5)
    view = QueueView(pool, window_s=60.0)
    first = await view.facts()
    read = time.monotonic()
    assert first.per_second == pytest.approx(100.0, abs=1.0)
    for _ in range(10):
        await view.position_for_new("ch")
    await asyncio.sleep(FACTS_EARLY_S + 0.05)
    assert await view.facts() is first                     # ten 202s: a tenth of a second's pace
    for _ in range(45):
        await view.position_for_new("ch")
    assert await view.facts() is not first                 # 55: over half of it
    assert time.monotonic() - read < 1.0, "the facts were a second old: read again for that alone"
    await pool.execute("DELETE FROM requests")


async def test_positions_leave_out_what_the_tier_took_from_the_head_since_the_queue_was_read(pool):
    """The order is read once a second and positions are counted against it: the rows the tier signed since
    stayed ahead of every position, and a held queue's fill was told 1.07-1.12 of its place (7 December,
    11:05). Since the read, the tier has taken about its pace times the time gone."""
    from services.contracts.bubuh.v1 import quota_pb2
    from services.stamping.fair_queue import Enqueue, FairQueue

    await _shared_box(pool, 40, cost=0.5)                   # the tier's pace after: 100 stamps/s
    await pool.execute("DELETE FROM schedule")
    fair = FairQueue()
    await Enqueue(pool, fair).process([hs.event(quota_pb2.QuotaReserved(request_id=f"o{i}", channel_id="c",
                                                                        account_id="a"), producer="quota")
                                       for i in range(300)])
    view = QueueView(pool, window_s=60.0, fair=fair, order_s=30.0)     # one read of the order serves the test
    assert (await view.facts()).per_second == pytest.approx(100.0, abs=1.0)
    now = dt.datetime.now(dt.UTC)
    first = await view.position_of("o299", "c", "reserved", now)
    read = view._order[0]
    assert 299 - 10 <= first <= 299                         # read a moment ago: at most a tenth of a second taken
    await asyncio.sleep(0.5)
    later = await view.position_of("o299", "c", "reserved", now)
    gone = time.monotonic() - read
    assert view._order[0] == read                           # the same read of the order
    assert later == pytest.approx(299 - 100 * gone, abs=2)  # 50 or so taken in half a second at 100/s
    await pool.execute("DELETE FROM schedule")
    await pool.execute("DELETE FROM requests")
