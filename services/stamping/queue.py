"""The visible queue: a request's position and its expected completion time.

Back-pressure shows here instead of as timeouts: intake answers at once with where the request
stands. Position = the requests that will be stamped before it, in the fair queue's order
(``fair_queue.py``): for a reserved request the queued rows with a smaller start tag; for one still
waiting on quota (and for a new one, at its 202) where its channel's next tag would go, behind the
channel's own requests still on quota and the rows and other channels' requests on quota whose tags
come first. So positions and times are per channel: a small channel's request says "next" while a
flood's says "behind its own backlog". Being signed: 0.

Expected time = the wait for the requests ahead (position / the tier's pace), or for a request still
on quota its reservation (the last 500 stamps' median, accepted to reserved) when that is longer, the
two overlapping; plus its own signing (their median, started to completed). The pace is the one the
tier kept in the latest 15 seconds (reaching back over the last 500 stamps) when it had a backlog (every
stamp finishing in them had waited in the fair queue): the pace a queue drains at now, forecast at what
the door takes now where the door's intake slows the tier (``pace.py``: the two share cores; a burst at
the door, for its next seconds). Before there are such seconds, stamps finished per busy second in the
last ``window``, or, before the window has seen one finish, the pace the last 500 stamps kept when the
tier was busy. The window's rate is a count in the schema (``_WINDOW``), or,
with ``BUBUH_STAMP_RATES_FROM=stream``, faust windows over ``stamp.events`` (``throughput.py``) once
this process counts some of its partitions. Facts are cached for a second, and so is the queue
(``QueueOrder``: the head's rows and a sample beyond in order, each channel's last tag and requests on quota),
read in one statement: a 202's position is counted against it in memory (the 202s every API process gave
since the read, counted as its row is written, are on quota), a reserved request's is its place (one index
lookup) counted against it, so a surge of intake calls and status reads costs a few statements a second, not
work in proportion to positions per call.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from services.kernel import failures, logs
from services.kernel.door_pressure import DoorWatch
from services.stamping.fair_queue import FairQueue, QueueOrder
from services.stamping.metrics import DOOR_COST
from services.stamping.pace import (
    DOOR_COST_ONE_BOX,
    FIT_SPAN_S,
    LATELY_AT_DOOR_S,
    LATELY_S,
    READ_AT_MOST_S,
    REREAD_S,
    Forecast,
    Second,
    TierPace,
)
from services.stamping.throughput import Throughput

log = logs.get(__name__)

# From the last 500 finished stamps: the pipeline's own time in its two parts, medians: accepted to reserved
# (the quota tier's round trip) and started to completed (signing, storing, the status update). The wait in
# the fair queue between them (reserved to started) is what position / rate stands for, and a surge's
# stamps all waited, so counting it here counted it twice. The tier's pace when busy (stamps per second
# that saw one finish), which stands in for the window's rate until the window has counted a completion
# (a surge's first seconds); and its pace *with a backlog*: stamps per second over the seconds in which every
# stamp that finished had waited in the fair queue (more than 0.1 s), so the tier was never idle in them.
# That is the pace a queue drains at. A second that saw a finish is not one: when fewer requests came than
# the tier could sign (a quiet hour, a surge's first seconds) it counts what came, and the ETAs of the
# next queue read the tier as slow as that (3 December, loadtests/held_queue.py after a small run, 2
# rounds each: while the queue filled, took/ETA medians 0.63 and 0.84 and 10% and 48% within 25%, against
# 0.79 and 1.02, 28% and 68% with this pace).
# Both paces count whole seconds only: the second under way is still filling. They are read over the seconds
# the last 500 stamps span, or over the latest BACKLOG_PACE_SECONDS when those are more (a tier signing more
# than 33 stamps/s), each second whole: the oldest second of the 500 is read whole too, not cut by the
# LIMIT. Counted as cut, each was a second with a fraction of its stamps, and with ~12 s in 500 stamps the
# paces read about 8% slow: a held queue's stamps took 0.88-0.90 of their first ETAs (make surge-eta, 3
# December), 0.83-1.01 after (README, "ETAs people can plan by").
# The backlog pace is that of the latest BACKLOG_PACE_SECONDS such seconds, not of all the 500 hold: 500 stamps
# are 10 s at 50/s but 70 s at 7/s, and over 70 s a tier that warmed up or got its cores back was read at
# the pace it had left behind (CI, 3 December: a held queue on a starved box signed at 7/s, then 13-19/s;
# its stamps took 0.71 of their first ETAs and 35% were within 25%). Nor fewer than those 15 seconds: with
# two stamping workers signing 105-135 stamps/s, 500 stamps were 4-5 s, and the pace of those few seconds
# (it moves by a third from one 5 s to the next on this box) set every ETA of the next second: replayed over
# make surge-eta's rounds of 5 December, the held requests' ETAs from the last 500 stamps were within 25%
# for 74% of them, from the latest 15 seconds or more for 80% (round by round 77/100/62% against 84/99/61%).
BACKLOG_WAIT_S = 0.1
BACKLOG_SECONDS = 3       # seconds with a backlog needed before their pace is used
BACKLOG_PACE_SECONDS = 15
HISTORY_STAMPS = 500
# The pace's history is read in two statements. The first reads the latest 500 stamps (by index, backwards) and
# from them and the clock the window's bounds; the second reads the seconds from those bounds on, given as
# values. Read in one statement, the bounds were a sub-select the planner could not see into: it costed the
# window as a third of the registry, and once the registry held 3.1 million stamps (and their rows were no longer
# in finishing order on disk) it read the whole table for it, 2.1 s a read, past the read's 0.5 s budget, and
# every 202 and status read went without an ETA (make surge-eta, 7 December: 0% within 25%).
_RECENT = f"""
WITH recent AS (SELECT status, accepted_at, reserved_at, started_at, finished_at FROM requests
                 WHERE status IN ('completed', 'failed') ORDER BY finished_at DESC LIMIT {HISTORY_STAMPS}),
     bounds AS (SELECT date_trunc('second', now()) AS now_s,
                       least(date_trunc('second', (SELECT min(finished_at) FROM recent)),
                             date_trunc('second', now()) - interval '{BACKLOG_PACE_SECONDS} s') AS pace_from),
     span AS (SELECT least(pace_from, came_from) AS from_s, came_from
                FROM (SELECT pace_from, greatest(to_timestamp($1) - interval '{REREAD_S} s',
                                                 now_s - interval '{READ_AT_MOST_S} s') AS came_from FROM bounds) AS b)
