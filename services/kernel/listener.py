"""PostgreSQL LISTEN/NOTIFY as a wake-up: a commit of new work (NOTIFY) wakes the workers that do it.

One LISTEN connection per ``Listener``, of its own (not from a pool: it lives as long as the
process). Nothing may depend on it: its subscribers also poll, so a lost notification (the
connection was down) costs latency, never work. After every (re)connect it wakes everyone once,
for whatever was committed while nobody listened. The sending side is ``database.notify``: a
transaction owes its wake-ups, and its connection sends them after the commit; to a listener that is
the only one of its channel and runs in the sending process (``alone``), as a call instead.
"""

from __future__ import annotations

import asyncio

import asyncpg

from services.kernel import database, logs
from services.kernel.settings import Settings
from services.kernel.waiting import Pause, sleep_or_stop

log = logs.get(__name__)

HEALTH_CHECK_S = 5.0      # a dead socket shows at the next check


class Listener:
    def __init__(self, settings: Settings, channel: str, *, alone: bool = False) -> None:
        """``alone``: no other process listens to ``channel`` while this one runs (an outbox's relay leader):
        wake-ups sent from this process then call ``poke`` instead of a NOTIFY (``database.hear_alone``)."""
        self._settings = settings
        self.channel = channel
        self._alone = alone
        self._events: list[asyncio.Event] = []

    def subscribe(self) -> asyncio.Event:
        """An event set on every notification; the subscriber clears it before it looks for work."""
        event = asyncio.Event()
        self._events.append(event)
        return event

    def poke(self, *_args) -> None:
        for event in self._events:
            event.set()

    async def run(self, stop: asyncio.Event) -> None:
        undo = database.hear_alone(self.channel, self.poke) if self._alone else None
        try:
            await self._listen(stop)
        finally:
            if undo is not None:
                undo()

    async def _listen(self, stop: asyncio.Event) -> None:
        pause = Pause()
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncio.wait_for(database.connect(self._settings), 5)
                await conn.add_listener(self.channel, self.poke)
                self.poke()            # whatever was committed while nobody listened
                pause.reset()
                while not await sleep_or_stop(stop, HEALTH_CHECK_S):
                    await asyncio.wait_for(conn.execute("SELECT 1"), 5)
            except Exception as exc:  # noqa: BLE001 - PostgreSQL away: polling covers; reconnect later
                log.warning("listener reconnecting", channel=self.channel, error=repr(exc))
                await sleep_or_stop(stop, pause.next())
            finally:
                if conn is not None:
                    await database.close_quietly(conn)

