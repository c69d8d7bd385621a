"""How long a caller the front door turns away should wait: the ``Retry-After`` of a route's 503s.

A fixed ``Retry-After: 1`` brings every refused caller back at once, a second later, to be refused
again. In the deadline-day run (docs/surge-journal.md, 1 December) the front door never recovered from the broker
restart: the callers refused during the outage came back together on top of the new arrivals, and
kept coming back. ``Spread`` spreads them instead over the time the door needs to take them:

    upper = refused in the last ``REFUSED_WINDOW_S`` / requests the door completes per second,

each refused caller drawn at random between 1 s and ``upper`` (at most ``MAX_S``), so they come back
at about the rate the door completes requests rather than together. The rate is the larger of the
last few seconds' and the last minute's (at least 1 a second): while the door is stalled (the broker
away) it completes nothing, and the rate it will have once the broker is back is the one it had
before. One ``Spread`` per route with an admission bound, in each API process.

A spread is a lottery all the same: a caller coming back finds newcomers and other returning callers
at the door, and is turned away again at random. In the deadline day's spike (docs/surge-journal.md, 6 December),
half the requests needed two to seven tries, and 550-1,056 a round got no answer within a client's 30 s
while others that came later were taken at once. So a caller turned away with an ``Idempotency-Key``
is also given its place in line: ``book`` gives it the next free second of the route's completions
(after the last caller booked, at the rate above), and ``Tickets`` signs that time with the request's
key into a ``Bubuh-Queue-Ticket``. Sent back with the retry, the ticket lets the request in at its time
ahead of newcomers (kernel/http.py, ``BodyLimits``), and newcomers queue behind the booked callers
instead of racing them: first turned away, first taken. The ticket is an HMAC under the platform key,
so any API process or pod honours another's tickets, and a caller cannot write itself an earlier time
or reuse one ticket for another request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import random
import secrets
import time
from collections import deque
from collections.abc import Callable

REFUSED_WINDOW_S = 5.0       # refused callers counted as still waiting to come back
RATE_WINDOW_S = 60.0         # the door's completions per second: over this, and over REFUSED_WINDOW_S
MAX_S = 30                   # a channel's client budget in the deadline day; beyond it nobody waits
TICKET_HEADER = "Bubuh-Queue-Ticket"
TICKET_EARLY_S = 0.5         # a ticket is honoured from this long before its time (clocks differ) ...
TICKET_LATE_S = 30.0         # ... until this long after it; later, its holder is a newcomer again


class Spread:
    def __init__(self, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._completed: deque[list] = deque()     # [second, count], one per second with completions
        self._refused: deque[float] = deque()
        self._booked_until = 0.0                   # the time given to the last caller booked (``book``)

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
        upper = min(MAX_S, max(1, math.ceil(len(self._refused) / self._rate(now))))
        return self._rng.randint(1, upper)

    def _rate(self, now: float) -> float:
        while self._completed and self._completed[0][0] < now - RATE_WINDOW_S:
            self._completed.popleft()
        recent = sum(n for second, n in self._completed if second >= now - REFUSED_WINDOW_S)
        return max(1.0, recent / REFUSED_WINDOW_S, sum(n for _, n in self._completed) / RATE_WINDOW_S)

    def book(self) -> float:
        """A caller turned away now, given its place in line: the seconds until its turn, the next
        completion of the route after the last caller booked (at least 1 s, at most ``MAX_S``: a line
        longer than a client's budget is not promised, its callers all come back at the end)."""
        now = self._clock()
        self._refused.append(now)
        turn = min(max(now + 1.0, self._booked_until + 1.0 / self._rate(now)), now + MAX_S)
        self._booked_until = max(self._booked_until, turn)
        return turn - now

    def booked_ahead(self) -> bool:
        """Are callers booked for a time still to come? Newcomers then queue behind them."""
        return self._booked_until > self._clock()


class Tickets:
    """``Bubuh-Queue-Ticket``: a caller's time in line, signed for one request of one caller (its
    ``Idempotency-Key`` and its credentials, as ``binding``) on one route. ``<unix ms>.<mac>``, the
    mac the first 16 bytes of HMAC-SHA256 under a key derived from the platform key."""

    def __init__(self, key: bytes | None = None, wall: Callable[[], float] = time.time) -> None:
        # without the platform key (a test app) a key of this process: its tickets hold here only
        self._key = hmac.new(key or secrets.token_bytes(32), b"bubuh door queue tickets v1", hashlib.sha256).digest()
        self._wall = wall

    def issue(self, route: str, binding: bytes, in_s: float) -> str:
        at_ms = int((self._wall() + in_s) * 1000)
        return f"{at_ms}.{self._mac(route, binding, at_ms)}"

    def due_in(self, route: str, binding: bytes, ticket: str) -> float | None:
        """Seconds until the ticket's time (negative once it passed), or None when it is not a ticket of
        this route and request, is malformed, or expired ``TICKET_LATE_S`` ago."""
        at, _, mac = ticket.strip().partition(".")
        if not at.isdigit() or len(at) > 15 or not hmac.compare_digest(mac, self._mac(route, binding, int(at))):
            return None
        due = int(at) / 1000 - self._wall()
        return due if due >= -TICKET_LATE_S else None

    def _mac(self, route: str, binding: bytes, at_ms: int) -> str:
        digest = hmac.new(self._key, b"\x1f".join((route.encode(), str(at_ms).encode(), binding)), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()[:16]).decode().rstrip("=")
