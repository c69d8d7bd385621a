"""A transient failure of a stamp (``StampWorker._transient``) on real PostgreSQL: scheduled again on
``stamp.retry`` with the next attempt number, dead-lettered after the last; a stop of the worker's own
signing pool mid-signing spends no attempt and keeps the request's place in the fair queue."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from services.kernel import errors, failures
from services.stamping.fair_queue import Enqueue, FairQueue, Takers
from services.stamping.serial import SerialIssuer
from services.stamping.worker import HEADER_ATTEMPT, StampWorker
from tests.component import handler_support as hs
from tests.component.test_stamp_start import _delivery, _waiting


@pytest.fixture
async def pool(settings):
    async with hs.service_pool(settings, "stamping", max_size=2) as pool:
        yield pool


class _Signing:
    """The worker's signing pool as far as a failure's cause goes: stopping, or not."""

    def __init__(self, stopping: bool) -> None:
        self.stopping = stopping


def _worker(settings, pool, *, stopping: bool) -> StampWorker:
    return StampWorker(settings, pool, documents=None, signing=_Signing(stopping), serials=SerialIssuer(7))


async def _scheduled(pool, rid: str) -> list[tuple[str, int]]:
    """(topic, attempt header) of each record the outbox holds for ``rid``."""
    rows = await pool.fetch("SELECT topic, key, headers FROM outbox ORDER BY id")
    out = []
    for r in rows:
        if bytes(r["key"]) == rid.encode():
            headers = dict(orjson.loads(r["headers"]))
            out.append((r["topic"], int(headers.get(HEADER_ATTEMPT, "0"))))
    return out


def _at_attempt(event, attempt: int):
    return dataclasses.replace(event, headers={**event.headers, HEADER_ATTEMPT: str(attempt).encode()})


STOPPED = errors.BubuhError(errors.UNAVAILABLE, "signing: the reader was stopped (exit -9), not by the document")


async def test_a_transient_failure_spends_an_attempt_and_the_last_one_dead_letters(settings, pool):
    await _waiting(pool, "t1", status="stamping", deliveries=1)
    event, reserved, meta = _delivery("t1")
    worker = _worker(settings, pool, stopping=False)
    await worker._transient(event, meta=meta, reserved=reserved, exc=STOPPED)
    assert await _scheduled(pool, "t1") == [(settings.topic("stamp.retry"), 2)]
    assert await pool.fetchval("SELECT count(*) FROM attempts WHERE request_id = 't1'") == 1
    last = _at_attempt(event, settings.stamp_max_attempts)
    await worker._transient(last, meta=meta, reserved=reserved, exc=STOPPED)
    assert (await _scheduled(pool, "t1"))[-1][0] == settings.topic("stamp.dead-letter")


async def test_a_stop_of_the_workers_own_signing_pool_spends_no_attempt(settings, pool):
    """``bubuh down`` mid-signing: the request comes back as it was, however often it happens, even at
    the last attempt; nothing is scheduled or dead-lettered for it and no attempt is recorded. The
    failure is raised (an outage of the worker's own) for the fair queue's taker to roll its claim back."""
    await _waiting(pool, "t2", status="stamping", deliveries=1)
    event, reserved, meta = _delivery("t2")
    worker = _worker(settings, pool, stopping=True)
    for ev in [event] + [_at_attempt(event, settings.stamp_max_attempts)] * 3:
        with pytest.raises(errors.BubuhError) as raised:
            await worker._transient(ev, meta=meta, reserved=reserved, exc=STOPPED)
        assert raised.value is STOPPED and failures.classify(raised.value).waits
    assert await _scheduled(pool, "t2") == []
    assert await pool.fetchval("SELECT count(*) FROM attempts WHERE request_id = 't2'") == 0
    row = await pool.fetchrow("SELECT status, deliveries FROM requests WHERE request_id = 't2'")
    assert row["status"] == "reserved" and row["deliveries"] == 0     # nor a crash counted against the document
    # another cause while the pool stops (the TSA away) is the request's attempt as before
    await worker._transient(event, meta=meta, reserved=reserved,
                            exc=errors.BubuhError(errors.TSA_UNAVAILABLE, "tsa: connection refused"))
    assert await _scheduled(pool, "t2") == [(settings.topic("stamp.retry"), 2)]


async def test_a_request_cut_short_by_its_workers_stop_keeps_its_place_in_the_fair_queue(settings, pool):
    """Before, it went round ``stamp.retry`` and joined its channel's line again at the back: a flood's
    request being signed at a restart was then behind the whole backlog its channel had queued since."""
    queue = FairQueue()
    first, *rest = [_delivery(f"q{i}")[0] for i in range(4)]
    for ev in [first, *rest]:
        await _waiting(pool, ev.payload.request_id)
    await Enqueue(pool, queue).process([first, *rest])
    place = await pool.fetchrow("SELECT start_tag, seq FROM schedule WHERE request_id = 'q0'")
    worker = _worker(settings, pool, stopping=True)

    async def signing_cut_short(event) -> None:
        _, reserved, meta = _delivery(event.payload.request_id)
        await worker._transient(event, meta=meta, reserved=reserved, exc=STOPPED)

    with pytest.raises(errors.BubuhError):
        await Takers(settings, pool, signing_cut_short, count=1, consumer="stamping.worker",
                     dead_letter_topic="stamp.dead-letter").take_one()
    assert await pool.fetchrow("SELECT start_tag, seq FROM schedule WHERE request_id = 'q0'") == place
    head = await pool.fetchval("SELECT request_id FROM schedule ORDER BY start_tag, seq LIMIT 1")
    assert head == "q0" and await pool.fetchval("SELECT count(*) FROM schedule") == 4
    assert await _scheduled(pool, "q0") == []
