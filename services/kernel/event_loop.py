"""The event loop a long-running Bubuh process runs on.

``uvloop`` (libuv, from the authors of asyncpg) by default: every platform process spends most of its
own CPU in the loop itself (``select``, socket writes, callbacks) rather than in our code, and uvloop
does that work in C. ``BUBUH_EVENT_LOOP=asyncio`` runs the standard library's loop instead, for a
platform without uvloop's wheels or to rule the loop out while debugging.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any

from services.kernel.errors import ConfigError


def factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("BUBUH_EVENT_LOOP=uvloop but uvloop is not installed "
                              "(pip install uvloop, or BUBUH_EVENT_LOOP=asyncio)") from None
        return uvloop.new_event_loop
    raise ConfigError(f"BUBUH_EVENT_LOOP={name!r}: expected uvloop or asyncio")


def tune_gc(gen0_threshold: int) -> None:
    """Fewer, not weaker, collections: what start-up loaded (modules, settings, clients) is frozen out of
    the cyclic collector's scans, and the youngest generation collects every ``gen0_threshold``
    allocations instead of 700. A batch of records allocates thousands of objects that die with it;
    at 700 the collector ran many times per batch and scanned every live one each time. Reference
    counting still frees everything at once; only cycles wait a little longer."""
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


def run(main: Coroutine[Any, Any, Any], loop: str) -> Any:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=factory(loop)) as runner:
        return runner.run(main)
