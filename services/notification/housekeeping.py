"""The due-queue gauges and the retention sweep: every few seconds, cheap, never on the delivery path."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from services.kernel.channels import ChannelView
from services.kernel.metrics import set_snapshot
from services.kernel.settings import Settings
from services.kernel.waiting import every
from services.notification.metrics import CHANNEL_OLDEST_SECONDS, CHANNEL_PENDING, DUE, EMAILS_DUE, SCHEDULED

_COUNTS = """
SELECT
  (SELECT count(*) FROM deliveries WHERE status = 'pending' AND next_attempt_at <= now()
          AND (leased_until IS NULL OR leased_until < now())) AS due,
  (SELECT count(*) FROM deliveries WHERE status = 'pending') AS scheduled,
  (SELECT count(*) FROM emails WHERE status = 'pending' AND next_attempt_at <= now()
          AND (leased_until IS NULL OR leased_until < now())) AS emails_due
"""
_BY_CHANNEL = """
SELECT channel_id, count(*) AS pending, extract(epoch FROM now() - min(created_at)) AS oldest_s
  FROM deliveries WHERE status = 'pending' GROUP BY channel_id
"""


class Housekeeping:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, interval_s: float = 2.0,
                 retention_every_s: float = 300.0, channels: ChannelView | None = None) -> None:
        self._pool = pool
        self._channels = channels      # every registered channel's backlog shows, at 0 when empty
        self._s = settings
        self._interval_s = interval_s
        self._retention_every_s = retention_every_s
        self._shown: set[tuple[str, ...]] = set()
        self._shown_age: set[tuple[str, ...]] = set()
        self._last_retention = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self._interval_s, self.tick, "notification housekeeping")

    async def tick(self) -> None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(_COUNTS)
            DUE.set(row["due"])
            SCHEDULED.set(row["scheduled"])
            EMAILS_DUE.set(row["emails_due"])
            rows = await conn.fetch(_BY_CHANNEL)
            none = {(c.channel_id,): 0.0 for c in (self._channels.all() if self._channels else [])}
            set_snapshot(CHANNEL_PENDING, none | {(r["channel_id"],): r["pending"] for r in rows}, self._shown)
            set_snapshot(CHANNEL_OLDEST_SECONDS, none | {(r["channel_id"],): max(0.0, float(r["oldest_s"]))
                                                         for r in rows}, self._shown_age)
            if time.monotonic() - self._last_retention >= self._retention_every_s:
                await self.delete_old(conn)
                self._last_retention = time.monotonic()

    async def delete_old(self, conn: asyncpg.Connection) -> None:
        keep = self._s.notification_retention_s
        await conn.execute("DELETE FROM deliveries WHERE status <> 'pending' "
                           "AND created_at < now() - make_interval(secs => $1)", keep)
        await conn.execute("DELETE FROM emails WHERE status <> 'pending' "
                           "AND created_at < now() - make_interval(secs => $1)", keep)
