"""The quota ledger: concurrency across instances, expiry, and refusing what must not apply."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services.kernel import kafka_auth, topics
from services.kernel.producer import Producer
from tests.flows import (
    Db,
    account_quota,
    credited_quota,
    decoded,
    order_body,
    post_until_accepted,
    read_topic,
    stamp_outcome,
    stamp_requested,
    wait_for,
)
from tests.platform import PlatformProcess, add_channel

# the stamping worker would answer the tests' own stamp requests (and fail them: no stored document)
LEDGER_ONLY = "purchase,quota"


async def _group_members(settings, group: str) -> int:
    admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(settings))
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([settings.group(group)])
    finally:
        await admin.close()
    return len(described[0].groups[0][-1]) if described and described[0].groups else 0


async def test_200_concurrent_reservations_against_50_units_on_two_instances(settings):
    front = await PlatformProcess(settings, api="all", workers="purchase", name="front").start()
    quotas = [await PlatformProcess(settings, api="none", workers="quota", name=f"quota-{i}").start()
              for i in range(2)]
    channel = add_channel(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as api:
            await post_until_accepted(api, channel, order_body(quantity=50, account="surge"))
            await wait_for(lambda: credited_quota(api, channel, "surge"), what="credit")
            await wait_for(lambda: _members_are(settings, 2), what="two quota members in the group")
            producer = Producer(settings)
            await producer.start()
            try:
                await asyncio.gather(*(producer.publish(stamp_requested(settings, channel["channel_id"], "surge"))
                                       for _ in range(200)))
            finally:
                await producer.stop()
            outcomes = await read_topic(settings, topics.QUOTA_EVENTS.name, at_least=201, timeout=60, settle=1.5)
            kinds = [type(m).__name__ for m in decoded(outcomes)]
            assert kinds.count("QuotaReserved") == 50
            assert kinds.count("QuotaRejected") == 150
            assert {m.code for m in decoded(outcomes) if type(m).__name__ == "QuotaRejected"} == {"QUOTA_INSUFFICIENT"}
            bal = await account_quota(api, channel, "surge")
            assert bal == {"account_id": "surge", "credited": 50, "pending": 50, "committed": 0, "available": 0}
    finally:
        for p in quotas + [front]:
            await p.stop()


async def _members_are(settings, n):
    return await _group_members(settings, "quota.ledger") == n


async def test_expired_reservation_is_voided_and_a_late_commit_is_refused(settings):
    proc = await PlatformProcess(settings, workers=LEDGER_ONLY, BUBUH_RESERVATION_TTL_S=2,
                                 BUBUH_EXPIRY_INTERVAL_S=0.3).start()
    channel = add_channel(settings)
    db = Db(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as api:
            await post_until_accepted(api, channel, order_body(quantity=2, account="slow"))
            await wait_for(lambda: credited_quota(api, channel, "slow"), what="credit")
            producer = Producer(settings)
            await producer.start()
            try:
                late_id, on_time_id = str(uuid.uuid4()), str(uuid.uuid4())
                late = stamp_requested(settings, channel["channel_id"], "slow", late_id)
                on_time = stamp_requested(settings, channel["channel_id"], "slow", on_time_id)
                await producer.publish(late)
                await producer.publish(on_time)
                await wait_for(lambda: _pending_is(api, channel, 2), what="two reservations")
                await producer.publish(stamp_outcome(settings, channel["channel_id"], "slow", on_time_id,
                                                     completed=True))
                await wait_for(lambda: _pending_is(api, channel, 0), timeout=20, what="expiry of the other")
                await producer.publish(stamp_outcome(settings, channel["channel_id"], "slow", late_id, completed=True))
            finally:
                await producer.stop()
            evs = decoded(await read_topic(settings, topics.QUOTA_EVENTS.name, at_least=6, timeout=30, settle=1))
            released = [m for m in evs if type(m).__name__ == "QuotaReleased"]
            assert [(m.request_id, m.code) for m in released] == [(late_id, "RESERVATION_EXPIRED")]
            refused = [m for m in evs if type(m).__name__ == "QuotaRefused"]
            assert [(m.request_id, m.operation, m.code) for m in refused] == [(late_id, "commit", "RESERVATION_VOIDED")]
            bal = await account_quota(api, channel, "slow")
            assert bal == {"account_id": "slow", "credited": 2, "pending": 0, "committed": 1, "available": 1}
            kinds = await db.fetch("quota", "SELECT kind FROM transfers WHERE pending_id = $1", late_id)
            assert [r["kind"] for r in kinds] == ["void"]
    finally:
        await proc.stop()


async def _pending_is(api, channel, n, account="slow"):
    bal = await account_quota(api, channel, account)
    return bal is not None and bal["pending"] == n


@pytest.fixture
async def ledger_api(settings):
    """The platform without stamping workers: these tests play the stamping service themselves."""
    proc = await PlatformProcess(settings, workers=LEDGER_ONLY).start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as client:
        yield client
    await proc.stop()


async def test_release_returns_the_unit_and_redelivered_outcomes_change_nothing(ledger_api, channel, settings):
    api = ledger_api
    await post_until_accepted(api, channel, order_body(quantity=3, account="r"))
    await wait_for(lambda: credited_quota(api, channel, "r"), what="credit")
    producer = Producer(settings)
    await producer.start()
    try:
        a_id, b_id = str(uuid.uuid4()), str(uuid.uuid4())
        a, b = (stamp_requested(settings, channel["channel_id"], "r", rid) for rid in (a_id, b_id))
        for rec in (a, a, b):       # a delivered twice: one reservation
            await producer.publish(rec)
        # outcomes follow reservations, as in the real flow (the worker acts on QuotaReserved); the two
        # topics are not ordered against each other, so wait rather than race them
        await wait_for(lambda: _pending_is(api, channel, 2, "r"), what="two reservations")
        done = stamp_outcome(settings, channel["channel_id"], "r", a_id, completed=True)
        failed = stamp_outcome(settings, channel["channel_id"], "r", b_id, completed=False)
        for rec in (done, done, failed, failed):
            await producer.publish(rec)
        # a release after a commit must not give the unit back
        await producer.publish(stamp_outcome(settings, channel["channel_id"], "r", a_id, completed=False))
    finally:
        await producer.stop()
    await wait_for(lambda: _committed(api, channel), what="commit")
    await asyncio.sleep(1.0)
    assert await account_quota(api, channel, "r") == {"account_id": "r", "credited": 3, "pending": 0, "committed": 1,
                                                 "available": 2}


async def _committed(api, channel):
    bal = await account_quota(api, channel, "r")
    return bal and bal["committed"] == 1 and bal["pending"] == 0


async def test_a_worker_only_process_serves_its_metrics(settings):
    from tests.platform import free_port
    port = free_port()
    proc = await PlatformProcess(settings, api="none", workers="quota", name="metrics",
                                 BUBUH_METRICS_PORT=port).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            async def scraped():
                r = await client.get("/metrics")
                return r.status_code == 200 and "bubuh_consumer_lag_records" in r.text
            await wait_for(scraped, what="lag metric of the quota consumer")
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            assert (await client.get("/v1/accounts/x/quota")).status_code == 404   # no API routes here
    finally:
        await proc.stop()
