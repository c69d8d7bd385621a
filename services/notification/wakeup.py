"""One LISTEN connection per process: a commit of new work (NOTIFY) wakes the dispatchers at once.

Nothing depends on it: the dispatchers also wake at the next due time and at least every
``notification_idle_poll_s``, so a lost notification costs latency, never a delivery.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from services.kernel import database, logs
from services.kernel.settings import Settings
from services.kernel.waiting import Pause, sleep_or_stop
from services.notification.intake import wake_channel

log = logs.get(__name__)


class Wakeup:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.channel = wake_channel(settings)
        self._events: list[asyncio.Event] = []

    def subscribe(self) -> asyncio.Event:
        event = asyncio.Event()
        self._events.append(event)
        return event

    def poke(self, *_args) -> None:
        for event in self._events:
            event.set()

    async def run(self, stop: asyncio.Event) -> None:
        pause = Pause()
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncio.wait_for(database.connect(self._settings), 5)
                await conn.add_listener(self.channel, self.poke)
                self.poke()            # whatever was committed while nobody listened
                pause.reset()
                while not await sleep_or_stop(stop, 5):
                    await asyncio.wait_for(conn.execute("SELECT 1"), 5)   # a dead socket shows here
            except Exception as exc:  # noqa: BLE001 - PostgreSQL away: polling covers; reconnect later
                log.warning("notification listener reconnecting", error=repr(exc))
                await sleep_or_stop(stop, pause.next())
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
