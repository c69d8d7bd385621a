"""The leased due-time table worker: one loop that claims due rows and hands each to its sender.

Webhooks (``deliveries``, ``webhook_sender.py``) and emails (``emails``, ``email_sender.py``) share
one durable schedule shape: a row is due when ``next_attempt_at`` has passed. Nothing sleeps per
row; a failed attempt moves the row's due time (the sender's exponential backoff with equal jitter)
until its horizon, after which it is dead-lettered (``DeliveryAbandoned``, ``deadletter.py``).

Claims are leases (``leased_until``, ``lease_token``), not open transactions: the attempt runs
outside any transaction, and a killed process's leases simply expire, after which any instance
retries the row. A result is recorded only if the lease is still ours (the API may have reset the
row meanwhile). Delivery is therefore at least once, and a duplicate carries the same event id.

What differs per sender (which rows to claim, how to attempt one, what to record) is the
``Sender``'s; the loop, the horizon sweep, the recording with its outage retries, the dead-letter
entry and the hand-back of leases on stop are this module's, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.kernel import errors, failures, logs
from services.kernel.errors import DELIVERY_EXPIRED, ErrorCode
from services.kernel.retry import Backoff
from services.kernel.settings import Settings
from services.kernel.waiting import Pause, wait_any
from services.notification import deadletter

log = logs.get(__name__)

NOT_ATTEMPTED = "not attempted before the horizon"     # last_error of a row no attempt reached


@dataclass(frozen=True)
class Table:
    """A due-time table: its name, key column, status of a row done with, and its target (SQL)."""

    name: str             # deliveries | emails
    key: str              # delivery_id | email_id
    target: str           # an SQL expression for the dead-letter entry's ``url``

    def sql(self, template: str) -> str:
        return template.format(table=self.name, key=self.key, target=self.target)


_NEXT_DUE_IN = """
SELECT EXTRACT(EPOCH FROM (next_attempt_at - now()))::float8 FROM {table}
WHERE status = 'pending' AND next_attempt_at > now() ORDER BY next_attempt_at LIMIT 1
"""

_PAST_HORIZON = """
UPDATE {table} SET status = 'dead', leased_until = NULL, lease_token = NULL
WHERE {key} IN (
    SELECT {key} FROM {table}
    WHERE status = 'pending' AND horizon_at <= now() AND (leased_until IS NULL OR leased_until < now())
    ORDER BY horizon_at LIMIT 200 FOR UPDATE SKIP LOCKED)
RETURNING {key} AS key, channel_id, event_id, event_type, {target} AS target, attempts, last_error,
          first_attempt_at, last_attempt_at, horizon_at
"""

# a row due again now, attempts counted afresh, with a new horizon ($2 seconds): a redelivery a
# channel asks for, or a replay of an abandoned one (deliveries.py)
DUE_AGAIN = """
UPDATE {table} SET status = 'pending', next_attempt_at = now(), attempts = 0,
       horizon_at = now() + make_interval(secs => $2), leased_until = NULL, lease_token = NULL
WHERE {key} = $1"""

_HAND_BACK = """
UPDATE {table} SET leased_until = NULL, lease_token = NULL
WHERE {key} = ANY($1::text[]) AND lease_token = ANY($2::text[])
"""


@dataclass(frozen=True)
class Claimed:
    """A row under our lease. ``row`` holds the sender's own columns."""

    key: str
    channel_id: str
    event_id: str
    event_type: str
    attempts: int          # before this attempt
    horizon_at: dt.datetime
    lease_token: str
    row: Any


@dataclass(frozen=True)
class Outcome:
    """One attempt's result. What went wrong is a catalogued code and our own wording (``why``),
    never text of the target's answer: ``error`` is shown to the channel (GET /v1/deliveries,
    dead-letter entries)."""

    ok: bool
    code: ErrorCode | None     # None when ok
    why: str
    started_at: dt.datetime
    target: str                # where it went: the URL, or mailto:<recipient>
    extra: Any = None          # the sender's own (status code, metric label, ...)

    @property
    def error(self) -> str:
        return self.code.text(self.why) if self.code is not None else ""


class Sender:
    """What one kind of notification adds to the worker. Defaults are no-ops."""

    name: str                # in logs and task names
    table: Table
    concurrency: int         # attempts in flight per instance
    lease_s: float           # must outlast an attempt
    backoff: Backoff

    async def open(self) -> None:
        """Before the first claim (an HTTP client, ...)."""

    async def close(self) -> None:
        """After the last attempt."""

    async def claim(self, conn: asyncpg.Connection, free: int, token: str) -> list[Claimed]:
        """Lease up to ``free`` due rows with ``token``."""
        raise NotImplementedError

    def started(self, claimed: Claimed) -> None:
        """An attempt of ``claimed`` starts (bookkeeping of the sender's own limits)."""

    def finished(self, claimed: Claimed) -> None:
        """The attempt of ``claimed`` is over (recorded or not)."""

    async def attempt(self, claimed: Claimed) -> Outcome:
        raise NotImplementedError

    async def record(self, conn: asyncpg.Connection, claimed: Claimed, outcome: Outcome, delay_s: float):
        """Record the attempt if the lease is still ours; the row's new (status, attempts,
        first_attempt_at, horizon_at), or None when the lease was lost."""
        raise NotImplementedError

    def recorded(self, claimed: Claimed, outcome: Outcome, row, delay_s: float) -> None:
        """After the recording committed: metrics and logs."""

    def abandoned_at_horizon(self, row) -> None:
        """A row dead-lettered by the horizon sweep (after the commit): metrics and logs."""

    def wakes_in(self) -> float | None:
        """Seconds until the sender could claim what it now may not (an open circuit's cool-down)."""
        return None