SELECT (SELECT extract(epoch FROM percentile_disc(0.5) WITHIN GROUP (ORDER BY reserved_at - accepted_at))
          FROM recent WHERE status = 'completed') AS reserve_s,
       (SELECT extract(epoch FROM percentile_disc(0.5) WITHIN GROUP (ORDER BY finished_at - started_at))
          FROM recent WHERE status = 'completed') AS finish_s,
       (SELECT extract(epoch FROM now_s)::bigint FROM bounds) AS now_s,
       (SELECT count(*) FROM requests WHERE status IN ('queued', 'reserved', 'stamping', 'signed')
                                        AND accepted_at >= now() - interval '{LATELY_S} s' AND accepted_at < now())
     + (SELECT count(*) FROM requests WHERE status IN ('completed', 'failed')
                                        AND finished_at >= now() - interval '{LATELY_S} s'
                                        AND accepted_at >= now() - interval '{LATELY_S} s' AND accepted_at < now())
         AS came_lately,
       (SELECT extract(epoch FROM pace_from)::bigint FROM bounds) AS pace_from,
       (SELECT extract(epoch FROM from_s)::bigint FROM span) AS from_s,
       (SELECT extract(epoch FROM came_from)::bigint FROM span) AS came_from
"""
# $1: from_s, $2: came_from (epoch seconds, as _RECENT gives them)
_SECONDS = f"""
WITH seconds AS (SELECT date_trunc('second', finished_at) AS at, count(*) AS n,
                        bool_and(started_at - reserved_at > interval '{BACKLOG_WAIT_S} s') AS backlog
                   FROM requests
                  WHERE status IN ('completed', 'failed') AND finished_at >= to_timestamp($1::float8)
                  GROUP BY 1),
     came AS (SELECT date_trunc('second', accepted_at) AS at, count(*) AS n
                FROM (SELECT accepted_at FROM requests
                       WHERE status IN ('queued', 'reserved', 'stamping', 'signed')
                         AND accepted_at >= to_timestamp($2::float8)
                      UNION ALL
                      SELECT accepted_at FROM requests
                       WHERE status IN ('completed', 'failed') AND finished_at >= to_timestamp($2::float8)
                         AND accepted_at >= to_timestamp($2::float8)) AS accepted
               GROUP BY 1)
