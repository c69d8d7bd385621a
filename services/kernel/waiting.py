"""Waiting on several things at once, the way every long-running task of a service does."""

from __future__ import annotations

import asyncio


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
