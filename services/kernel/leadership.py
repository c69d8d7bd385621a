"""One leader among a tier's members: a PostgreSQL session advisory lock on a connection of its own.

Work that must be done by one process at a time (an outbox's relay: it publishes each key's events in
the order they were written) runs in whichever member holds the lock. The others stand by: they try
the lock every ``BUBUH_LEADER_RETRY_S`` (1 s) with one statement on their own connection, and do
nothing else, so a second member adds no wake-ups, no polls and no empty transactions to the work.
The lock is the session's: a leader that dies (SIGKILL, its host gone) loses its connection and with
it the lock, and a standby takes over within that time. A leader whose connection breaks stops its
work (``until`` is set) at its next check of the connection, as often; work that must never overlap,
even in that window, guards each step as well (the relay takes a transaction-scoped lock around each
publish: ``outbox.Relay.publish_due``).

``pg_try_advisory_lock``, never the blocking form: a standby waiting on the lock would be a lock wait
that ``log_lock_waits`` reports every ``deadlock_timeout`` (issue 12's check: none over 50 ms).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

from services.kernel import database, logs
from services.kernel.metrics import LEADING
from services.kernel.settings import Settings
from services.kernel.waiting import Pause, sleep_or_stop

log = logs.get(__name__)


class Leadership:
    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self.name = name
        self._every_s = settings.leader_retry_s     # a standby's tries, and the leader's checks
        self.leading = asyncio.Event()      # set while this process holds the lock and its work runs
        LEADING.labels(name).set(0)

    async def lead(self, stop: asyncio.Event, work: Callable[[asyncio.Event], Awaitable[None]],
                   on_standby: Callable[[], None] | None = None) -> None:
        """Until ``stop``: take the lock, then run ``work(until)`` while it is held. ``until`` is set on
        ``stop`` or when the lock's connection is lost, and ``work`` returns when it is; then the lock is
        sought again. PostgreSQL away: a warning, and the next attempt after a growing pause.
        ``on_standby`` is called each time this member finds another leading (a former leader hands
        over what it showed: its gauges, say)."""
        pause = Pause()
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncio.wait_for(database.connect(self._settings), 5)
                pause.reset()
                if not await self._acquire(conn, stop, on_standby):
                    return
                await self._hold(conn, stop, work)
            except Exception as exc:  # noqa: BLE001 - PostgreSQL away or the lock's connection lost
                log.warning("leadership lost or not reachable", lock=self.name, error=repr(exc))
                await sleep_or_stop(stop, pause.next())
            finally:
                if conn is not None:
                    await database.close_quietly(conn)

    async def _acquire(self, conn: asyncpg.Connection, stop: asyncio.Event,
                       on_standby: Callable[[], None] | None = None) -> bool:
        """Try the lock every ``BUBUH_LEADER_RETRY_S`` until it is ours (True) or ``stop`` (False)."""
        standing_by = False
        while not stop.is_set():
            if await asyncio.wait_for(conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", self.name), 5):
                log.info("leading", lock=self.name, took_over=standing_by)
                return True
            if not standing_by:
                log.info("standing by: another member leads", lock=self.name)
                standing_by = True
                if on_standby is not None:
                    on_standby()
            await sleep_or_stop(stop, self._every_s)
        return False

    async def _hold(self, conn: asyncpg.Connection, stop: asyncio.Event,
                    work: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        until = asyncio.Event()
        working = asyncio.create_task(work(until), name=f"leading-{self.name}")
        self.leading.set()
        LEADING.labels(self.name).set(1)
        try:
            while not working.done() and not await sleep_or_stop(stop, self._every_s):
                await asyncio.wait_for(conn.execute("SELECT 1"), 5)     # raises once the connection is lost
        finally:
            until.set()
            self.leading.clear()
            LEADING.labels(self.name).set(0)
            try:
                await working
            except Exception as exc:  # noqa: BLE001 - the lock is given up and sought again
                log.error("leader's work failed", lock=self.name, error=repr(exc))

