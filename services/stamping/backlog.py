"""The stamping backlog as gauges: open requests and the oldest one's age, by channel and status, and the
overall depth (``bubuh_stamp_queue_depth_requests``, their sum; dashboards and alerts read the max over
processes, and the API processes leave it at 0).

This reading runs on its own timer in the workers, so a dashboard sees where requests wait (the status
names the tier: queued on quota, reserved / stamping on the workers, signed on the ledger's commit) and
for whom, also when no intake call comes. One grouped query over the ``requests_open`` partial index
every ``interval_s`` (5 s): it reads every open request (about 150 ms at 23,000 open, most of it heap
visits: the rows are hot), so it runs in one place: not in every API process every second (the depth, until
5 December), and not in every stamping member either: the member that holds the tier's backlog lock
(``Leadership``) reads it, the others stand by with their gauges at 0. A member that finds another
leading sets its gauges back to 0 (``clear``, on standing by), so the max over processes does not keep a
former leader's figure once the reading has moved: at most until that member's next try of the lock
(``BUBUH_LEADER_RETRY_S``, or its reconnection pause of up to 5 s). A leader that loses its lock's
connection (PostgreSQL away, a failover) keeps its last figures meanwhile: the queue is still there,
and an alert on a depth with no completions should keep firing while the database is away.
Every registered channel (the channel view) has its series in every status, at 0 while it has nothing
waiting there: a drained queue reads 0, and the label stays bounded by the registered channels.
"""

from __future__ import annotations

import asyncio

import asyncpg

from services.kernel.channels import ChannelView
from services.kernel.metrics import set_snapshot
from services.kernel.waiting import every
from services.stamping.metrics import OLDEST_OPEN_SECONDS, OPEN_REQUESTS, QUEUE_DEPTH

STATUSES = ("queued", "reserved", "stamping", "signed")
_OPEN = """
SELECT channel_id, status, count(*) AS open, extract(epoch FROM now() - min(accepted_at)) AS oldest_s
  FROM requests WHERE status IN ('queued', 'reserved', 'stamping', 'signed')
 GROUP BY channel_id, status
"""


class Backlog:
    def __init__(self, pool: asyncpg.Pool, channels: ChannelView, interval_s: float = 5.0) -> None:
        self._pool = pool
        self._channels = channels
        self._interval_s = interval_s
        self._shown: set[tuple[str, ...]] = set()
        self._shown_age: set[tuple[str, ...]] = set()

    async def read(self) -> None:
        rows = await asyncio.wait_for(self._pool.fetch(_OPEN), 5)
        none = {(c.channel_id, status): 0.0 for c in self._channels.all() for status in STATUSES}
        set_snapshot(OPEN_REQUESTS, none | {(r["channel_id"], r["status"]): r["open"] for r in rows}, self._shown)
        set_snapshot(OLDEST_OPEN_SECONDS, none | {(r["channel_id"], r["status"]): max(0.0, float(r["oldest_s"]))
                                                  for r in rows}, self._shown_age)
        QUEUE_DEPTH.set(sum(r["open"] for r in rows))

    def clear(self) -> None:
        """Every series this reading showed back to 0: another member reads the backlog now (or none)."""
        set_snapshot(OPEN_REQUESTS, {}, self._shown)
        set_snapshot(OLDEST_OPEN_SECONDS, {}, self._shown_age)
        QUEUE_DEPTH.set(0)

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self._interval_s, self.read, "stamping backlog reading")
