"""A transient failure of a stamp (``StampWorker._transient``) on real PostgreSQL: scheduled again on
``stamp.retry`` with the next attempt number, dead-lettered after the last; a stop of the worker's own
signing pool mid-signing is scheduled again without spending an attempt."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from services.kernel import errors
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
    the last attempt; nothing is dead-lettered for it and no attempt is recorded."""
    await _waiting(pool, "t2", status="stamping", deliveries=1)
    event, reserved, meta = _delivery("t2")
    worker = _worker(settings, pool, stopping=True)
    await worker._transient(event, meta=meta, reserved=reserved, exc=STOPPED)
    last = _at_attempt(event, settings.stamp_max_attempts)
    for _ in range(3):
        await worker._transient(last, meta=meta, reserved=reserved, exc=STOPPED)
    retry = settings.topic("stamp.retry")
    assert await _scheduled(pool, "t2") == [(retry, 1)] + [(retry, settings.stamp_max_attempts)] * 3
    assert await pool.fetchval("SELECT count(*) FROM attempts WHERE request_id = 't2'") == 0
    row = await pool.fetchrow("SELECT status, deliveries FROM requests WHERE request_id = 't2'")
    assert row["status"] == "reserved" and row["deliveries"] == 0     # nor a crash counted against the document
    # another cause while the pool stops (the TSA away) is the request's attempt as before
    await worker._transient(event, meta=meta, reserved=reserved,
                            exc=errors.BubuhError(errors.TSA_UNAVAILABLE, "tsa: connection refused"))
    assert (await _scheduled(pool, "t2"))[-1] == (retry, 2)
