"""The front door first while it is busy, where it shares a box's cores with the stamping tier.

On one box (the local stack; a small issuer's single server) the API processes and the stamping workers
take turns on the same cores. At equal shares (README, "One box, equal shares") the tier keeps signing
beside a flood's intake, which the fair queue's promise needs (a small channel's stamps do not wait for
the flood's uploads). But in a surge past what the door takes beside the tier, arrivals wait at the door,
its answers grow past a client's patience, and at its admission bound it turns callers away: the
requests not yet accepted are the ones at risk, while those accepted wait durably in the queue whatever
the tier's pace. With the workers at a lower priority for good, a spike's intake p99 fell from 1.8 s to
0.66 s and no caller was turned away, but a flood's small channels waited 5-7 times their time alone
(docs/surge-journal.md, "The front door first again, at nice 5").

So the priority moves only while the door is busy:
- an API process whose requests in progress on a route with an admission bound pass half that bound, or
  that turns a request away at the bound, marks the door busy (``DoorMark.busy``, ``DoorMark.turned_away``:
  the modification time of one file, at most every ``MARK_EVERY_S``); a flood sent with a fixed number in
  flight (32 in ``make surge-fairness``) stays below it, a spike that the door cannot keep up with climbs
  past it. Turned away counts too: while callers hold queue tickets the door lets newcomers in only below
  half its bound (kernel/http.py), so a spike then waits in the line of tickets, not in progress, and
  in the deadline day's spike of 181 arrivals/s a stamping worker yielded for 16 of its 60 seconds;
- each stamping worker looks at the mark every ``LOOK_EVERY_S`` (``YieldToDoor``) and, while it is younger
  than ``HOLD_S``, runs its session's autogroup (itself, its threads and its signing children) at
  ``BUBUH_DOOR_BUSY_NICE``; once the mark is older, at the nice value it started with.

The ETAs' pace (stamping/pace.py) leaves out the seconds the tier yielded in: an API process looks at
the mark each time it reads the tier's pace (``DoorWatch``).

A file, not an event: the mark means something only to processes sharing the box's cores, and only they
share the file. Off unless ``BUBUH_DOOR_BUSY_FILE`` names it (`bubuh up` gives every process the one in its
run directory); pods on separate nodes have nothing to yield to one another.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from services.kernel import logs
from services.kernel.metrics import DOOR_FIRST

log = logs.get(__name__)

BUSY_SHARE = 0.5        # in progress over this share of a route's admission bound: the door is busy
MARK_EVERY_S = 0.25     # an API process touches the mark at most this often
LOOK_EVERY_S = 0.1      # a worker looks at the mark this often
HOLD_S = 1.0            # the door counts as busy this long after its latest mark
AUTOGROUP = Path("/proc/self/autogroup")


def autogroup_nice(pid: int) -> int | None:
    """The nice value of ``pid``'s scheduling autogroup (``/proc/<pid>/autogroup``: "/autogroup-N nice K"),
    which weighs its session against the others; None without autogroups or when ``pid`` has ended."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None


def marked_at(path: Path) -> float | None:
    """The mark's latest time (epoch seconds), None when it was never made."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


class DoorMark:
    """The API side: the door is busy when a route's requests in progress pass ``BUSY_SHARE`` of its bound,
    or when it turns one away."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = Path(path)
        self._marked = float("-inf")

    def busy(self, in_flight: int, bound: int) -> None:
        if in_flight > bound * BUSY_SHARE:
            self._mark()

    def turned_away(self) -> None:
        self._mark()

    def _mark(self) -> None:
        now = time.monotonic()
        if now - self._marked < MARK_EVERY_S:
            return
        self._marked = now
        try:
            self._path.touch()
        except OSError as exc:       # the mark is a hint; the request goes on regardless
            log.warning("door busy mark not written", path=str(self._path), error=repr(exc))


class YieldToDoor:
    """The stamping worker's side: its autogroup at ``nice`` while the door is marked busy, else as it was."""

    def __init__(self, path: str | os.PathLike, nice: int) -> None:
        self._path = Path(path)
        self._nice = nice
        self._base = autogroup_nice(os.getpid())
        self.yielding = False

    def door_busy(self, now: float | None = None) -> bool:
        marked = marked_at(self._path)
        return marked is not None and (time.time() if now is None else now) - marked < HOLD_S

    def _set(self, yielding: bool) -> bool:
        value = self._nice if yielding else self._base
        try:
            AUTOGROUP.write_text(str(value))
        except OSError as exc:       # EAGAIN: the kernel's limit of one change a tenth of a second; tried again
            log.debug("autogroup nice not changed yet", nice=value, error=repr(exc))
            return False
        self.yielding = yielding
        DOOR_FIRST.set(1 if yielding else 0)
        log.info("the front door is busy: stamping yields the cores" if yielding else
                 "the front door is quiet: stamping back at its share", autogroup_nice=value)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        if self._base is None:
            log.info("no autogroups here: stamping does not yield to the front door")
            return
        try:
            while not stop.is_set():
                busy = self.door_busy()
                if busy != self.yielding:
                    self._set(busy)
                try:
                    await asyncio.wait_for(stop.wait(), LOOK_EVERY_S)
                except TimeoutError:
                    pass
        finally:
            if self.yielding:
                self._set(False)


class DoorWatch:
    """A reader of the tier's pace: when, since its last look, the stamping tier yielded to the door. The mark
    holds only its latest time, and the tier yields until ``HOLD_S`` after it; a reader looking about once
    a second (the queue's facts while requests come) sees each stretch of a busy door."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = Path(path)
        self._looked = time.time()

    def yielded_since_last_look(self, now: float | None = None) -> tuple[float, float] | None:
        """The stretch (epoch seconds) since the last look in which the tier yielded, at most ``HOLD_S``
        before the latest mark, up to ``HOLD_S`` after it; None when it did not yield since."""
        now = time.time() if now is None else now
        looked, self._looked = self._looked, now
        marked = marked_at(self._path)
        if marked is None or marked + HOLD_S <= looked:
            return None
        return max(looked, marked - HOLD_S), min(now, marked + HOLD_S)
