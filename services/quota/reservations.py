"""Ledger health as a gauge: the units held by open reservations.

Read from ``open_reservations`` (one row per pending transfer of one unit) on a timer, off the money
path: a pending count that only grows means commits and releases do not arrive (stamping stalled, or
the ledger refusing them).
"""

from __future__ import annotations

import asyncio

import asyncpg

from services.kernel.waiting import every
from services.quota.metrics import PENDING_UNITS

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
        await every(stop, self._interval_s, self.read, "reservation gauges")
