"""The Retry-After of a route's 503s spreads the callers it turned away over the time the route needs
to take them (services/kernel/retry_after.py), instead of bringing them all back a second later; a
caller that can come back as the same request is given its place in line, and a ticket that says so."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest

from services.kernel.retry_after import MAX_S, TICKET_LATE_S, Spread, Tickets


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


def test_callers_booked_come_back_in_the_order_they_were_turned_away_at_the_doors_rate() -> None:
    """A spread is a lottery: a caller refused again and again can wait past its budget while later ones
    get in. Booked, each caller turned away is given the next second of the door's completions after
    the last one booked: first turned away, first taken."""
    clock = Clock()
    spread = door(20, 10, clock)
    assert not spread.booked_ahead()
    waits = []
    for _ in range(100):                     # 100 turned away within half a second, the door doing 20/s
        waits.append(spread.book())
        clock.now += 0.005
    assert waits == sorted(waits) and waits[0] >= 1.0
    assert 5.0 <= waits[-1] <= 7.0           # 100 callers / 20 a second after the first second
    assert spread.booked_ahead()
    clock.now += 10
    assert not spread.booked_ahead()
    assert spread.book() == 1.0              # the line is gone: the next one comes back in a second


def test_a_line_longer_than_a_clients_budget_is_not_promised() -> None:
    clock = Clock()
    spread = door(1, 60, clock)
    waits = [spread.book() for _ in range(100)]
    assert max(waits) == MAX_S and waits.count(MAX_S) >= 60


def test_a_ticket_holds_for_its_request_its_caller_and_its_route_only() -> None:
    wall = Clock()
    key = bytes(range(32))
    tickets = Tickets(key, wall)
    ticket = tickets.issue("/v1/stamps", b"key-1|caller", 5.0)
    assert tickets.due_in("/v1/stamps", b"key-1|caller", ticket) == pytest.approx(5.0)
    assert Tickets(key, wall).due_in("/v1/stamps", b"key-1|caller", ticket) == pytest.approx(5.0)  # another process
    at, mac = ticket.split(".")
    for other in (tickets.due_in("/v1/stamps", b"key-2|caller", ticket),            # another request
                  tickets.due_in("/v1/stamps", b"key-1|other", ticket),             # another caller
                  tickets.due_in("/v1/purchases", b"key-1|caller", ticket),         # another route
                  tickets.due_in("/v1/stamps", b"key-1|caller", f"{int(at) - 4000}.{mac}"),  # an earlier time
                  Tickets(bytes(32), wall).due_in("/v1/stamps", b"key-1|caller", ticket),    # another platform
                  *(tickets.due_in("/v1/stamps", b"key-1|caller", t)
                    for t in ("", ".", "x.y", f"{at}.", f"-5.{mac}", "9" * 40 + f".{mac}", f"{at}.{mac}A"))):
        assert other is None
    wall.now += 5 + TICKET_LATE_S - 1
    assert tickets.due_in("/v1/stamps", b"key-1|caller", ticket) == pytest.approx(1 - TICKET_LATE_S)
    wall.now += 2                            # expired: its holder is a newcomer again
    assert tickets.due_in("/v1/stamps", b"key-1|caller", ticket) is None
