"""The pace a queue will drain at when the door shares the stamping tier's cores.

An ETA is the requests ahead over the tier's pace. The pace is read from the latest seconds in which
the tier had a backlog (``queue.py``), and on a box where the API processes and the stamping workers
share the cores, that pace depends on how many requests the door took in those seconds: on the
2-core box, a burst of 200 uploads a second held the tier to 55-65 stamps/s, a standing queue (as
many coming as leaving) let it sign 90-100, and once the channels stopped sending it signed 130-140.
Read in the burst and told to the requests that came just after it, the pace made their ETAs 1.4x
their time; read in a standing queue and told to a request whose wait outlasted the sending, 1.3x.

So the pace is modelled, per second, as ``P0 - k * intake``: ``P0`` the tier's pace with an idle door,
``k`` the stamps per second it signs fewer for each request per second the door takes (the door's cost in
the tier's stamps). ``k`` is fitted, a least-squares line through the backlogged seconds of the last
``FIT_SPAN_S`` (completions against stamp requests accepted); where the fit finds no cost, 0 (a door with
cores of its own: then the pace is the one read, as before, and a burst is told only at a pace the bursts
seen kept, below). Until ``FIT_MIN_SECONDS`` of them are known it is the cost a queue of the same box is
built with (``unfitted_cost``): ``DOOR_COST_ONE_BOX`` where the door shares the tier's cores
(``queue.py``: the tier yields to that door, kernel/door_pressure.py), else 0. Counted as 0 there, as
until 7 December, a first fill after a quiet spell was told no burst at all: the span held only make
surge-eta's calibration (11 backlogged seconds), the tier signed 20-37 a second while the door took
84-123, and 35% of the fill finished within 25% of its first ETA (20:53, round 1); replayed with the
one-box cost, 76% (0.2: 70%, 0.3 and 0.35: 78%), one other of the 21 rounds of seven runs one point
better, the rest unmoved. From the latest backlogged seconds' pace and intake it gives ``P0``, and the
forecast is the pace at the intake of the last ``INTAKE_NOW_S`` seconds, but at no more intake than the
tier's own pace (``P0 / (1 + k)``: the door taking as many as the tier signs). A wait of many seconds
outlasts a burst: a surge's arrivals end, and a channel holding a set number of requests unfinished sends
one when one completes; the door taking more than the tier signs for the whole of a wait is a queue
growing without end, and its requests' ETAs are read again.

Where the stamping tier yields the cores to a busy door (kernel/door_pressure.py: one box, a spike past
what the door takes beside the tier), the seconds it yielded in (``yielded``) are left out of both the
pace read and the fit: in them the tier signs at a share it keeps only while the door is busy, and a
queue that a spike builds is drained mostly after it. The pace is then read over as many seconds in
which it did not yield as the window holds, reaching back past the yielded ones (within the span); only
when there are too few of those is the yielded pace read. In ``make surge-open``'s spike (6 December,
126 arrivals/s for 60 s, the tier yielding for 48 of them) the first ETAs, read at the yielding pace,
were 1.75 times the time taken at the median, and 11% within 25% of it; with them left out (23:24, a
spike of 135/s) 1.12 times, and 28% within 25%. The first requests of a spike still wait at the yielding
pace for as long as it lasts, which no ETA given in it can know.

A burst is not bounded away for its first seconds, though. When the door takes more than the tier signs
(a channel filling its window, a spike's start), the forecast is two paces: until the burst has lasted
``BURST_HOLDS_S`` in all the pace at the intake now (never under ``BURST_FLOOR`` of ``P0``: the line is fitted
over intakes up to about twice the tier's pace, and read far beyond them it reaches zero), and after
them the bounded pace above. A burst shows first in the door's intake over its last half second
(``LATELY_S``, ``LATELY_BURST``): read only from whole seconds, a fill's 202s of its first two seconds were
told no burst, and took 1.4-1.8 times their ETAs (0-3% within 25%, replayed over make surge-eta, 7
December, 08:58; told of it at once, 58-100%). Read from the second under way (b2a5493), a burst that
began late in a second showed only in the next, and the facts a 202 was told were up to a second old:
the first half second of the fills took 1.5-2.1 times its ETAs (10:39); the facts are now read again
early where a process gives many 202s (``queue.py``, ``FACTS_GIVEN_SHARE``). Read so, a fill's burst
showed in the facts 0.3-0.6 s into it (make surge-eta, 7 December 19:56), and a 202 now counts the door's
intake itself: the statement that records it counts every API process's requests accepted in the
``LATELY_AT_DOOR_S`` before it, and past the line the burst is forecast from the seconds the last read
recorded, with no read of its own (``queue.py``, ``QueueView._burst_at_the_door``); the fills' ETAs then
rose 0.1-0.2 s into them.
``QueueFacts.eta_seconds`` (``queue.py``) spends a wait in that order. With
the bound alone, a held queue's fill (three channels sending 334 requests each at once: the door took
100-150 a second for 8 s, and the tier signed 20-35 a second in them, 45-60 after) was told the pace of
after the fill for the whole of its wait, and its requests took 1.2-1.5 times their first ETAs. Replayed
over make surge-eta's runs of 7 December (05:46-06:39; rounds 2 and 3 of three runs), the fills' requests
within 25%: 29-51% bounded, 67-72% with the burst held 8 s; the held requests moved by a point or less
(99/94/96% and 100/89/92% against 98/94/96% and 100/88/91%), the short open loop's spike (05:40) stayed at
38%, and the sustained round (06:50) did not move: its door never took more than the bound. Held 10 s,
one round's fill read long (27%); 12 s, 15%: a fill's burst lasts as long as its size at the door's pace,
which the door cannot know, so the hold is the shortest that met every fill replayed, not the longest.

How slow the tier goes in a burst is then read from the bursts themselves, once the span holds a few
(``BURST_SEEN_SECONDS`` backlogged seconds in which the door took more than twice what the tier signed in
the same second, and more than the tier's own pace; until 7 December 20:50, past twice the line's bound,
which a pace read from a drain raised past the fills that came after it): the line and the
floor are the door's cost as the held seconds show it, and how far past them a burst reaches depends on
how fast the box takes uploads. On the faster box of 7 December's afternoon the fills came in at about 260
a second, twice the intakes the line was fitted over; the tier signed about 40 a second in them, 0.29 of
its pace after, where the line (``k`` 0.24-0.26) and the floor told 0.4-0.55, and the fills' requests took
1.12-1.27 times their first ETAs at the median (make surge-eta, 16:18-16:24). Alternated on a slower hour
(18:09-18:47, fills of 65-107 uploads a second), the fills' requests were 69% within 25% of their first
ETAs at the median of nine rounds, against 50% of six told the line's pace (took/ETA medians 1.13 and
1.25). The first burst a process sees is still told the line's pace.

What this does not see (README, "ETAs people can plan by", 6 December 13:07): a wait that outlasts the
sending. When channels hold a set number unfinished, intake follows completions second by second, so the
fitted line comes out flatter than the door's cost (0.19-0.29 where the tier then signed 1.6 times as fast
once the sending stopped), and the forecast, the pace at the intake now, cannot know the sending will stop.

Replayed over the database's 15 held-queue rounds of 5 and 6 December (each request's time from 202
to completed against the stamps finished meanwhile over the pace it would have been told): the held
requests within 25% of their ETA, median round, 80% with the pace as read, 85% with the intake of the
last 3 s unbounded, 92-96% bounded (``k`` fitted over 300-600 s; it came out 0.1-0.37), the fills
included 71% against 83-84%. In the three sustained rounds of 5 December (arrivals at twice the tier's
pace for 600 s, waits of minutes), 29-51% against 56-70% (took/ETA medians 0.66-0.75 against 0.79-0.92).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FIT_SPAN_S = 600          # the seconds the door's cost is fitted over
FIT_MIN_SECONDS = 30      # backlogged seconds needed before it is
DOOR_COST_ONE_BOX = 0.25  # k until then, where the door shares the tier's cores: fitted 0.19-0.37 over make surge-eta
INTAKE_NOW_S = 3          # the door's intake now: the mean of the latest whole seconds
# a read of the intake covers the seconds since the last read and REREAD_S before (rows commit a moment after
# their times), at most READ_AT_MOST_S (the first read of a process, or after the database was away); the
# finishes are read over the pace's window too, as before
REREAD_S = 3
READ_AT_MOST_S = 60
MAX_DOOR_COST = 1.0       # a stamp request at the door costs the tier at most one stamp
# a burst at the door (more than the tier signs) is forecast to last this long in all: the whole seconds it has
# gone on count against it, and while it goes on at least BURST_LEFT_S is left. Held 8 s from every read, the
# fills' later requests and the held queue's first were told its slow pace past the fill's end (took/ETA
# 0.72-0.78 in the held queue's first seconds, make surge-eta, 7 December 11:15)
BURST_HOLDS_S = 8.0
BURST_LEFT_S = 1.0
# the pace in a burst, at least: this share of the tier's pace with an idle door. In make surge-eta's fills the
# tier signed 20-35 stamps a second while the door took 100-150, 45-60 after (the door and the tier share two
# cores); the line, fitted over intakes up to about twice the tier's pace, reaches far lower beyond them, and
# read at the door's intake over its last half second (LATELY_S: a fill's first requests land together) it
# reaches zero. At a fifth, with the intake lately, the fills' requests after their first second took
# 0.63-0.78 of their first ETAs (make surge-eta, 7 December 10:56); replayed over eleven runs' fills, 0.4 met
# 68-93% of them within 25%, a fifth 50-89%.
BURST_FLOOR = 0.4
# ... until the tier has been seen in bursts: once the span holds BURST_SEEN_SECONDS backlogged seconds in which
# the door took more than LATELY_BURST times what the tier signed in the same second (and more than its own
# pace), a burst's pace is the pace the tier kept in them (their mean), at least BURST_SEEN_LEAST of P0 and at
# most the pace after the burst (why: the docstring)
BURST_SEEN_SECONDS = 3
BURST_SEEN_LEAST = 0.1
# the door's intake over the last LATELY_S, as a rate, shows a burst before a whole second does, once it passes
# LATELY_BURST times what the tier signs (a held queue's seconds swing around that line; a fill's first second
# is 2-3 times past it), or, where the door took less in the whole seconds before, LATELY_BURST times what it
# took in them, at least what the tier signs: after a drain the tier's pace read is its fastest, and a fill at
# 140-180 a second stayed under twice it while the tier signed 26-40 a second (make surge-eta, 7 December 20:32)
LATELY_S = 0.5
LATELY_BURST = 2.0
# a 202's own count of the door's intake (http_intake.RECORD: every API process's requests accepted just before it)
# covers the LATELY_AT_DOOR_S before it: a fill's first 48 requests (three channels, 16 in flight each) land
# within a tenth of a second, and counted over half a second they read as 96 a second, at the line
LATELY_AT_DOOR_S = 0.25
# ... and a burst the whole seconds still show is over once the intake lately and in the last whole second are
# back under LATELY_ENDS times it (the three whole seconds the intake is read over show a fill for up to three
# seconds after its end). The intake lately alone ended fills that went on: between the load generator's
# batches a fill at 1.2-2 times the bound dipped under the line for half a second (make surge-eta, 7 December
# 20:53, round 2); with the last whole second too, the fills of 21 rounds (seven runs) replayed 71% within 25% at
# the mean against 68% (better in 11, worse in none), the held requests unmoved
LATELY_ENDS = 1.5


@dataclass(frozen=True)
class Second:
    came: int             # stamp requests accepted in it
    done: int             # stamps finished in it
    backlog: bool         # every stamp finishing in it had waited in the fair queue


_NONE = Second(0, 0, False)


@dataclass(frozen=True)
class Forecast:
    per_second: float     # the pace to divide the requests ahead by (after a burst, if the door is in one)
    read: float           # the pace the latest backlogged seconds kept (the estimate before the door's cost)
    door_cost: float      # k: stamps/s fewer per stamp request/s at the door
    burst_per_second: float = 0.0   # the pace while the door's burst goes on (0: the door is in none)
    burst_s: float = 0.0            # how long from now it is forecast to go on (0: none)
    burst_from: float = float("inf")  # the door's intake lately (per second) past which it is in a burst


class TierPace:
    """Each second's intake and completions, as read (``record``), over the last ``FIT_SPAN_S``; the pace a
    queue will drain at (``forecast``)."""

    def __init__(self, span_s: int = FIT_SPAN_S, min_seconds: int = FIT_MIN_SECONDS,
                 unfitted_cost: float = 0.0) -> None:
        """``unfitted_cost``: ``k`` until ``min_seconds`` backlogged seconds are recorded (``DOOR_COST_ONE_BOX``
        where the door shares the tier's cores)."""
        self._span_s, self._min_seconds, self._unfitted_cost = span_s, min_seconds, unfitted_cost
        self._seconds: dict[int, Second] = {}
        self._yielded: set[int] = set()           # seconds in which the tier yielded its cores to a busy door
        self.read_until: int | None = None        # the first second not yet whole at the latest read (epoch s)

    def record(self, since: int, came_since: int, now: int, seconds: Iterable[tuple[int, Second]]) -> None:
        """The seconds ``[since, now)`` as read (epoch seconds; one absent had neither intake nor a finish),
        their intake only from ``came_since`` (earlier seconds keep the intake recorded before: a read
        re-reads the finishes of the pace's window, and the intake only since the last read); seconds older
        than the span are forgotten."""
        read = dict(seconds)
        for at in [at for at in self._seconds if at < now - self._span_s]:
            del self._seconds[at]
        self._yielded = {at for at in self._yielded if at >= now - self._span_s}
        for at in range(max(since, now - self._span_s), now):
            second, kept = read.get(at), self._seconds.get(at)
            came = (second.came if second else 0) if at >= came_since else (kept.came if kept else 0)
            done, backlog = (second.done, second.backlog) if second else (0, False)
            if came or done:
                self._seconds[at] = Second(came, done, backlog)
            else:
                self._seconds.pop(at, None)
        self.read_until = now

    def backfill(self, before: int, seconds: Iterable[tuple[int, Second]]) -> None:
        """Seconds older than ``before`` (epoch s) and within the span, read once after the process started
        (``queue.py``): its first read covers ``READ_AT_MOST_S``, and the door's cost is fitted over
        ``FIT_MIN_SECONDS`` backlogged seconds, so until a process had seen them its forecasts counted no
        cost. Seconds already recorded are kept; nothing is forgotten here."""
        horizon = (self.read_until or before) - self._span_s
        for at, second in seconds:
            if horizon <= at < before and at not in self._seconds and (second.came or second.done):
                self._seconds[at] = second

    def yielded(self, first: int, last: int) -> None:
        """The seconds ``[first, last]`` (epoch s) in which the tier yielded its cores to a busy door."""
        self._yielded.update(range(first, last + 1))

    def _drained(self, at: int) -> bool:
        """A second that says the pace a queue drains at: backlogged, a finish in it, the tier at its share."""
        second = self._seconds.get(at)
        return second is not None and second.backlog and second.done > 0 and at not in self._yielded

    def _reach(self, since: int, now: int) -> int:
        """The window ``[since, now)`` moved back past the seconds the tier yielded in it: as many it did not
        yield in, within the span."""
        need, at = now - since, now
        while need > 0 and at > now - self._span_s:
            at -= 1
            need -= at not in self._yielded
        return at

    def door_cost(self) -> float:
        """``k``: minus the slope of completions on intake over the backlogged seconds recorded (not those
        the tier yielded in), within ``[0, MAX_DOOR_COST]``; the unfitted cost until ``min_seconds`` of them."""
        busy = [self._seconds[at] for at in self._seconds if self._drained(at)]
        if len(busy) < self._min_seconds:
            return self._unfitted_cost
        mx = sum(s.came for s in busy) / len(busy)
        my = sum(s.done for s in busy) / len(busy)
        sxx = sum((s.came - mx) ** 2 for s in busy)
        if sxx <= 0:
            return 0.0
        slope = sum((s.came - mx) * (s.done - my) for s in busy) / sxx
        return min(max(-slope, 0.0), MAX_DOOR_COST)

    def _burst_pace(self, bound: float) -> float | None:
        """The tier's pace in the bursts the span holds: the mean of the backlogged seconds (not those the tier
        yielded in) in which the door took more than ``LATELY_BURST`` times what the tier signed in the same
        second, and more than ``bound``; None with fewer than ``BURST_SEEN_SECONDS`` of them. Counted against
        ``LATELY_BURST`` times ``bound`` (until 7 December, 20:50), a pace read from a drain (the tier at 122
        stamps/s once the door was quiet) put the later fills' seconds (100-170 a second, the tier signing
        26-40) under the line: none was seen, and the line told them 1.5-2 times the pace they kept."""
        seen = [s.done for at, s in self._seconds.items()
                if s.came > LATELY_BURST * s.done and s.came > bound and self._drained(at)]
        return sum(seen) / len(seen) if len(seen) >= BURST_SEEN_SECONDS else None

    def at_the_door(self, since: int, now: int, least: int, most: int, last: Forecast, at_door: float) -> Forecast:
        """``last`` (``forecast``'s for the same window), or, where it tells no burst and the door's intake a 202
        counted itself (``at_door``, per second) is past its line, the forecast at that intake when it tells
        one (``queue.py``, ``QueueView._burst_at_the_door``; ``loadtests/eta_replay.py`` replays it)."""
        if last.burst_s > 0 or at_door <= last.burst_from:
            return last
        again = self.forecast(since, now, least, most, at_door)
        return again if again is not None and again.burst_s > 0 else last

    def forecast(self, since: int, now: int, least: int, most: int, lately: float | None = None) -> Forecast | None:
        """The pace for a wait starting at ``now``, read over the latest ``most`` backlogged whole seconds
        from ``since`` (the queue's pace window; reaching back past the seconds the tier yielded in, which
        are read only when too few others are); None when fewer than ``least`` are recorded. ``lately``: the
        door's intake over the last ``LATELY_S``, per second (None: not known)."""
        reach = self._reach(since, now)
        latest = sorted(at for at in self._seconds if reach <= at < now and self._drained(at))[-most:]
        if len(latest) < max(least, 1):
            latest = sorted(at for at, s in self._seconds.items() if since <= at < now and s.backlog and s.done)[-most:]
        if len(latest) < max(least, 1):
            return None
        used = [self._seconds[at] for at in latest]
        read = sum(s.done for s in used) / len(used)
        k = self.door_cost()
        idle = read + k * sum(s.came for s in used) / len(used)           # P0: the pace with an idle door
        intake = sum(self._seconds[at].came for at in range(now - INTAKE_NOW_S, now)
                     if at in self._seconds) / INTAKE_NOW_S
        bound = idle / (1 + k)                                            # the door taking what the tier signs
        after = idle - k * min(intake, bound)
        burst = intake if intake > bound else 0.0
        line = min(LATELY_BURST * bound, max(bound, LATELY_BURST * intake))   # where the door lately is in a burst
        if lately is not None and lately > line:
            burst = max(burst, lately)
        elif (lately is not None and lately < LATELY_ENDS * bound
              and self._seconds.get(now - 1, _NONE).came < LATELY_ENDS * bound):
            burst = 0.0                                                   # the door has gone quiet since
        seen = self._burst_pace(bound) if burst > 0 else None
        in_burst = (max(idle - k * burst, BURST_FLOOR * idle) if seen is None else
                    min(max(seen, BURST_SEEN_LEAST * idle), after))
        if burst <= 0 or in_burst >= after:                               # no burst, or one that costs the tier nothing
            return Forecast(after, read, k, burst_from=line)
        gone = 0                                                          # the burst's whole seconds so far
        while gone < BURST_HOLDS_S and self._seconds.get(now - 1 - gone, _NONE).came > bound:
            gone += 1
        return Forecast(after, read, k, in_burst, max(BURST_HOLDS_S - gone, BURST_LEFT_S), line)
