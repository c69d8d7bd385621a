"""The pace a queue drains at when the door shares the tier's cores (``stamping/pace.py``): each second's
completions against the stamp requests the door accepted in it give the door's cost in the tier's stamps
(``k``), and the pace read over the latest backlogged seconds is forecast at the door's intake now, at
most the tier's own pace (a standing queue)."""

from __future__ import annotations

import pytest

from services.stamping.pace import (
    BURST_FLOOR,
    BURST_HOLDS_S,
    BURST_LEFT_S,
    BURST_SEEN_LEAST,
    BURST_SEEN_SECONDS,
    DOOR_COST_ONE_BOX,
    FIT_MIN_SECONDS,
    Second,
    TierPace,
)
from services.stamping.queue import QueueFacts

NOW = 10_000


def _busy(pace: TierPace, seconds: dict[int, tuple[int, int]], now: int = NOW) -> None:
    first = min(seconds)
    pace.record(first, first, now, ((at, Second(came, done, True)) for at, (came, done) in seconds.items()))


def _shared_box(idle: float = 120.0, k: float = 0.5, first: int = NOW - 40, last: int = NOW - 4):
    """A tier that signs ``idle`` stamps/s with the door idle and ``k`` fewer per request/s the door takes:
    the door's intake alternates between 40 and 120 a second (at 120 the tier signs 60: twice that, not past
    it, so no second of the line is a burst seen)."""
    return {at: (came, round(idle - k * came)) for at in range(first, last + 1)
            for came in [40 if at % 2 else 120]}


def test_the_doors_cost_is_fitted_from_the_backlogged_seconds():
    pace = TierPace()
    _busy(pace, _shared_box())
    assert pace.door_cost() == pytest.approx(0.5)
    # seconds without a backlog say what came, not what the tier could sign: not fitted
    pace.record(NOW - 100, NOW - 100, NOW, ((at, Second(came, 3, False)) for at, (came, _) in _shared_box().items()))
    assert pace.door_cost() == 0.0


def test_a_door_with_cores_of_its_own_costs_nothing_and_the_pace_is_the_one_read():
    pace = TierPace()
    _busy(pace, {at: (40 if at % 2 else 160, 70) for at in range(NOW - 40, NOW - 3)})
    assert pace.door_cost() == 0.0
    forecast = pace.forecast(NOW - 15, NOW, 3, 15)
    assert forecast.per_second == forecast.read == 70.0


def test_too_few_backlogged_seconds_fit_nothing():
    pace = TierPace()
    _busy(pace, _shared_box(first=NOW - FIT_MIN_SECONDS + 2))
    assert pace.door_cost() == 0.0
    assert pace.forecast(NOW - 15, NOW, 3, 15).per_second == pace.forecast(NOW - 15, NOW, 3, 15).read


def _first_fill(pace: TierPace) -> TierPace:
    """A first fill after a quiet spell (make surge-eta, 7 December 20:53, round 1): the span holds a
    calibration's 11 backlogged seconds (the tier at 50 a second, little coming) and the fill's first two
    seconds (the door taking 100 a second, the tier signing 30: fewer than a burst's pace is read from)."""
    seconds = {at: (10, 50) for at in range(NOW - 20, NOW - 9)}
    seconds.update({at: (100, 30) for at in range(NOW - 2, NOW)})
    _busy(pace, seconds)
    return pace


def test_until_fitted_the_door_costs_what_a_queue_of_its_box_is_built_with():
    """Counted as 0 until fitted, the first fill after a quiet spell was told no burst at all; where the door
    shares the tier's cores (queue.py builds that queue's pace with DOOR_COST_ONE_BOX), it is told one."""
    apart, one_box = _first_fill(TierPace()), _first_fill(TierPace(unfitted_cost=DOOR_COST_ONE_BOX))
    assert (apart.door_cost(), one_box.door_cost()) == (0.0, DOOR_COST_ONE_BOX)
    forecast = apart.forecast(NOW - 20, NOW, 3, 15, lately=100.0)
    assert (forecast.door_cost, forecast.burst_s) == (0.0, 0.0)
    forecast = one_box.forecast(NOW - 20, NOW, 3, 15, lately=100.0)
    assert forecast.door_cost == DOOR_COST_ONE_BOX and forecast.burst_s > 0
    assert forecast.burst_per_second < forecast.per_second
    # once fitted, the fit: a door with cores of its own costs nothing on either
    for pace in (TierPace(), TierPace(unfitted_cost=DOOR_COST_ONE_BOX)):
        _busy(pace, {at: (40 if at % 2 else 160, 70) for at in range(NOW - 40, NOW - 3)})
        assert pace.door_cost() == 0.0


