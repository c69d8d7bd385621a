"""Waiting, in a component test, for one of several members to hold a leadership lock (kernel/leadership.py).

A member is anything with a ``leadership``. Every look also checks the lock's promise: never two
members leading at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol, TypeVar

from services.kernel.leadership import Leadership


class Member(Protocol):
    @property
    def leadership(self) -> Leadership: ...


M = TypeVar("M", bound=Member)


async def sole_leader(members: Sequence[M], timeout: float = 5.0) -> M:
    """The member that leads, once one does (``timeout`` seconds at most); fails if two ever lead."""
    deadline = time.monotonic() + timeout
    while True:
        leading = [m for m in members if m.leadership.leading.is_set()]
        assert len(leading) <= 1, f"{len(leading)} members lead at once"
        if leading:
            return leading[0]
        assert time.monotonic() < deadline, "no member took the lead"
        await asyncio.sleep(0.01)