SELECT ARRAY(SELECT extract(epoch FROM at)::bigint FROM seconds ORDER BY at) AS done_at,
       ARRAY(SELECT n FROM seconds ORDER BY at) AS done,
       ARRAY(SELECT backlog FROM seconds ORDER BY at) AS backlog,
       ARRAY(SELECT extract(epoch FROM at)::bigint FROM came ORDER BY at) AS came_at,
       ARRAY(SELECT n FROM came ORDER BY at) AS came
"""

def _seconds_of(history: Mapping[str, Any]) -> list[tuple[int, Second]]:
    """``_SECONDS``'s row as the seconds it read: intake, finishes and backlog per epoch second."""
    came = dict(zip(history["came_at"], history["came"], strict=True))
    done = {at: (n, backlog) for at, n, backlog in zip(history["done_at"], history["done"], history["backlog"],
                                                      strict=True)}
    return [(at, Second(came.get(at, 0), *done.get(at, (0, False)))) for at in set(came) | set(done)]


def _busy_pace(history: Mapping[str, Any]) -> float:
    """Stamps finished per busy second since the pace window's start (``pace_from``), over its whole seconds, or
    with the second under way when no whole one saw a finish; 0 when none did."""
    since, now = history["pace_from"], history["now_s"]
    seconds = [(at, n) for at, n in zip(history["done_at"], history["done"], strict=True) if at >= since]
    counted = [n for at, n in seconds if at < now] or [n for _, n in seconds]
    return sum(counted) / len(counted) if counted else 0.0


# The schema's count of the window (BUBUH_STAMP_RATES_FROM=database, or a process that counts none of
# stamp.events' partitions yet): stamps finished per *busy* second, as the stream counts them
# (throughput.py), over the window's whole seconds (as the paces above). Divided by the whole window it was
# diluted by the quiet seconds before a surge: right after a restart the ETAs read about 4 times the actual
# time (docs/surge-journal.md, 2 December), and in an open-loop A/B on 2 December 4-5% of first ETAs were within 25% of
# the actual time against 41-62% from the stream.
_WINDOW = """
SELECT count(*)::float8 / nullif(count(DISTINCT date_trunc('second', finished_at)), 0) FROM requests
 WHERE status IN ('completed', 'failed')
   AND finished_at >= date_trunc('second', now()) - make_interval(secs => $1)
   AND finished_at < date_trunc('second', now())
"""

# before any completion was seen, assume this many seconds per stamp per the whole tier
COLD_SECONDS_PER_STAMP = 0.05
# the pipeline's own hops in a burst at the door: at most this many times their time before it
HOPS_STRETCH_AT_MOST = 4.0


