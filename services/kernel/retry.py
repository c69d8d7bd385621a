"""Durable delayed retry: the one backoff mechanism of every service.

A transient failure of one record (a TSA that did not answer, a webhook endpoint that is down) is
not waited out in the consumer, which would block the partition behind it. The handler instead
writes the record to publish again, with a due time, into its outbox in the same transaction that
records the attempt; the outbox relay publishes it to the retry topic when it falls due. A crash
loses nothing: the due row is in PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

import asyncpg

from services.kernel import outbox
from services.kernel.events import Outgoing


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter": a random delay in [ceiling/2, ceiling].

    Jitter spreads a thundering herd; keeping half the ceiling as a floor keeps the gaps between
    attempts growing (full jitter, [0, ceiling], would not).
    """

    base_s: float = 1.0
    factor: float = 2.0
    max_s: float = 3600.0
    jitter: bool = True

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt`` (1 = the first retry)."""
        ceiling = min(self.max_s, self.base_s * self.factor ** max(0, attempt - 1))
        if not self.jitter:
            return ceiling
        r = (rng or random).random()
        return ceiling / 2 + r * ceiling / 2


async def schedule(conn: asyncpg.Connection, record: Outgoing, delay_s: float) -> dt.datetime:
    """Publish ``record`` again after ``delay_s``; runs inside the caller's transaction."""
    due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay_s)
    await outbox.add(conn, [record], available_at=due)
    return due