def test_a_door_that_costs_nothing_tells_a_burst_at_the_pace_the_bursts_seen_kept():
    """No cost (a door apart, too few seconds to fit), but the span holds bursts in which the tier signed 30 a
    second: a burst at the door now is told at that pace; where the bursts seen signed as fast as the pace, none."""
    for done, slowed in [(30, True), (70, False)]:
        pace = TierPace()
        seconds = {at: (40 if at % 2 else 100, 70) for at in range(NOW - 40, NOW - 20)}
        seconds.update({at: (200, done) for at in range(NOW - 12, NOW - 8)})
        _busy(pace, seconds)
        forecast = pace.forecast(NOW - 30, NOW, 3, 15, lately=300.0)
        assert forecast.door_cost == 0.0
        assert (forecast.burst_s > 0) is slowed
        if slowed:
            assert forecast.burst_per_second == pytest.approx(30.0)


@pytest.mark.parametrize(("intake_now", "expected", "in_burst"), [
    (0, 120.0, None),     # the burst is over and nothing comes: the tier's pace with an idle door
    (40, 100.0, None),    # 120 - 0.5 x 40
    (80, 80.0, None),     # a standing queue: the door takes as many as the tier signs (80 = 120 - 0.5 x 80)
    (140, 80.0, 50.0),    # more than the tier signs: 120 - 0.5 x 140 while the burst goes on, then 80
    (300, 80.0, BURST_FLOOR * 120),   # not for the whole of a wait (a surge ends); in it, never under the floor
])
def test_the_pace_read_in_a_burst_is_forecast_at_the_doors_intake_now(intake_now, expected, in_burst):
    pace = TierPace()
    seconds = _shared_box()
    seconds.update({at: (intake_now, 0) for at in range(NOW - 3, NOW)})
    pace.record(NOW - 40, NOW - 40, NOW, ((at, Second(c, d, d > 0)) for at, (c, d) in seconds.items()))
    forecast = pace.forecast(NOW - 15, NOW, 3, 15)
    assert forecast.door_cost == pytest.approx(0.5)
    assert forecast.read == pytest.approx(80.0, abs=3)                  # what the latest seconds signed
    assert forecast.per_second == pytest.approx(expected, abs=0.5)
    if in_burst is None:
        assert (forecast.burst_per_second, forecast.burst_s) == (0.0, 0.0)
    else:
        assert forecast.burst_per_second == pytest.approx(in_burst, abs=0.5)
        assert forecast.burst_s == BURST_HOLDS_S - 4    # its three seconds and the 120 before them have gone


@pytest.mark.parametrize(("seconds_so_far", "left"), [(1, BURST_HOLDS_S - 1), (3, BURST_HOLDS_S - 3),
                                                      (6, BURST_HOLDS_S - 6), (12, BURST_LEFT_S)])
def test_a_burst_is_forecast_to_last_its_hold_in_all(seconds_so_far, left):
    """Held 8 s from every read, the fills' later requests and the held queue's first were told the burst's
    slow pace past the fill's end (took/ETA 0.72-0.78, 7 December 11:15): the burst's whole seconds so far
    count against its hold; while it goes on, at least BURST_LEFT_S is left."""
    pace = TierPace()
    seconds = _shared_box(last=NOW - 20)
    seconds.update({at: (40, 100) for at in range(NOW - 19, NOW)})       # a quiet door, a backlogged tier
    seconds.update({at: (150, 45) for at in range(NOW - seconds_so_far, NOW)})
    pace.record(NOW - 40, NOW - 40, NOW, ((at, Second(c, d, d > 0)) for at, (c, d) in seconds.items()))
    forecast = pace.forecast(NOW - 15, NOW, 3, 15, lately=300.0)         # and the door still busy lately
    assert forecast.burst_per_second > 0 and forecast.burst_s == left