class DueWorker:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, sender: Sender,
                 wake: asyncio.Event | None = None) -> None:
        self._pool = pool
        self._s = settings
        self.sender = sender
        self._wake = wake or asyncio.Event()
        self._tasks: dict[asyncio.Task, Claimed] = {}
        self._last_sweep = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self, stop: asyncio.Event) -> None:
        sender = self.sender
        await sender.open()
        pause = Pause()
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    claimed = await self.start_due()
                    if time.monotonic() - self._last_sweep >= 1.0:
                        await self.abandon_past_horizon()
                        self._last_sweep = time.monotonic()
                    pause.reset()
                    if claimed and self.in_flight < sender.concurrency:
                        continue        # maybe more due work behind what was claimed
                    sleep = await self._sleep_for()
                except Exception as exc:  # noqa: BLE001 - PostgreSQL away: in-flight work goes on, retry
                    log.warning(f"{sender.name} worker waiting", error=repr(exc),
                                outage=failures.classify(exc).waits)
                    sleep = pause.next()
                await wait_any(stop, self._wake, sleep)
        finally:
            await self._drain()
            await sender.close()

    async def _sleep_for(self) -> float:
        """Until the next row falls due, the sender may claim again, or the idle poll."""
        sleep = self._s.notification_idle_poll_s
        if self.in_flight < self.sender.concurrency:
            async with self._pool.acquire() as conn:
                due_in = await conn.fetchval(self.sender.table.sql(_NEXT_DUE_IN))
            if due_in is not None:
                sleep = min(sleep, due_in)
        wakes_in = self.sender.wakes_in()
        if wakes_in is not None:
            sleep = min(sleep, wakes_in)
        return max(0.005, sleep)

    async def start_due(self) -> int:
        """Claim what may be attempted now and start attempting it; returns how many were claimed."""
        free = self.sender.concurrency - self.in_flight
        if free <= 0:
            return 0
        token = uuid.uuid4().hex
        async with self._pool.acquire() as conn:
            claimed = await self.sender.claim(conn, free, token)
        for c in claimed:
            self.sender.started(c)
            task = asyncio.create_task(self._attempt(c), name=f"{self.sender.name}-{c.key}")
            self._tasks[task] = c
        return len(claimed)

    async def _attempt(self, claimed: Claimed) -> None:
        try:
            outcome = await self.sender.attempt(claimed)
            await self._record(claimed, outcome)
        except Exception:  # noqa: BLE001 - never lose the slot; the lease expires and the row is retried
            log.exception(f"{self.sender.name} attempt crashed", key=claimed.key)
        finally:
            self.sender.finished(claimed)
            self._tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._wake.set()

    # --- recording -----------------------------------------------------------------------------
    async def _record(self, claimed: Claimed, outcome: Outcome) -> None:
        delay = 0.0 if outcome.ok else self.sender.backoff.delay(claimed.attempts + 1)
        for pause in (0.5, 1.0, 2.0, None):
            try:
                await self._record_once(claimed, outcome, delay)
                return
            except Exception as exc:  # noqa: BLE001 - outage: retry briefly; anything else: give up
                if pause is None or not failures.classify(exc).waits:
                    # the lease expires and the row is attempted again: at least once, same event id
                    log.warning(f"could not record a {self.sender.name} attempt", key=claimed.key,
                                error=repr(exc))
                    return
                await asyncio.sleep(pause)

    async def _record_once(self, claimed: Claimed, outcome: Outcome, delay: float) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self.sender.record(conn, claimed, outcome, delay)
            if row is not None and row["status"] == "dead":
                assert outcome.code is not None       # only a failed attempt ends a row dead
                await deadletter.abandon(conn, self._s, outcome.code, delivery_id=claimed.key,
                                         channel_id=claimed.channel_id, event_id=claimed.event_id,
                                         event_type=claimed.event_type,
                                         url=outcome.target, attempts=row["attempts"], last_error=outcome.error,
                                         first_attempt_at=row["first_attempt_at"],
                                         last_attempt_at=outcome.started_at, horizon_at=row["horizon_at"])
        self.sender.recorded(claimed, outcome, row, delay)

    async def abandon_past_horizon(self) -> int:
        """Dead-letter pending rows past their horizon that no attempt reached (open circuit, no URL)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(self.sender.table.sql(_PAST_HORIZON))
            for r in rows:
                # the last attempt's code; none when no attempt was made
                code = errors.code_of(r["last_error"] or "") or DELIVERY_EXPIRED
                await deadletter.abandon(conn, self._s, code, delivery_id=r["key"], channel_id=r["channel_id"],
                                         event_id=r["event_id"], event_type=r["event_type"], url=r["target"],
                                         attempts=r["attempts"], last_error=r["last_error"] or NOT_ATTEMPTED,
                                         first_attempt_at=r["first_attempt_at"],
                                         last_attempt_at=r["last_attempt_at"], horizon_at=r["horizon_at"])
        for r in rows:
            self.sender.abandoned_at_horizon(r)
        return len(rows)

    async def _drain(self, grace_s: float = 3.0) -> None:
        """On stop: let attempts in flight finish briefly, then cancel them and hand their rows back."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        left = dict(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
            with contextlib.suppress(Exception):
                async with self._pool.acquire() as conn:
                    await conn.execute(self.sender.table.sql(_HAND_BACK), [c.key for c in left.values()],
                                       list({c.lease_token for c in left.values()}))
