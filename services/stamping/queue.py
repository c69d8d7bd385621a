"""The visible queue: a request's position and its expected completion time.

Back-pressure shows here instead of as timeouts: intake answers at once with where the request
stands. Position = open requests accepted before it; expected time = the pipeline's own time (the
fastest 2% of the last 500 stamps, accepted to completed) + position / the tier's pace: stamps
finished per busy second in the last ``window``, or, before the window has seen one finish (a
surge's first seconds), the pace the last 500 stamps kept when the tier was busy. The open count
comes from the stamping schema; the window's rate from the stream (faust windows over
``stamp.events``, ``throughput.py``) when this process counts some of its partitions, else from a
count in the schema. All are cached for a second, so a surge of intake calls costs a few queries
per second, not one per call.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass

import asyncpg

from services.kernel import failures
from services.stamping.metrics import QUEUE_DEPTH
from services.stamping.throughput import Throughput

_OPEN = "SELECT count(*) FROM requests WHERE status IN ('queued', 'reserved', 'stamping', 'signed')"
# From the last 500 finished stamps: the pipeline's own time (the fastest 2%, accepted to completed:
# in a surge most waited in the queue, the first few did not), and the tier's pace when busy (stamps
# per second that saw one finish), which stands in for the window's rate until the window has
# counted a completion (a surge's first seconds).
_HISTORY = """
WITH recent AS (SELECT status, accepted_at, finished_at FROM requests WHERE status IN ('completed', 'failed')
                 ORDER BY finished_at DESC LIMIT 500)
SELECT extract(epoch FROM percentile_disc(0.02) WITHIN GROUP (ORDER BY finished_at - accepted_at)
                          FILTER (WHERE status = 'completed')) AS base_s,
       count(*)::float8 / greatest(1, count(DISTINCT date_trunc('second', finished_at))) AS pace
  FROM recent
"""

# before any completion was seen, assume this many seconds per stamp per the whole tier
COLD_SECONDS_PER_STAMP = 0.05


@dataclass(frozen=True)
class QueueFacts:
    open_requests: int
    per_second: float
    base_s: float = 0.0       # the pipeline's own time for a stamp with nothing ahead of it

    def eta_seconds(self, position: int) -> float:
        rate = self.per_second if self.per_second > 0 else 1 / COLD_SECONDS_PER_STAMP
        return round(self.base_s + position / rate, 1)


class QueueView:
    def __init__(self, pool: asyncpg.Pool, window_s: float, throughput: Throughput | None = None) -> None:
        self._pool = pool
        self._window_s = window_s
        self._throughput = throughput
        self._cached: tuple[float, QueueFacts] | None = None

    async def facts(self) -> QueueFacts | None:
        now = time.monotonic()
        if self._cached and now - self._cached[0] < 1.0:
            return self._cached[1]
        rates = self._throughput.rates() if self._throughput else None
        try:
            history = await asyncio.wait_for(self._pool.fetchrow(_HISTORY), 0.5)
            base_s, pace = float(history["base_s"] or 0.0), float(history["pace"] or 0.0)
            if rates is not None and rates.known:
                open_requests = await asyncio.wait_for(self._pool.fetchval(_OPEN), 0.5)
                per_second = rates.rate_per_s
            else:
                row = await asyncio.wait_for(self._pool.fetchrow(
                    f"SELECT ({_OPEN}) AS open, (SELECT count(*) FROM requests WHERE status IN "
                    "('completed', 'failed') AND finished_at > now() - make_interval(secs => $1)) AS recent",
                    self._window_s), 0.5)
                open_requests, per_second = row["open"], row["recent"] / self._window_s
            if per_second <= 0:
                per_second = pace      # nothing finished in the window yet: the pace the tier last kept
        except Exception as exc:  # noqa: BLE001 - no database: no position, intake still answers
            if failures.classify(exc).waits:
                return None
            raise
        facts = QueueFacts(open_requests, per_second, base_s)
        QUEUE_DEPTH.set(facts.open_requests)
        self._cached = (now, facts)
        return facts

    async def position_of(self, accepted_at: dt.datetime) -> int | None:
        try:
            return await asyncio.wait_for(self._pool.fetchval(
                "SELECT count(*) FROM requests WHERE status IN ('queued', 'reserved', 'stamping', 'signed') "
                "AND accepted_at <= $1", accepted_at), 0.5)
        except Exception as exc:  # noqa: BLE001
            if failures.classify(exc).waits:
                return None
            raise