@pytest.mark.parametrize(("last_second", "lately", "burst"), [
    (300, None, True),  # not known: the whole seconds say a burst
    (300, 130.0, True), # still past 1.5 times what the tier signs (80)
    (300, 100.0, True), # back under it lately, but not in the last whole second: a fill's dip between the load
    (300, 0.0, True),   # generator's batches ended its burst (make surge-eta, 7 December 20:53, round 2)
    (100, 130.0, True), # the last whole second under it, but not lately
    (100, 100.0, False),  # both back under it: the door has gone quiet since the whole seconds' burst
    (100, 0.0, False),
])
def test_a_burst_the_whole_seconds_show_is_over_once_the_door_is_quiet_lately(last_second, lately, burst):
    pace = TierPace()
    seconds = _shared_box()
    seconds.update({at: (300, 0) for at in range(NOW - 3, NOW - 1)})
    seconds[NOW - 1] = (last_second, 0)
    pace.record(NOW - 40, NOW - 40, NOW, ((at, Second(c, d, d > 0)) for at, (c, d) in seconds.items()))
    forecast = pace.forecast(NOW - 15, NOW, 3, 15, lately)
    assert (forecast.burst_s > 0) is burst
    assert forecast.per_second == pytest.approx(80.0, abs=0.5)        # after it: the bound, either way


@pytest.mark.parametrize(("whole", "lately", "in_burst"), [
    (40, 0.0, None),                # the whole seconds say no burst, and so does lately
    (80, 150.0, None),              # a standing queue (as many come as the tier signs, 80): under twice it, a
                                    # held queue's second swings that far
    (80, 300.0, BURST_FLOOR * 120), # a fill's first second: a burst before any whole second shows one
    (40, 110.0, 120 - 0.5 * 110),   # a quieter door before (40 a second): past twice that, and past the
                                    # tier's own pace (80), a burst too
    (40, 75.0, None),               # ... but not under the tier's own pace
    (0, 100.0, 120 - 0.5 * 100),    # after a drain (nothing came): past the tier's own pace
])
def test_a_burst_shows_first_in_the_doors_intake_lately(whole, lately, in_burst):
    """After a drain the pace read is the tier's fastest, and a fill at 140-180 a second stayed under twice
    the line's bound, told no burst while the tier signed 26-40 a second (7 December, 20:32): where the door
    took less in the whole seconds before, the line is twice what it took in them (at least the bound)."""
    pace = TierPace()
    seconds = _shared_box()
    seconds.update({at: (whole, 0) for at in range(NOW - 3, NOW)})      # the whole seconds before
    pace.record(NOW - 40, NOW - 40, NOW, ((at, Second(c, d, d > 0)) for at, (c, d) in seconds.items()))
    forecast = pace.forecast(NOW - 15, NOW, 3, 15, lately)
    assert forecast.per_second == pytest.approx(120 - 0.5 * whole, abs=0.5)   # after it, as before
    assert forecast.burst_from == pytest.approx(min(160.0, max(80.0, 2 * whole)), abs=0.5)
    if in_burst is None:
        assert forecast.burst_s == 0.0
    else:
        assert forecast.burst_per_second == pytest.approx(in_burst) and forecast.burst_s == BURST_HOLDS_S


def test_a_wait_spends_the_bursts_seconds_at_its_pace_then_the_pace_after():
    """A held queue's fill (7 December): the door took 100-150 uploads a second for 8 s and the tier signed
    20-35 a second in them, 45-60 after; told the pace of after for the whole wait, the fill's requests took
    1.2-1.5 times their first ETAs."""
    facts = QueueFacts(per_second=50.0, finish_s=0.5, burst_per_second=25.0, burst_s=8.0)
    assert facts.eta_seconds(100) == 5.0                   # within the burst: 100 at 25/s, its signing slowed x2
    assert facts.eta_seconds(400) == 8 + (400 - 200) / 50 + 0.5      # 200 in the burst's 8 s, 200 at 50/s
    assert QueueFacts(per_second=50.0, finish_s=0.5).eta_seconds(400) == 8.5   # no burst: all at 50/s
    # a position's wait never shrinks as it grows (the two paces meet at the burst's end), nor its ETA (the
    # signing slowed within the burst and not after it)
    waits = [facts.wait_s(n) for n in range(0, 600, 7)]
    assert waits == sorted(waits)
    etas = [facts.eta_seconds(n) for n in range(0, 600)]
    assert etas == sorted(etas)


def test_the_requests_signed_in_a_time_are_the_wait_the_other_way_round():
    """Positions leave out what the tier signed since the queue was read (``QueueView``): the same two paces
    a wait is spent at."""
    facts = QueueFacts(per_second=50.0, finish_s=0.5, burst_per_second=25.0, burst_s=8.0)
    for seconds in (0.0, 0.5, 8.0, 11.0):
        assert facts.wait_s(facts.signed_in(seconds)) == pytest.approx(seconds)
    assert facts.signed_in(11.0) == 25 * 8 + 50 * 3
    assert QueueFacts(per_second=50.0).signed_in(0.5) == 25.0


