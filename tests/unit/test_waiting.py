"""kernel/waiting.py: the one in-process pause after a failure, and the stop-aware sleep."""

from __future__ import annotations

import asyncio
import time

from services.kernel.waiting import Pause, sleep_or_stop


def test_a_pause_doubles_to_its_ceiling_and_a_success_starts_it_over():
    pause = Pause()
    assert [pause.next() for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    pause.reset()
    assert pause.next() == 0.2
    small = Pause(first_s=1, max_s=3)
    assert [small.next() for _ in range(4)] == [1, 2, 3, 3]


async def test_sleep_or_stop_sleeps_or_returns_at_once_when_stopped():
    stop = asyncio.Event()
    started = time.monotonic()
    assert await sleep_or_stop(stop, 0.05) is False
    assert time.monotonic() - started >= 0.05
    asyncio.get_running_loop().call_later(0.05, stop.set)
    started = time.monotonic()
    assert await sleep_or_stop(stop, 30) is True
    assert time.monotonic() - started < 5