@dataclass(frozen=True)
class QueueFacts:
    """What an expected time needs besides a position. No count of open requests: positions come from the
    fair queue's order, and the depth gauge from the worker's backlog reading (``backlog.py``). Counted
    here, once a second in each API process, it read every open request: 112 ms a read at 23,000 open
    (make surge-sustained, 5 December), for a gauge."""

    per_second: float
    reserve_s: float = 0.0    # accepted to reserved: the quota tier's round trip
    finish_s: float = 0.0     # started to completed: signing, storing, the status update
    burst_per_second: float = 0.0   # the pace for the first burst_s of a wait, while the door's burst goes on
    burst_s: float = 0.0            # (pace.py; 0: the door is in none, the whole wait at per_second)

    @property
    def base_s(self) -> float:
        """The pipeline's own time for a stamp with nothing ahead of it."""
        return self.reserve_s + self.finish_s

    def eta_seconds(self, position: int, reserved: bool = False) -> float:
        """Until completed: the wait for the ``position`` requests ahead, or, for one not yet ``reserved``, its
        quota reservation when that takes longer (the queue ahead drains while the reservation is under
        way: the two overlap; added together, held-queue ETAs read 15-25% long), then its own signing. Where
        the door is in a burst, the wait's first ``burst_s`` go at the burst's pace, the rest at ``per_second``,
        and the pipeline's own hops within the burst are slowed as the tier is (``hop_stretch``)."""
        wait = max(self.wait_s(position), 0.0 if reserved else self._hop_s(0.0, self.reserve_s))
        return round(wait + self._hop_s(wait, self.finish_s), 1)

    def _hop_s(self, start: float, took_s: float) -> float:
        """How long a hop that took ``took_s`` before the burst takes from ``start`` seconds on: ``hop_stretch``
        times as long for its part within the burst's ``burst_s`` (so an ETA never shrinks as its position
        grows)."""
        stretch = self.hop_stretch()
        within = max(self.burst_s - start, 0.0)
        if took_s * stretch <= within:
            return took_s * stretch
        return within + (took_s - within / stretch)

    def hop_stretch(self) -> float:
        """How much slower the pipeline's own hops (``reserve_s``, ``finish_s``: the latest stamps' medians,
        mostly from before a burst) go while the door's burst goes on: as much as the tier's pace, at most
        ``HOPS_STRETCH_AT_MOST``. They share the cores the door takes: in make surge-eta's fills (7 December,
        20:03-20:15) the first requests' reservations took 0.33-0.5 s and their signing 0.6-0.8 s, against
        0.23-0.27 and 0.35-0.45 s after, and the tier signed 1.5-2 times slower in them than after."""
        if not self._bursting():
            return 1.0
        return min(max(self._rate() / self.burst_per_second, 1.0), HOPS_STRETCH_AT_MOST)

    def wait_s(self, position: int) -> float:
        """The time the tier takes to sign ``position`` requests from now."""
        rate = self._rate()
        if not self._bursting():
            return position / rate
        in_burst = self.burst_per_second * self.burst_s
        if position <= in_burst:
            return position / self.burst_per_second
        return self.burst_s + (position - in_burst) / rate

    def signed_in(self, seconds: float) -> float:
        """The requests the tier signs in ``seconds`` from now: ``wait_s`` the other way round."""
        if not self._bursting():
            return self._rate() * seconds
        return self.burst_per_second * min(seconds, self.burst_s) + max(0.0, seconds - self.burst_s) * self._rate()

    def _bursting(self) -> bool:
        return self.burst_s > 0 and self.burst_per_second > 0

    def _rate(self) -> float:
        return self.per_second if self.per_second > 0 else 1 / COLD_SECONDS_PER_STAMP


# The facts serve for a second, or, once this process has given 202s worth FACTS_GIVEN_SHARE of a second of the
# tier's pace since they were read, for FACTS_EARLY_S: a burst at the door shows in its intake lately (pace.py),
# and read a second late, the 202s of a held queue's first second were told no burst (took/ETA 1.5-2.1 for the
# first half second of make surge-eta's fills, 7 December, 10:39). A held queue gives each of two API processes
# about half the tier's pace a second: read once a second, as before.
FACTS_EARLY_S = 0.25
FACTS_GIVEN_SHARE = 0.5

# how long the last read of the facts or of the order serves callers while the next read is under way: they
# are answered at once from it instead of waiting for that read (in a surge's spike the 202s waited 44 ms
# on average for their position, most of it behind the read of the second)
STALE_SERVES_S = 5.0


