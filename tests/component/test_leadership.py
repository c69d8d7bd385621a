"""kernel/leadership.py on real PostgreSQL: of several members, one runs the work at a time; when the
leader stops, another takes over within BUBUH_LEADER_RETRY_S (0.1 s here); a standby waits without a
lock wait (try-locks only); PostgreSQL refusing connections is a warning and a retry, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit, urlunsplit

from services.kernel.leadership import Leadership
from services.kernel.metrics import LEADING
from tests.component.leadership_watch import sole_leader


class Contender:
    def __init__(self, settings, name: str, lock: str, spans: list) -> None:
        self.name, self.spans = name, spans
        self.leadership = Leadership(settings, lock)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.leadership.lead(self.stop, self.work))

    async def work(self, until: asyncio.Event) -> None:
        started = time.monotonic()
        await until.wait()
        self.spans.append((self.name, started, time.monotonic()))

    async def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.task, 5)


async def test_one_member_works_at_a_time_and_the_next_takes_over_when_it_stops(settings, pool):
    lock = f"test leadership {settings.schema('component')}"
    spans: list[tuple[str, float, float]] = []
    contenders = [Contender(settings, name, lock, spans) for name in ("a", "b", "c")]
    try:
        order = []
        for _ in range(3):
            leader = await sole_leader(contenders, timeout=3.0)
            assert LEADING.labels(lock)._value.get() == 1
            await asyncio.sleep(0.3)                            # the others keep standing by meanwhile
            assert [c for c in contenders if c.leadership.leading.is_set()] == [leader]
            # a standby is not a lock wait: no session of ours waits on the advisory lock
            assert await pool.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                       "AND NOT granted") == 0
            stopped = time.monotonic()
            await leader.close()
            order.append(leader.name)
            contenders.remove(leader)
            if contenders:
                nxt = await sole_leader(contenders, timeout=3.0)
                assert time.monotonic() - stopped < 1.0         # within a few retries of 0.1 s
                assert nxt.name not in order
        assert sorted(order) == ["a", "b", "c"]
        spans.sort(key=lambda s: s[1])
        for (_, _, end), (_, start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, spans                          # the work never overlapped
    finally:
        for c in contenders:
            await c.close()


async def test_without_postgresql_it_retries_and_leads_once_it_can(settings):
    """A database that refuses connections (a wrong port, as a server down does): no lead, no crash; the
    same instance leads once connections succeed."""
    lock = f"test leadership away {settings.schema('component')}"
    url = urlsplit(settings.database_url)
    away = settings.model_copy(update={"database_url": urlunsplit(url._replace(
        netloc=url.netloc.rsplit(":", 1)[0] + ":1" if url.port else url.netloc + ":1"))})
    spans: list = []
    c = Contender(away, "a", lock, spans)
    try:
        await asyncio.sleep(0.6)
        assert not c.leadership.leading.is_set() and not c.task.done()
    finally:
        await c.close()
    assert c.task.done() and c.task.exception() is None
    back = Contender(settings, "b", lock, spans)
    try:
        await sole_leader([back], timeout=3.0)
    finally:
        await back.close()
