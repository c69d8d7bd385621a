"""Per-endpoint circuit breaker and in-flight accounting: how many new requests an endpoint may get now.

closed    -> up to ``per_endpoint`` requests in flight; ``failures`` consecutive failures open it.
open      -> nothing is sent for ``cooldown_s``; then half-open.
half-open -> one probe at a time: a success closes the circuit, a failure opens it again.

State is per instance and in memory: a restarted instance starts closed, and the backoff in the
due-time table still spaces the retries, so nothing depends on the breaker surviving a crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_GAUGE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class Breaker:
    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.threshold = max(1, failures)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self.state = CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self._on_change:
                self._on_change(state)

    @property
    def gauge(self) -> int:
        return _GAUGE[self.state]

    def capacity(self, in_flight: int, per_endpoint: int) -> int:
        """How many more requests may start now."""
        if self.state == OPEN:
            if self._clock() - self.opened_at < self.cooldown_s:
                return 0
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN:
            return 0 if in_flight else 1
        return max(0, per_endpoint - in_flight)

    def reopens_in(self) -> float | None:
        """Seconds until an open circuit lets a probe through (None when not open)."""
        if self.state != OPEN:
            return None
        return max(0.0, self.cooldown_s - (self._clock() - self.opened_at))

    def record(self, ok: bool) -> None:
        if ok:
            self.consecutive_failures = 0
            self._set(CLOSED)
            return
        self.consecutive_failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.consecutive_failures >= self.threshold):
            self.opened_at = self._clock()
            self._set(OPEN)
