"""The fair queue: reserved stamp requests wait in PostgreSQL and are signed by channel share, not arrival.

Why (issue 12; September 2024): with stamping reading ``quota.events`` in order, a channel that sends
80% of the load puts every other channel's requests behind its backlog, and they all wait together.

How: the worker's consumer does not sign. It *enqueues* each ``QuotaReserved`` into ``schedule`` (one
statement per batch; the offset is committed after that transaction, so a reserved request is
durable in the queue before Kafka forgets it), and ``stamping_concurrency`` takers per worker sign
the row with the smallest start tag. The tags are start-time fair queueing (Goyal, Vin and Cheng,
1996), per channel ``c`` with weight ``w`` (``BUBUH_STAMP_CHANNEL_WEIGHTS``, default 1):

    start = max(V, c's last start tag given out + 1/w),   V = the smallest start tag queued
                                                            (none queued: the largest given out)

so a backlogged channel's requests are 1/w apart, a channel that had nothing queued starts at the
head, and with several backlogged channels each is served in proportion to its weight. A batch takes
its channels' tags before the transaction that queues its rows, in one short statement of its own
(``_TAGS``: each channel's last tag given out, in ``channel_tags``, moved on by the batch's count), so two
workers (members), or the batches of one poll's partitions, queueing one channel's requests in the same
moment get tags that follow each other. Read from the queued rows inside the queueing transaction
instead, each saw none of the other's rows (not committed yet) and both gave the channel the same
tags: a flood spread over four partitions had four rows a tag. An in-process turn fixed that within a
worker only; a transaction-scoped advisory lock fixed it across workers, but its waits passed 50 ms
under a surge (20-39 in ``make surge-members``, which allows none). The statement holds a channel's row
only while it runs, and takes the rows in channel order, so two members never deadlock on it. Tags
taken are spent: a request queued again by a redelivered batch (after a crash) keeps its place, and a
batch whose transaction fails after its tags were taken (it is redone) takes new ones, so its channel
moves back by a step per such request, never ahead. Tags only grow (an emptied queue does not start
again at 0, which would put a batch whose tags were taken just before behind every channel that
started again); at 10^10 stamps, float8 still tells tags 10^-5 apart.

The queue needs no clock and no rate, and two workers (members) share it: a taker claims the head by deleting
it (``SKIP LOCKED``: rows other takers hold are passed over) in a transaction that stays open while
it signs, so the others skip it, its commit ends it, and a killed taker's row is back the moment its
connection ends (one statement claims; none more finishes).

Why not Kafka alone (per-channel partitions or topics): partitions are assigned to members, not
taken by weight, and a new channel would mean a new partition. Why not faust's per-channel windows:
fair order needs no rate, only the tags; the rates stay for the expected times (``queue.py``).

Positions follow the same order: a request's position is the number of queued rows with a smaller
tag (``ahead_of``), and a new request's is where its channel's next tag would go (``ahead_of_new``),
so a small channel's 202 says "next" while the flood's says "behind my own backlog". The counts are made
against the queue as one statement read it (``QueueOrder``): every row of its head (``ORDER_HEAD``), exact,
and every ``ORDER_STRIDE``-th row beyond it with its rank, the rows between two of them counted by tag, so
a read costs one pass over the index and ships a few thousand places at 60,000 queued, not all of them.

Failure policy of a taker: the stamp itself is the worker's (``worker.py``: transient failures go to
``stamp.retry``, which enqueues again when due; permanent ones fail the request). An outage (the
database or the store away: ``failures.classify``; or the worker's own signing pool stopping under it,
which ``worker.py`` raises as one) rolls the claim back, so the row stays queued at its place, and
the taker pauses with growing backoff; the request is taken again, and the worker's status guards
make that safe. Any other exception is a crash: the row goes to the back of the queue with its crash
counted, and after ``BUBUH_CONSUMER_CRASH_RETRIES`` crashes it is dead-lettered (``HANDLER_CRASHED``
on ``stamp.dead-letter``, through the outbox in the same transaction; the request ``dead_lettered``,
its unit still reserved, as for a stamp that ran out of attempts), so a poisoned request never holds
the head of the queue.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from services.contracts.bubuh.v1 import quota_pb2
from services.kernel import database, errors, events, failures, logs, outbox
from services.kernel.events import Event, Outgoing
from services.kernel.listener import Listener
from services.kernel.metrics import DEAD_LETTERED
from services.kernel.processing.deadletter import dead_letter_headers
from services.kernel.processing.handler import Rejection
from services.kernel.settings import Settings
from services.kernel.waiting import Pause, sleep_or_stop, wait_any
from services.stamping.metrics import STAGE_SECONDS

log = logs.get(__name__)

RESERVED = events.type_name(quota_pb2.QuotaReserved)
IDLE_POLL_S = 1.0        # a lost NOTIFY costs at most this

# each channel's next ``n`` tags, taken in one autocommitted statement: start = max(V, its last tag + 1/w), then
# 1/w apart; V, the smallest tag queued (rows being signed included: their deletion is not committed), or
# with nothing queued the largest tag given out (every one of them was served), so a channel that was
# served last does not go back to the head behind channels that were not. Rows in channel order: two
# members' statements lock the same channels in the same order. Returns each channel's last tag.
_TAGS = """
WITH want AS (SELECT cid, n, w FROM unnest($1::text[], $2::int[], $3::float8[]) AS u(cid, n, w)),
     head AS (SELECT coalesce((SELECT start_tag FROM schedule ORDER BY start_tag, seq LIMIT 1),
                              (SELECT max(last_tag) FROM channel_tags), 0) AS v)
