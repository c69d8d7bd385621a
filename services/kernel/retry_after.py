"""How long a caller the front door turns away should wait: the ``Retry-After`` of a route's 503s.

A fixed ``Retry-After: 1`` brings every refused caller back at once, a second later, to be refused
again. In the deadline-day run (README, 1 December) the front door never recovered from the broker
restart: the callers refused during the outage came back together on top of the new arrivals, and
kept coming back. ``Spread`` spreads them instead over the time the door needs to take them:

    upper = refused in the last ``REFUSED_WINDOW_S`` / requests the door completes per second,

each refused caller drawn at random between 1 s and ``upper`` (at most ``MAX_S``), so they come back
at about the rate the door completes requests rather than together. The rate is the larger of the
last few seconds' and the last minute's (at least 1 a second): while the door is stalled (the broker
away) it completes nothing, and the rate it will have once the broker is back is the one it had
before. One ``Spread`` per route with an admission bound, in each API process.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable

REFUSED_WINDOW_S = 5.0       # refused callers counted as still waiting to come back
RATE_WINDOW_S = 60.0         # the door's completions per second: over this, and over REFUSED_WINDOW_S
MAX_S = 30                   # a channel's client budget in the deadline day; beyond it nobody waits


class Spread:
    def __init__(self, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._completed: deque[list] = deque()     # [second, count], one per second with completions
        self._refused: deque[float] = deque()

    def completed(self) -> None:
        """A request of the route answered (not refused, not a 5xx)."""
        second = int(self._clock())
        if self._completed and self._completed[-1][0] == second:
            self._completed[-1][1] += 1
        else:
            self._completed.append([second, 1])

    def refused(self) -> int:
        """A caller turned away now: the seconds it should wait."""
        self._refused.append(self._clock())
        return self.retry_after()

    def retry_after(self) -> int:
        now = self._clock()
        while self._refused and self._refused[0] < now - REFUSED_WINDOW_S:
            self._refused.popleft()
        while self._completed and self._completed[0][0] < now - RATE_WINDOW_S:
            self._completed.popleft()
        recent = sum(n for second, n in self._completed if second >= now - REFUSED_WINDOW_S)
        rate = max(1.0, recent / REFUSED_WINDOW_S, sum(n for _, n in self._completed) / RATE_WINDOW_S)
        upper = min(MAX_S, max(1, math.ceil(len(self._refused) / rate)))
        return self._rng.randint(1, upper)