def _last_read_serves(reading: asyncio.Lock, last: tuple | None) -> bool:
    """Another caller is reading again, and the last read (``(monotonic time, ...)``) may answer meanwhile."""
    return reading.locked() and last is not None and time.monotonic() - last[0] < STALE_SERVES_S


# the share of its time an API process spends reading the queue's order, at most: a read serves for at least
# order_s (1 s) and for 1 / ORDER_SHARE times as long as it took. The read passes over every queued row (the
# index, in order), so behind a deep backlog it is read less often: 126 ms at 43,000 queued on the loaded box
# (make surge-sustained, 5 December), once a second in each of two API processes. The 202s given since the read
# are counted on (``_new``); what the queue moved meanwhile (2.5 s of stamps at that depth) is 0.3% of it.
ORDER_SHARE = 0.05

_ON_QUOTA_BEFORE = ("SELECT count(*) FROM requests WHERE channel_id = $1 AND status = 'queued' "
                    "AND accepted_at < $2")
# A status read in one statement: the request's row with what its position needs, its place in the fair queue
# while it waits there, or else its channel's requests on quota before it (``_ON_QUOTA_BEFORE``, evaluated only
# for such a row). Read apart, the place was a second statement for every waiting request's read: in a closed
# loop (4 x 500 stamps, 16 in flight) the status reads sent 7 of the 17.5 statements a stamp cost PostgreSQL.
STATUS_ROW = """
SELECT r.*, s.start_tag AS queue_tag, s.seq AS queue_seq,
       CASE WHEN s.request_id IS NULL AND r.status IN ('queued', 'reserved')
            THEN (SELECT count(*) FROM requests AS q
                   WHERE q.channel_id = r.channel_id AND q.status = 'queued' AND q.accepted_at < r.accepted_at)
       END AS on_quota_before
  FROM requests AS r LEFT JOIN schedule AS s ON s.request_id = r.request_id
 WHERE r.request_id = $1 AND r.channel_id = $2
"""


@dataclass(frozen=True)
class AcceptedSince:
    """The requests still open that every API process accepted after the queue's order was read (at
    ``read_at``) and before a new one, per channel: counted in the statement that records the new one
    (``http_intake.RECORD``)."""

    read_at: dt.datetime
    counts: Mapping[str, int]