INSERT INTO channel_tags AS t (channel_id, last_tag)
SELECT want.cid, head.v + (want.n - 1) / want.w FROM want CROSS JOIN head ORDER BY want.cid
ON CONFLICT (channel_id) DO UPDATE
   SET last_tag = greatest(EXCLUDED.last_tag, t.last_tag + (SELECT n / w FROM want WHERE want.cid = t.channel_id))
RETURNING channel_id, last_tag
"""
_ENQUEUE = """
INSERT INTO schedule (request_id, channel_id, start_tag, topic, "partition", "offset", record_key, headers, event)
SELECT u.rid, u.cid, u.tag, u.t, u.p, u.o, u.rk, u.h::jsonb, u.ev
  FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[], $5::int[], $6::bigint[], $7::bytea[], $8::text[],
              $9::bytea[]) AS u(rid, cid, tag, t, p, o, rk, h, ev)
ON CONFLICT (request_id) DO NOTHING
"""
# the head of the queue no other taker holds, deleted by the claiming transaction: others skip it while that
# transaction signs, it is gone when it commits, and back (untouched) when it rolls back or its connection dies
_CLAIM = """
DELETE FROM schedule WHERE request_id = (SELECT request_id FROM schedule ORDER BY start_tag, seq LIMIT 1
                                         FOR UPDATE SKIP LOCKED)
RETURNING *
"""
# a crashed request back in the queue, behind every other
_REQUEUE = """
INSERT INTO schedule (request_id, channel_id, start_tag, topic, "partition", "offset", record_key, headers, event,
                      enqueued_at, crashes)
