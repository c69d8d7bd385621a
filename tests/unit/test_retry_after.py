"""The Retry-After of a route's 503s spreads the callers it turned away over the time the route needs
to take them (services/kernel/retry_after.py), instead of bringing them all back a second later."""

from __future__ import annotations

import random
import statistics
from collections import Counter

from services.kernel.retry_after import MAX_S, Spread


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def door(completed_per_s: int, seconds: int, clock: Clock) -> Spread:
    spread = Spread(clock, random.Random(7))
    for _ in range(seconds):
        for _ in range(completed_per_s):
            spread.completed()
        clock.now += 1
    return spread


def test_a_caller_refused_alone_comes_back_in_a_second() -> None:
    clock = Clock()
    spread = door(20, 10, clock)
    assert [spread.refused() for _ in range(5)] == [1] * 5


def test_many_refused_come_back_spread_over_what_the_door_takes() -> None:
    clock = Clock()
    spread = door(20, 10, clock)
    waits = []
    for i in range(200):                     # 200 turned away within a second, the door doing 20/s
        if i % 10 == 0:
            spread.completed()
        waits.append(spread.refused())
        clock.now += 0.005
    last = waits[-50:]
    assert max(last) <= 10                   # 200 callers / 20 a second
    assert min(last) == 1 and max(last) >= 8, last
    assert 3.5 <= statistics.mean(last) <= 7.5, last
    # not all back in the same second (a fixed Retry-After: 1 brought all 200)
    assert max(Counter(waits).values()) <= len(waits) / 3, Counter(waits)


def test_a_stalled_door_spreads_by_the_rate_it_had_not_by_nothing() -> None:
    """The broker away: nothing completes, yet once it is back the door takes what it took before."""
    clock = Clock()
    spread = door(20, 50, clock)
    clock.now += 5                            # five seconds without a completion
    waits = [spread.refused() for _ in range(100)]
    assert max(waits) <= 6                    # 100 / (1000 a minute / 60) -> 6, not 30
    assert max(waits) >= 4


def test_never_past_the_clients_budget_and_forgotten_after_a_while() -> None:
    clock = Clock()
    spread = Spread(clock, random.Random(3))
    waits = [spread.refused() for _ in range(1000)]
    assert max(waits) == MAX_S and min(waits) == 1
    clock.now += 10                           # those refusals are old: a new caller alone waits a second
    assert spread.refused() == 1