class QueueView:
    def __init__(self, pool: asyncpg.Pool, window_s: float, throughput: Throughput | None = None,
                 fair: FairQueue | None = None, order_s: float = 1.0, door: DoorWatch | None = None) -> None:
        self._pool = pool
        self._door = door                                   # where the tier yields to a busy door: when it did
        self._window_s = window_s
        self._throughput = throughput
        self._fair = fair or FairQueue()
        self._cached: tuple[float, QueueFacts | None] | None = None   # (monotonic, facts; None: the read failed)
        self._order_s = order_s                             # how long a read of the queue serves, at least (0: none)
        self._order_serves_s = order_s                      # ... and after the last read's cost (ORDER_SHARE)
        self._order: tuple[float, dt.datetime, QueueOrder] | None = None   # (monotonic, wall clock, the queue)
        self._order_read = asyncio.Lock()                   # one read of the order at a time, shared
        self._facts_read = asyncio.Lock()                   # one read of the facts at a time, shared
        self._new: dict[str, int] = {}                      # channel -> 202s known given since the order read
                                                            # (requests accepted after it: on quota, not in it)
        # each second's intake and finishes: the pace ahead; where the door shares the tier's cores (the tier yields
        # to it), its cost until fitted is the one-box cost (pace.py)
        self._pace = TierPace(unfitted_cost=DOOR_COST_ONE_BOX if door is not None else 0.0)
        self._backfill: asyncio.Task | None = None          # the span before the first read, read once, aside
        self._given_since_facts = 0                         # 202s given here since the facts' read began
        self._forecast: tuple[int, int, Forecast] | None = None   # the last read's (pace_from, now, forecast)

    def _facts_are_fresh(self) -> bool:
        """Read less than a second ago, and this process has not given, since, 202s worth ``FACTS_GIVEN_SHARE``
        of a second of the tier's pace (at least ``FACTS_EARLY_S`` after the read)."""
        if self._cached is None:
            return False
        age, facts = time.monotonic() - self._cached[0], self._cached[1]
        if age >= 1.0:
            return False
        return not (facts is not None and age >= FACTS_EARLY_S
                    and self._given_since_facts > FACTS_GIVEN_SHARE * facts.per_second)

    async def facts(self, came_lately: int | None = None) -> QueueFacts | None:
        """The queue's facts, read at most once a second: callers that find them stale while another reads
        them get the last ones (up to ``STALE_SERVES_S`` old; the first read is waited for), not a read of
        their own (a surge's intake and status calls all found the cache stale in the same moment and each
        ran the three statements: six reads a second, not one); a failed read answers None to every caller
        for that second instead of being tried again by each in turn. ``came_lately``: the stamp requests
        every API process accepted in the ``LATELY_AT_DOOR_S`` before a 202's own (``http_intake.RECORD``
        counts them), which shows a burst at the door before the facts are read again (``_burst_at_the_door``)."""
        return self._burst_at_the_door(await self._facts(), came_lately)

    async def _facts(self) -> QueueFacts | None:
        if self._facts_are_fresh():
            return self._cached[1]
        if _last_read_serves(self._facts_read, self._cached):
            return self._cached[1]
        async with self._facts_read:
            if self._facts_are_fresh():
                return self._cached[1]
            return await self._read_facts()

    def _burst_at_the_door(self, facts: QueueFacts | None, came_lately: int | None) -> QueueFacts | None:
        """The facts as read, or, where a 202's own count of the door's intake lately shows a burst they do not,
        the same facts with the burst forecast from the seconds the last read recorded (no read of its own;
        they then serve as read, for the rest of their time). Read once a second, or early once a process
        has given many 202s (``FACTS_GIVEN_SHARE``), the facts showed a fill's burst 0.4-0.6 s into it, and
        the 202s before that were told the pace of the quiet door before it: took/ETA 1.1-1.3 at the median
        and 1.6-2.7 at p90 in those seconds, 37-56% within 25% (make surge-eta's fills, 7 December 19:56)."""
        if (facts is None or came_lately is None or self._forecast is None
                or self._cached is None or self._cached[1] is not facts):
            return facts
        since, now, last = self._forecast
        forecast = self._pace.at_the_door(since, now, BACKLOG_SECONDS, BACKLOG_PACE_SECONDS, last,
                                          came_lately / LATELY_AT_DOOR_S)
        if forecast is last:
            return facts
        burst = replace(facts, burst_per_second=forecast.burst_per_second, burst_s=forecast.burst_s)
        self._forecast = (since, now, forecast)
        self._cached = (self._cached[0], burst)
        return burst

    async def _read_facts(self) -> QueueFacts | None:
        now = time.monotonic()
        self._given_since_facts = 0
        rates = self._throughput.rates() if self._throughput else None
        try:
            history = await asyncio.wait_for(self._history(), 0.5)
            reserve_s, finish_s = float(history["reserve_s"] or 0.0), float(history["finish_s"] or 0.0)
            pace = _busy_pace(history)
            known = rates is not None and rates.known
            forecast = self._record(history)
            burst = (0.0, 0.0)
            if forecast is not None:                            # the pace the queue drains at, else the stream's
                per_second = forecast.per_second
                burst = (forecast.burst_per_second, forecast.burst_s)
            elif known:
                per_second = rates.rate_per_s
            else:
                per_second = float(await asyncio.wait_for(self._pool.fetchval(_WINDOW, self._window_s), 0.5) or 0.0)
            if per_second <= 0:
                per_second = pace      # nothing finished in the window yet: the pace the tier last kept
        except Exception as exc:  # noqa: BLE001 - no database: no position, intake still answers
            if failures.classify(exc).waits:
                self._cached = (time.monotonic(), None)      # the rest of this second answers None at once
                return None
            raise
        facts = QueueFacts(per_second, reserve_s, finish_s, *burst)
        self._cached = (now, facts)
        return facts

    async def _history(self) -> dict[str, Any]:
        """The latest stamps' times and the window's bounds (``_RECENT``), and the seconds within them
        (``_SECONDS``)."""
        recent = await self._pool.fetchrow(_RECENT, self._pace.read_until or 0)
        seconds = await self._pool.fetchrow(_SECONDS, recent["from_s"], recent["came_from"])
        return {**recent, **seconds}

    def _backfill_once(self, before: int) -> None:
        """After the first read: the seconds of the fit's span before it (``FIT_SPAN_S``), read once in a task
        of its own, outside any caller's budget (a 600 s read took 65 ms at 55 stamps/s, and grows with the
        rate: on the ETA's path it could outlast the 0.5 s every read has). Without them a process counted no
        door's cost until it had seen 30 backlogged seconds itself: the first round after `bubuh up` read the
        fill's slow pace into the held queue (make surge-eta, 7 December: 86% and 72% held in those rounds,
        92-100% in the rest). A failed read is not tried again: the fit fills in as the process reads."""
        if self._backfill is None:
            self._backfill = asyncio.get_running_loop().create_task(self._read_before(before), name="pace-backfill")

    async def _read_before(self, before: int) -> None:
        try:
            history = await asyncio.wait_for(self._pool.fetchrow(_SECONDS, before - FIT_SPAN_S,
                                                                 before - FIT_SPAN_S), 30)
        except Exception as exc:  # noqa: BLE001 - the fit fills in as the process reads
            log.warning("the pace's earlier seconds were not read; the door's cost is fitted as they come",
                        error=repr(exc)[:300])
            return
        self._pace.backfill(before, _seconds_of(history))

    def _record(self, history: Mapping[str, Any]) -> Forecast | None:
        """The read's seconds into the tier's pace, and the pace a queue drains at from now on."""
        now = history["now_s"]
        self._pace.record(history["from_s"], history["came_from"], now, _seconds_of(history))
        self._backfill_once(min(history["from_s"], history["came_from"]))
        if self._door is not None and (stretch := self._door.yielded_since_last_look()) is not None:
            self._pace.yielded(int(stretch[0]), int(stretch[1]))
        # the door's intake lately, per second (rows not yet committed are not in it)
        forecast = self._pace.forecast(history["pace_from"], now, BACKLOG_SECONDS, BACKLOG_PACE_SECONDS,
                                       history["came_lately"] / LATELY_S)
        self._forecast = (history["pace_from"], now, forecast) if forecast is not None else None
        DOOR_COST.set(forecast.door_cost if forecast else self._pace.door_cost())
        return forecast

    async def position_of(self, request_id: str, channel_id: str, status: str, accepted_at: dt.datetime, *,
                          waiting: Mapping[str, Any] | None = None) -> int | None:
        """Requests stamped before this one (0 while it is being signed); None when the database is away.
        ``waiting``: the request's row as ``STATUS_ROW`` read it, whose place and count save their statements."""
        if status not in ("queued", "reserved"):
            return 0
        try:
            return await asyncio.wait_for(self._position(request_id, channel_id, status, accepted_at, waiting), 0.5)
        except Exception as exc:  # noqa: BLE001
            if failures.classify(exc).waits:
                return None
            raise

    async def _position(self, request_id: str, channel_id: str, status: str, accepted_at: dt.datetime,
                        waiting: Mapping[str, Any] | None) -> int:
        order = await self._queue_order()
        taken = self._taken_since_read()
        if waiting is not None:
            if status == "reserved" and waiting["queue_tag"] is not None:
                return order.ahead_of((waiting["queue_tag"], waiting["queue_seq"]), taken)
            return order.ahead_of_new(channel_id, waiting["on_quota_before"], self._fair.weight, self._new, taken)
        async with self._pool.acquire() as conn:
            if status == "reserved":
                ahead = await self._fair.ahead_of(conn, request_id, order, taken)
                if ahead is not None:
                    return ahead
            # on quota (or taken since the order was read): behind its channel's earlier requests on quota
            own = await conn.fetchval(_ON_QUOTA_BEFORE, channel_id, accepted_at)
            return order.ahead_of_new(channel_id, own, self._fair.weight, self._new, taken)

    def _taken_since_read(self) -> int:
        """The rows the tier has taken from the queue's head since its order was read, at the pace the facts
        last read give (a burst's, while the door is in one): the order is read once a second, and counted
        against it as read, the rows signed meanwhile stayed ahead of every position. With every API
        process's 202s counted (``AcceptedSince``), a held queue's fill was told 1.07-1.12 of its place in
        the first round after a start (make surge-eta, 7 December 11:05), its requests 0.68-0.72 of their ETAs."""
        facts = self._cached[1] if self._cached else None
        if self._order is None or facts is None:
            return 0
        return int(facts.signed_in(max(0.0, time.monotonic() - self._order[0])))

    def _order_is_fresh(self) -> bool:
        return self._order is not None and time.monotonic() - self._order[0] < self._order_serves_s

    async def _queue_order(self) -> QueueOrder:
        """The queue, read at most once a second, less often when a read is slow (``ORDER_SHARE``), by one
        caller; the others are answered from the last read meanwhile (up to ``STALE_SERVES_S`` old while
        a read is under way); no connection is taken while the last read serves."""
        if not self._order_is_fresh():
            if _last_read_serves(self._order_read, self._order):
                return self._order[2]
            async with self._order_read:
                if not self._order_is_fresh():
                    read_at = dt.datetime.now(dt.UTC)
                    async with self._pool.acquire() as conn:
                        started = time.monotonic()          # the read's own time, not the wait for a connection
                        self._order = (started, read_at, await self._fair.order(conn))
                    took = time.monotonic() - started
                    self._order_serves_s = max(self._order_s, took / ORDER_SHARE) if self._order_s > 0 else 0.0
                    self._new.clear()
        return self._order[2]

    @property
    def order_read_at(self) -> dt.datetime | None:
        """When the queue's order the positions are counted against was read (wall clock; None: not yet)."""
        return self._order[1] if self._order is not None else None

    async def position_for_new(self, channel_id: str, accepted_at: dt.datetime | None = None,
                               before: AcceptedSince | None = None) -> int | None:
        """The position of a request of ``channel_id`` accepted at ``accepted_at`` (now, at its 202): where
        its channel's next tag goes, behind the channel's requests on quota. Counted against the queue
        read at most a second ago, with the 202s given since then, for a request accepted after the read,
        added to its channel's requests on quota, this channel's and every other's (so a surge of intake
        calls reads the queue once a second, and each 202 of a backlogged channel lands one step of its tag
        further, past every channel sharing that step). The 202s since the read are this process's own as it
        gives them, and ``before``: every API process's accepted before this one, per channel, as the
        statement that recorded it counted them (``http_intake.RECORD``), when that was against the same
        read. With its own alone, a process counted none of the other's: a held queue's fill (three channels
        sending at once, two API processes, make surge-eta 7 December 10:44) was told 0.71-0.78 of its place
        in its first two seconds and took twice its first ETA there, and 0.80-0.92 after."""
        try:
            order = await asyncio.wait_for(self._queue_order(), 0.5)
        except Exception as exc:  # noqa: BLE001
            if failures.classify(exc).waits:
                return None
            raise
        if len(self._new) > 10_000:   # channels are few; never grow without bound
            self._new.clear()
        read_before = accepted_at is not None and self._order is not None and accepted_at < self._order[1]
        if before is not None and self._order is not None and before.read_at == self._order[1]:
            for other, n in before.counts.items():     # every API process's, where this one counted its own
                self._new[other] = max(self._new.get(other, 0), n)
        own = order.on_quota.get(channel_id, 0) + self._new.get(channel_id, 0)
        if read_before:
            own -= 1                  # its own row was on quota when the queue was read: not ahead of itself
        else:
            self._new[channel_id] = self._new.get(channel_id, 0) + 1
        self._given_since_facts += 1
        return order.ahead_of_new(channel_id, max(0, own), self._fair.weight, self._new, self._taken_since_read())
