"""The start of a stamp delivery (``StampWorker.start_delivery``) on real PostgreSQL: the delivery counted and
the SN issued before any signing, in one statement for the usual delivery, and each other case (missing
row, past signing, deadline passed, poison, replay, an SN collision) decided as before."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from google.protobuf import timestamp_pb2

from services.contracts.bubuh.v1 import quota_pb2, stamp_pb2
from services.kernel import errors
from services.kernel.processing.pipeline import HEADER_REPLAY
from services.stamping import serial
from services.stamping.serial import SerialIssuer
from services.stamping.worker import StampWorker
from tests.component import handler_support as hs

CLOCK_NS = 1_800_000_000_000_000_000       # a fixed clock: twin issuers draw the same SNs


@pytest.fixture
async def pool(settings):
    async with hs.service_pool(settings, "stamping", max_size=1) as pool:   # one connection: its statements seen
        yield pool


def _ts(when: dt.datetime) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(when)
    return t


def _delivery(rid: str, *, deadline_in_s: float = 600, replay: bool = False):
    now = dt.datetime.now(dt.UTC)
    reserved = quota_pb2.QuotaReserved(request_id=rid, channel_id="ch", account_id="acct",
                                       deadline=_ts(now + dt.timedelta(seconds=deadline_in_s)))
    event = hs.event(reserved, producer="quota", topic="quota.events")
    if replay:
        event = dataclasses.replace(event, headers={**event.headers, HEADER_REPLAY: b"1"})
    meta = stamp_pb2.StampRequested(request_id=rid, channel_id="ch", account_id="acct", document_sha256="ab" * 32,
                                    accepted_at=_ts(now - dt.timedelta(seconds=30)), email="a@example.test")
    return event, reserved, meta


def _worker(settings, pool, issuer: SerialIssuer | None = None) -> StampWorker:
    return StampWorker(settings, pool, documents=None, signing=None, serials=issuer or SerialIssuer(7))


async def _row(pool, rid: str):
    return await pool.fetchrow("SELECT status, sn, deliveries, code, reserved_at, started_at, accepted_at "
                               "FROM requests WHERE request_id = $1", rid)


async def _waiting(pool, rid: str, status: str = "reserved", **cols) -> None:
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, deliveries, sn) "
                       "VALUES ($1, 'ch', 'acct', $2, $3, $4)", rid, status, cols.get("deliveries", 0),
                       cols.get("sn"))


async def _failed_events(pool) -> list:
    return [m for _, m in await hs.outbox(pool) if isinstance(m, stamp_pb2.StampFailed)]


async def test_the_usual_delivery_is_one_statement_and_a_redelivery_keeps_its_sn(settings, pool):
    await _waiting(pool, "r1")
    worker = _worker(settings, pool)
    sent: list[str] = []

    def log(q) -> None:
        sent.append(q.query)

    async with pool.acquire() as conn:
        conn.add_query_logger(log)
    try:
        sn = await worker.start_delivery(*_delivery("r1"))
    finally:
        async with pool.acquire() as conn:
            conn.remove_query_logger(log)
    assert len(sent) == 1, sent
    assert serial.is_valid(sn)
    row = await _row(pool, "r1")
    assert (row["status"], row["sn"], row["deliveries"]) == ("stamping", sn, 1)
    assert row["reserved_at"] is not None and row["started_at"] is not None
    assert await worker.start_delivery(*_delivery("r1")) == sn             # a worker killed mid-signing: same SN
    assert (await _row(pool, "r1"))["deliveries"] == 2
    assert await hs.outbox(pool) == []


async def test_a_document_that_stopped_its_worker_too_often_fails_once(settings, pool):
    await _waiting(pool, "poison")
    worker = _worker(settings, pool)
    sns = {await worker.start_delivery(*_delivery("poison")) for _ in range(settings.stamp_max_deliveries)}
    assert len(sns) == 1 and None not in sns
    assert await worker.start_delivery(*_delivery("poison")) is None
    assert await worker.start_delivery(*_delivery("poison")) is None
    row = await _row(pool, "poison")
    assert (row["status"], row["code"], row["deliveries"]) == ("failed", errors.SIGNING_FAILED.code, 3)
    [failed] = await _failed_events(pool)
    assert (failed.request_id, failed.code, failed.email) == ("poison", errors.SIGNING_FAILED.code, "a@example.test")


async def test_a_replay_starts_the_count_again_with_the_same_sn(settings, pool):
    await _waiting(pool, "dl", status="dead_lettered", deliveries=3, sn=None)
    worker = _worker(settings, pool)
    assert await worker.start_delivery(*_delivery("dl")) is None          # without the replay header: poison
    await pool.execute("UPDATE requests SET status = 'dead_lettered', code = NULL WHERE request_id = 'dl'")
    await pool.execute("DELETE FROM outbox")
    sn = await worker.start_delivery(*_delivery("dl", replay=True))
    row = await _row(pool, "dl")
    assert (row["status"], row["deliveries"], row["sn"]) == ("stamping", 1, sn)


async def test_a_reservation_past_its_deadline_spends_no_sn(settings, pool):
    await _waiting(pool, "late")
    assert await _worker(settings, pool).start_delivery(*_delivery("late", deadline_in_s=-1)) is None
    row = await _row(pool, "late")
    assert (row["status"], row["code"], row["sn"], row["deliveries"]) == (
        "failed", errors.RESERVATION_EXPIRED.code, None, 0)
    assert [m.code for m in await _failed_events(pool)] == [errors.RESERVATION_EXPIRED.code]


@pytest.mark.parametrize("status", ["signed", "completed", "failed"])
async def test_a_request_past_signing_is_left_as_it_is(settings, pool, status):
    await _waiting(pool, "past", status=status, deliveries=1, sn="1SNOFANEARLIERDELIVERY")
    assert await _worker(settings, pool).start_delivery(*_delivery("past")) is None
    row = await _row(pool, "past")
    assert (row["status"], row["sn"], row["deliveries"]) == (status, "1SNOFANEARLIERDELIVERY", 1)
    assert await hs.outbox(pool) == []


async def test_a_request_accepted_while_the_database_was_away_gets_its_row_and_starts(settings, pool):
    event, reserved, meta = _delivery("no-row")
    sn = await _worker(settings, pool).start_delivery(event, reserved, meta)
    row = await _row(pool, "no-row")
    assert (row["status"], row["sn"], row["deliveries"]) == ("stamping", sn, 1)
    assert row["accepted_at"] == meta.accepted_at.ToDatetime(tzinfo=dt.UTC)     # as intake accepted it


async def test_an_sn_another_request_holds_is_drawn_again(settings, pool):
    twin = SerialIssuer(9, clock=lambda: CLOCK_NS, salt=1)
    taken = twin.next()
    await _waiting(pool, "holder", status="completed", sn=taken)
    await _waiting(pool, "newcomer")
    sn = await _worker(settings, pool, SerialIssuer(9, clock=lambda: CLOCK_NS, salt=1)).start_delivery(
        *_delivery("newcomer"))
    assert sn is not None and sn != taken and serial.is_valid(sn)
    assert (await _row(pool, "newcomer"))["sn"] == sn
