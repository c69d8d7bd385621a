"""Waiting on several things at once, the way every long-running task of a service does, and how
long a loop waits after a failure before it tries again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from services.kernel import logs

log = logs.get(__name__)


class Pause:
    """A loop's wait after a failure (PostgreSQL or Kafka away, a child that did not start): 0.2 s,
    doubling to 5 s while failures go on; ``reset()`` after a success starts it over. In process
    only: a record's retry that must survive a crash is ``kernel/retry.py``'s durable one."""

    FIRST_S, MAX_S = 0.2, 5.0

    def __init__(self, first_s: float = FIRST_S, max_s: float = MAX_S) -> None:
        self.first_s, self.max_s = first_s, max_s
        self._next = first_s

    def next(self) -> float:
        """The length of this pause; the next one doubles."""
        now, self._next = self._next, min(self._next * 2, self.max_s)
        return now

    def reset(self) -> None:
        self._next = self.first_s


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` comes first; True when stopped."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def every(stop: asyncio.Event, interval_s: float, step: Callable[[], Awaitable[None]], what: str) -> None:
    """``step()`` now and then every ``interval_s`` until ``stop``: a periodic reading (gauges from
    PostgreSQL, housekeeping). A failure (a dependency away) is one warning, ``<what> skipped``, and
    the next round comes anyway; gauges keep their last reading meanwhile."""
    while not stop.is_set():
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning(f"{what} skipped", error=repr(exc))
        await sleep_or_stop(stop, interval_s)


async def wait_any(stop: asyncio.Event, other: asyncio.Event, timeout: float) -> None:
    """Return when ``stop`` or ``other`` is set, or after ``timeout`` seconds."""
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(other.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def wait_or_stop(event: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait for ``event`` unless ``stop`` comes first; True when ``event`` is set."""
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return event.is_set()
