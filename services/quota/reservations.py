"""Ledger health as a gauge: the units held by open reservations.

Read from ``open_reservations`` (one row per pending transfer of one unit) on a timer, off the money
path: a pending count that only grows means commits and releases do not arrive (stamping stalled, or
the ledger refusing them).
"""

from __future__ import annotations

import asyncio

import asyncpg

from services.kernel import logs
from services.kernel.waiting import sleep_or_stop
from services.quota.metrics import PENDING_UNITS

log = logs.get(__name__)

_PENDING = """
SELECT count(*) AS units FROM open_reservations
"""


class ReservationGauges:
    def __init__(self, pool: asyncpg.Pool, interval_s: float = 2.0) -> None:
        self._pool = pool
        self._interval_s = interval_s

    async def read(self) -> None:
        row = await asyncio.wait_for(self._pool.fetchrow(_PENDING), 5)
        PENDING_UNITS.set(row["units"])

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.read()
            except Exception as exc:  # noqa: BLE001 - PostgreSQL away: the gauges keep their last reading
                log.warning("reservation gauges skipped", error=repr(exc))
            await sleep_or_stop(stop, self._interval_s)