def test_fewer_backlogged_seconds_than_asked_give_no_forecast():
    pace = TierPace()
    _busy(pace, {NOW - 2: (10, 10), NOW - 1: (10, 10)})
    assert pace.forecast(NOW - 15, NOW, 3, 15) is None
    assert pace.forecast(NOW - 15, NOW, 2, 15).per_second == 10.0
    # the second under way is not whole: never counted
    _busy(pace, {NOW - 2: (10, 10), NOW - 1: (10, 10), NOW: (10, 99)}, now=NOW + 1)
    assert pace.forecast(NOW - 15, NOW, 2, 15).per_second == 10.0


def test_a_read_replaces_the_seconds_it_covers_and_older_ones_are_forgotten():
    pace = TierPace(span_s=60)
    _busy(pace, {NOW - 10: (5, 5), NOW - 5: (5, 5), NOW - 1: (5, 5)})
    pace.record(NOW - 6, NOW - 6, NOW, [(NOW - 1, Second(7, 8, True))])     # NOW - 5 had nothing, as read again
    assert pace.forecast(NOW - 15, NOW, 1, 15).per_second == pytest.approx((5 + 8) / 2)
    pace.record(NOW + 60, NOW + 60, NOW + 61, [])                   # a minute on: all of them are past the span
    assert pace.forecast(NOW - 15, NOW + 61, 1, 15) is None
    assert pace.read_until == NOW + 61


def test_a_read_of_the_finishes_alone_keeps_the_intake_recorded_before():
    """Each read re-reads the finishes over the pace's window (15 s) and the intake only since the last read."""
    pace = TierPace()
    _busy(pace, {NOW - 3: (50, 10), NOW - 2: (60, 10), NOW - 1: (70, 10)})
    pace.record(NOW - 3, NOW - 1, NOW, [(NOW - 3, Second(0, 20, True)), (NOW - 1, Second(5, 20, True))])
    assert [pace._seconds[at] for at in range(NOW - 3, NOW)] == [
        Second(50, 20, True), Second(60, 0, False), Second(5, 20, True)]


def test_a_pace_window_reaching_back_days_reads_only_the_span():
    pace = TierPace(span_s=60)
    week = NOW - 7 * 86_400
    pace.record(week, NOW - 60, NOW, [(week, Second(1, 1, True)), (NOW - 5, Second(1, 1, True))])
    assert list(pace._seconds) == [NOW - 5]


def test_the_seconds_the_tier_yielded_in_are_left_out_and_the_window_reaches_back_past_them():
    """A spike marks the door busy and the tier yields its cores (kernel/door_pressure.py): the 10 seconds of
    it sign 20 a second at a high intake, which the line through the seconds before does not foretell."""
    pace = TierPace()
    seconds = {at: (60, 90) for at in range(NOW - 40, NOW - 10)}       # no cost at the door: a flat line
    seconds.update({at: (150, 20) for at in range(NOW - 10, NOW)})      # the spike, yielding
    pace.record(NOW - 40, NOW - 40, NOW, ((at, Second(c, d, True)) for at, (c, d) in seconds.items()))
    as_read = pace.forecast(NOW - 15, NOW, 3, 15)
    assert as_read.read < 50 and as_read.door_cost > 0.5              # the spike's seconds: a slow pace, a door's cost
    pace.yielded(NOW - 10, NOW - 1)
    forecast = pace.forecast(NOW - 15, NOW, 3, 15)
    assert forecast.door_cost == 0.0
    assert forecast.per_second == forecast.read == 90.0                # the 15 s before the spike
    # a door busy for longer than the span: no other seconds; the yielded pace, as read
    pace = TierPace(span_s=20)
    pace.record(NOW - 20, NOW - 20, NOW, ((at, Second(150, 20, True)) for at in range(NOW - 20, NOW)))
    pace.yielded(NOW - 20, NOW - 1)
    assert pace.forecast(NOW - 15, NOW, 3, 15).per_second == 20.0