SELECT $1, $2, coalesce((SELECT max(start_tag) FROM schedule), $3) + 1, $4, $5, $6, $7, $8, $9, $10, $11
"""
# the queue at one moment, in one statement: the places (start tag, then arrival) of the first ORDER_HEAD queued rows
# and of every ORDER_STRIDE-th row beyond them and the last, each with its rank (the rows before it); each channel's
# last tag queued; and each channel's requests still waiting for their reservation (status 'queued': they join the
# queue as the quota tier reserves them, at tags that follow from the same rule). It shipped every row's place,
# sorted twice: at 30,000 queued 70-120 ms a read, at 60,000 220-250 ms, once a second in each API process, and the
# tier slowed as its backlog grew (make surge-sustained, 5 December); this reads the queue once and ships about
# n / ORDER_STRIDE places. The channels' last tags come from that one pass (``ranked``, materialized), not from a
# lookup per channel in ``channel_tags``: that table keeps every channel that ever stamped (539 on the development
# database), and the queue's table swings between empty and thousands of rows faster than autoanalyze follows, so
# the planner, counting it empty, made each lookup a scan of the whole queue: 130 ms a read at 1,500 queued, up to
# 866 ms (pg_stat_statements, 6 December evening), against 8.5 ms (at most 23) for the same rows read this way.
ORDER_HEAD = 1000
ORDER_STRIDE = 25
_ORDER = f"""
WITH ranked AS MATERIALIZED (SELECT channel_id, start_tag, seq, row_number() OVER (ORDER BY start_tag, seq) AS rn
                               FROM schedule),
     kept AS (SELECT start_tag, seq, rn FROM ranked
               WHERE rn <= {ORDER_HEAD} OR rn % {ORDER_STRIDE} = 0 OR rn = (SELECT count(*) FROM ranked))
SELECT (SELECT coalesce(array_agg(start_tag ORDER BY rn), '{{}}') FROM kept) AS tags,
       (SELECT coalesce(array_agg(seq ORDER BY rn), '{{}}') FROM kept) AS seqs,
       (SELECT coalesce(array_agg(rn - 1 ORDER BY rn), '{{}}') FROM kept) AS ranks,
       (SELECT coalesce(jsonb_object_agg(channel_id, tag), '{{}}') FROM
           (SELECT channel_id, max(start_tag) AS tag FROM ranked GROUP BY channel_id) AS l) AS last_tags,
       (SELECT coalesce(jsonb_object_agg(channel_id, n), '{{}}') FROM
           (SELECT channel_id, count(*) AS n FROM requests WHERE status = 'queued' GROUP BY channel_id) AS w)
         AS on_quota
"""
_PLACE = "SELECT start_tag, seq FROM schedule WHERE request_id = $1"
_TIE = 1e-9          # tags are sums of 1/w steps: equal in exact arithmetic, a hair apart in floating point


@dataclass(frozen=True)
class QueueOrder:
    """The queue at one moment: the places (start tag, then arrival) of some queued rows, sorted, with each one's
    rank (the rows before it): every row of the head, then every ``ORDER_STRIDE``-th and the last (``_ORDER``);
    each channel's last tag; and each channel's requests on quota (accepted, not yet reserved), which join the
    queue next. ``ranks`` left out: ``places`` is every row (rank = index)."""

    places: list[tuple[float, int]]
    last_tags: Mapping[str, float] = field(default_factory=dict)
    on_quota: Mapping[str, int] = field(default_factory=dict)
    ranks: list[int] | None = None

    def __post_init__(self) -> None:
        if self.ranks is not None and len(self.ranks) != len(self.places):
            raise ValueError("a rank for each place")

    @property
    def head(self) -> float:
        """V, the smallest start tag queued (0 for an empty queue, as the enqueue statement has it)."""
        return self.places[0][0] if self.places else 0.0

    def _rank(self, i: int) -> int:
        return i if self.ranks is None else self.ranks[i]

    def before(self, place: tuple[float, int | float]) -> int:
        """Rows whose place comes before ``place``: exact in the head and at each place read; between two places
        read, the rows between them counted in proportion to ``place``'s start tag (a backlogged channel's
        rows are 1/w apart, so the tags between two places read are near evenly filled): at most
        ``ORDER_STRIDE`` - 1 off."""
        i = bisect.bisect_left(self.places, place)
        if i < len(self.places) and self.places[i] == place:
            return self._rank(i)
        if i == 0:
            return 0
        if i == len(self.places):
            return self._rank(i - 1) + 1            # the last row is always read: after it, every row
        lo, hi = self._rank(i - 1) + 1, self._rank(i)   # rows up to the place before; rows before the next
        if hi <= lo:
            return lo
        (t0, _), (t1, _) = self.places[i - 1], self.places[i]
        fraction = 0.5 if t1 <= t0 else min(1.0, max(0.0, (place[0] - t0) / (t1 - t0)))
        return lo + round(fraction * (hi - lo))

    def ahead_of(self, place: tuple[float, int], taken: int = 0) -> int:
        """Rows that go before ``place`` (a row's own place is not before itself), less ``taken``: rows the tier
        has taken from the head since the order was read (they were the first)."""
        return max(0, self.before(place) - taken)

    def next_tag(self, channel_id: str, weight: float) -> float:
        """The start tag ``channel_id``'s next reserved request gets (the enqueue statement's rule)."""
        last = self.last_tags.get(channel_id)
        return self.head if last is None else max(self.head, last + 1.0 / weight)

    def ahead_of_new(self, channel_id: str, own_on_quota: int, weight: Callable[[str], float],
                     accepted_since: Mapping[str, int] | None = None, taken: int = 0) -> int:
        """Requests that go before a new request of ``channel_id`` whose channel has ``own_on_quota``
        requests on quota before it: the queued rows with a tag up to its tag (equal tags: they were
        there first), the channel's own on quota, and every other channel's requests on quota whose
        tags will come before it once reserved (they were accepted first; leaving them out put the 202s
        of a surge's first seconds a third to two thirds short of their true place). ``accepted_since``:
        each other channel's requests known accepted since the queue was read, on quota too. ``taken``: rows
        the tier has taken from the head since the read, no longer before it."""
        w = weight(channel_id)
        tag = self.next_tag(channel_id, w) + own_on_quota / w
        ahead = max(0, self.before((tag + _TIE, math.inf)) - taken) + own_on_quota
        since = accepted_since or {}
        for other in self.on_quota.keys() | since.keys():
            waiting = self.on_quota.get(other, 0) + since.get(other, 0)
            if other == channel_id or waiting <= 0:
                continue
            w_other = weight(other)
            first = self.next_tag(other, w_other)
            if first <= tag + _TIE:
                ahead += min(waiting, math.floor((tag - first) * w_other + _TIE) + 1)
        return ahead


class FairQueue:
    """The queue's order and positions; ``weights``: a channel's share (default 1)."""

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self._weights = dict(weights or {})
        bad = {c: w for c, w in self._weights.items() if not w > 0}
        if bad:
            raise ValueError(f"stamp channel weights must be above 0: {bad}")

    def weight(self, channel_id: str) -> float:
        return float(self._weights.get(channel_id, 1.0))

    # -- the consumer's side ---------------------------------------------------------------

    async def tags(self, pool: asyncpg.Pool, reserved: Sequence[Event]) -> list[float]:
        """The start tag of each of ``reserved`` (in order), taken for good before they are queued (``_TAGS``)."""
        counts: dict[str, int] = {}
        for e in reserved:
            counts[e.payload.channel_id] = counts.get(e.payload.channel_id, 0) + 1
        channels = sorted(counts)
        rows = await pool.fetch(_TAGS, channels, [counts[c] for c in channels], [self.weight(c) for c in channels])
        # the channel's first tag of this batch, then 1/w apart in the batch's order
        following = {r["channel_id"]: r["last_tag"] - (counts[r["channel_id"]] - 1) / self.weight(r["channel_id"])
                     for r in rows}
        out = []
        for e in reserved:
            cid = e.payload.channel_id
            out.append(following[cid])
            following[cid] += 1.0 / self.weight(cid)
        return out

    async def enqueue(self, conn: asyncpg.Connection, reserved: Sequence[Event], tags: Sequence[float]) -> None:
        """Queue ``QuotaReserved`` events at their ``tags`` (``FairQueue.tags``; a request already queued stays
        where it is)."""
        if not reserved:
            return
        await conn.execute(
            _ENQUEUE, [e.payload.request_id for e in reserved], [e.payload.channel_id for e in reserved], list(tags),
            [e.topic for e in reserved], [e.partition for e in reserved], [e.offset for e in reserved],
            [e.key for e in reserved], [json.dumps({k: v.hex() for k, v in e.headers.items()}) for e in reserved],
            [e.raw for e in reserved])
        await database.notify(conn, "_schedule", in_schema=True)

    # -- positions -------------------------------------------------------------------------

    @staticmethod
    async def order(conn) -> QueueOrder:
        """The queue now: one statement for every position read against it (``ahead_of``, and
        ``QueueOrder.ahead_of_new`` for a request not reserved yet)."""
        tags, seqs, ranks, last_tags, on_quota = await conn.fetchrow(_ORDER)
        return QueueOrder(list(zip(tags, seqs, strict=True)), json.loads(last_tags), json.loads(on_quota),
                          ranks=list(ranks))

    async def ahead_of(self, conn, request_id: str, order: QueueOrder | None = None, taken: int = 0) -> int | None:
        """Queued requests that go before ``request_id`` in ``order`` (a moment ago; default: now); None
        when it is not queued here. Its own place is one lookup; the count is in memory, not a scan of
        every row ahead per read."""
        place = await conn.fetchrow(_PLACE, request_id)
        if place is None:
            return None
        return (order or await self.order(conn)).ahead_of((place["start_tag"], place["seq"]), taken)


# the queued requests of a batch show 'reserved' in the transaction that queues them; a row another
# transaction holds (a retry's own update, a failure being recorded) is skipped, not waited for. The rows
# come from the primary key: ``IS NOT DISTINCT FROM`` keeps the partial indexes on status out of the plan
# (tracker.py, ``_SIGNED_ROWS``: with ``=`` this read all of ``requests_open``, 7.5 ms a call in a surge)
_SHOW_RESERVED = """
UPDATE requests SET status = 'reserved', reserved_at = now()
 WHERE request_id IN (SELECT request_id FROM requests
                       WHERE request_id = ANY($1::text[]) AND status IS NOT DISTINCT FROM 'queued'
                       ORDER BY request_id FOR UPDATE SKIP LOCKED)
RETURNING extract(epoch FROM now() - accepted_at)::float8 AS waited_s
"""


class Enqueue:
    """The stamping worker's consumer handler: ``QuotaReserved`` into the fair queue, a batch a statement,
    and the queued requests' status ``reserved`` (``reserved_at``: the moment they joined the queue) in
    the same transaction. The status tracker did that, a statement and a commit per request in a group of
    its own (the largest statement of a surge by time, pg_stat_statements), and its ``reserved_at`` was the
    tracker's moment, not the queue's."""

    batched = True
    types = frozenset({RESERVED})

    def __init__(self, pool: asyncpg.Pool, queue: FairQueue) -> None:
        self._pool = pool
        self._queue = queue

    async def process(self, batch: Sequence[Event]) -> list[Rejection]:
        reserved = [e for e in batch if isinstance(e.payload, quota_pb2.QuotaReserved)]
        if reserved:
            tags = await self._queue.tags(self._pool, reserved)     # before the transaction, committed at once
            async with self._pool.acquire() as conn, conn.transaction():
                await self._queue.enqueue(conn, reserved, tags)
                shown = await conn.fetch(_SHOW_RESERVED, [e.payload.request_id for e in reserved])
            for row in shown:
                STAGE_SECONDS.labels("queued").observe(max(0.0, row["waited_s"]))
        return []


def queued_event(row: asyncpg.Record) -> Event:
    """The ``QuotaReserved`` record a schedule row keeps, as the consumer read it."""
    env, payload = events.decode(row["event"])
    headers = {k: bytes.fromhex(v) for k, v in json.loads(row["headers"]).items()}
    return Event(envelope=env, payload=payload, topic=row["topic"], partition=row["partition"],
                 offset=row["offset"], key=row["record_key"], headers=headers, raw=bytes(row["event"]))


class Takers:
    """``count`` loops that each take the head of the queue, ``stamp`` it, and delete it, in one transaction
    on a connection of their own (``claims``: one per taker, apart from the pool the worker uses)."""

    def __init__(self, settings: Settings, claims: asyncpg.Pool, stamp: Callable[[Event], Awaitable[None]],
                 count: int, *, consumer: str, dead_letter_topic: str) -> None:
        self._settings = settings
        self._claims = claims
        self._stamp = stamp
        self._count = count
        self._consumer = consumer
        self._dlq = dead_letter_topic
        self._listener = Listener(settings, f"{settings.schema('stamping')}_schedule")

    async def run(self, stop: asyncio.Event) -> None:
        listening = asyncio.create_task(self._listener.run(stop), name="schedule-listener")
        try:
            await asyncio.gather(*(self._take(stop, self._listener.subscribe()) for _ in range(self._count)))
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._claims.close(), 5)

    async def _take(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        pause = Pause()
        while not stop.is_set():
            wake.clear()          # before looking: a NOTIFY after this look sets it again
            try:
                took = await self.take_one()
            except Exception as exc:  # noqa: BLE001 - rolled back, still queued: taken again after a pause
                log.warning("stamp taker paused; the request stays queued", error=repr(exc)[:300])
                await sleep_or_stop(stop, pause.next())
                continue
            pause.reset()
            if not took:
                await wait_any(stop, wake, IDLE_POLL_S)

    async def take_one(self) -> bool:
        """Stamp the head of the queue, if there is one this taker may have; False when there was none."""
        async with self._claims.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_CLAIM)
            if row is None:
                return False
            started = time.monotonic()
            event = queued_event(row)
            try:
                await self._stamp(event)
            except Exception as exc:
                if failures.classify(exc).waits:
                    raise                      # an outage: rolled back, still queued where it was
                await self._crashed(conn, row, event, exc)
                return True
        log.debug("stamp taken from the fair queue", request_id=row["request_id"], channel_id=row["channel_id"],
                  start_tag=row["start_tag"], took_s=round(time.monotonic() - started, 3))
        return True

    async def _crashed(self, conn: asyncpg.Connection, row: asyncpg.Record, event: Event, exc: Exception) -> None:
        """A crash (not an outage): to the back of the queue, or dead-lettered after the crash retries."""
        rid, crashes = row["request_id"], row["crashes"] + 1
        detail = f"{type(exc).__name__}: {exc}"
        if crashes <= self._settings.consumer_crash_retries:
            await conn.execute(_REQUEUE, rid, row["channel_id"], row["start_tag"], row["topic"], row["partition"],
                               row["offset"], row["record_key"], row["headers"], row["event"], row["enqueued_at"],
                               crashes)
            log.warning("stamp crashed its taker; queued again at the back", request_id=rid, crashes=crashes,
                        error=detail[:500])
            return
        headers = dead_letter_headers(list(event.headers.items()), code=errors.HANDLER_CRASHED.code, detail=detail,
                                      source=f"{row['topic']}/{row['partition']}/{row['offset']}",
                                      consumer=self._consumer)
        await outbox.add(conn, [Outgoing(self._dlq, row["record_key"], event.raw, headers, event.event_id)])
        await conn.execute("UPDATE requests SET status = 'dead_lettered', code = $2, detail = $3 "
                           "WHERE request_id = $1 AND status NOT IN ('signed', 'completed', 'failed')",
                           rid, errors.HANDLER_CRASHED.code, detail[:2000])
        DEAD_LETTERED.labels(self._consumer, errors.HANDLER_CRASHED.code).inc()
        log.error("stamp crashed its taker; dead-lettered, its unit stays reserved until replay or expiry",
                  request_id=rid, crashes=crashes, error=detail[:500])