def _with_bursts_seen(bursts: dict[int, tuple[int, int]], *, yielded: bool = False) -> TierPace:
    """The shared box's line (idle 120, k 0.5: the tier signs 80 once the door takes as many), bursts the span
    holds (intake, finishes; backlogged), a quiet second, and a burst at the door now (its intake lately)."""
    pace = TierPace()
    seconds = _shared_box(first=NOW - 80, last=NOW - 30)   # its 120 a second: twice the 60 signed, not past it
    seconds.update(bursts)
    seconds.update({at: (40, 100) for at in range(NOW - 20, NOW)})
    pace.record(NOW - 80, NOW - 80, NOW, ((at, Second(c, d, True)) for at, (c, d) in seconds.items()))
    if yielded:
        pace.yielded(min(bursts), max(bursts))
    return pace


def test_a_bursts_pace_is_the_pace_the_tier_kept_in_the_bursts_seen():
    """A faster box's fills (7 December, afternoon): the door took about 260 a second, twice the intakes the
    line was fitted over, and the tier signed about 40 a second in them, 0.29 of its pace after; the line and
    the floor told 0.4-0.55 of it, and the fills' requests took 1.12-1.27 times their first ETAs."""
    assert BURST_SEEN_SECONDS == 3
    told = _with_bursts_seen({}).forecast(NOW - 15, NOW, 3, 15, lately=300.0)
    assert told.burst_per_second == pytest.approx(BURST_FLOOR * 120)      # none seen: the line, the floor
    seen = {NOW - 29: (260, 30), NOW - 28: (250, 40), NOW - 27: (270, 50)}
    forecast = _with_bursts_seen(seen).forecast(NOW - 15, NOW, 3, 15, lately=300.0)
    assert forecast.burst_per_second == pytest.approx(40.0)               # their mean
    assert forecast.per_second == pytest.approx(100.0, abs=0.5)           # after the burst: as before
    assert forecast.burst_s == BURST_HOLDS_S
    # two seconds are not yet a burst seen; a second the door took under twice what the tier signed in it is
    # not one at all, nor one it took under the tier's own pace (80), however little the tier signed
    two = {NOW - 29: (260, 30), NOW - 28: (250, 40), NOW - 27: (150, 80), NOW - 26: (70, 5)}
    forecast = _with_bursts_seen(two).forecast(NOW - 15, NOW, 3, 15, lately=300.0)
    idle = forecast.per_second + forecast.door_cost * 40                  # (the three join the line's fit)
    assert forecast.burst_per_second == pytest.approx(max(idle - forecast.door_cost * 300, BURST_FLOOR * idle))
    assert forecast.burst_per_second > 45


def test_a_burst_seen_is_a_second_in_which_the_door_took_twice_what_the_tier_signed():
    """Counted against twice the line's bound, a pace read from a drain (the tier at its fastest) left the
    fills' seconds under the line (100-170 a second, the tier signing 26-40 in them; 7 December, 20:32): none
    was seen, and the line told the next fill 1.5-2 times the pace it kept. A second is a burst seen by what
    the tier signed in it: here 110-130 came, under twice the bound (160), and the tier signed 25-35."""
    seen = {NOW - 29: (110, 30), NOW - 28: (120, 25), NOW - 27: (130, 35)}
    forecast = _with_bursts_seen(seen).forecast(NOW - 15, NOW, 3, 15, lately=300.0)
    assert forecast.burst_per_second == pytest.approx(30.0)


@pytest.mark.parametrize(("done", "expected"), [
    (2, BURST_SEEN_LEAST * 120),   # a tier all but stopped in them: at least a tenth of its pace with an idle door
    (110, None),                   # faster than the pace after a burst: no burst told, the pace after (100)
])
def test_a_bursts_pace_seen_is_held_between_a_tenth_of_the_idle_pace_and_the_pace_after(done, expected):
    seen = {at: (260, done) for at in range(NOW - 29, NOW - 25)}
    forecast = _with_bursts_seen(seen).forecast(NOW - 15, NOW, 3, 15, lately=300.0)
    if expected is None:
        assert (forecast.burst_per_second, forecast.burst_s, forecast.per_second) == (0.0, 0.0, pytest.approx(100.0))
    else:
        assert forecast.burst_per_second == pytest.approx(expected, abs=0.5)


def test_the_seconds_the_tier_yielded_in_are_no_burst_seen():
    """In a spike the tier yields its cores to the door (kernel/door_pressure.py) and signs at a share it keeps
    only while the door is busy; a burst without the yield does not go that slow."""
    seen = {at: (260, 10) for at in range(NOW - 29, NOW - 25)}
    forecast = _with_bursts_seen(seen, yielded=True).forecast(NOW - 15, NOW, 3, 15, lately=300.0)
    assert forecast.burst_per_second == pytest.approx(BURST_FLOOR * 120)
