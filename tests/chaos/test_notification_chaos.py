"""Webhooks are delivered at least once while the notification service is killed mid-burst.

SIGKILL leaves claimed deliveries leased, Kafka offsets uncommitted and requests half-sent; after a
restart every event still reaches the receiver, and a duplicate is the same event (same id, same
body), so a receiver that de-duplicates on the event id sees each event once.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from services.kernel.producer import Producer
from tests.flows import Db, wait_for
from tests.integration.test_notification_support import Receiver, stamp_completed
from tests.platform import PlatformProcess, add_channel

pytestmark = pytest.mark.slow


async def test_notification_killed_twice_mid_burst_delivers_every_event_at_least_once(settings):
    async def slowish(_hit) -> int:
        await asyncio.sleep(0.02)      # slow enough that a kill always finds requests in flight
        return 200

    receiver = await Receiver(slowish).start()
    channel = add_channel(settings, "burst", webhook=receiver.url)
    notification = PlatformProcess(settings, api="none", workers="notification", name="notification",
                                   BUBUH_WEBHOOK_TIMEOUT_S=2, BUBUH_WEBHOOK_LEASE_S=3,
                                   BUBUH_WEBHOOK_BACKOFF_BASE_S=0.2)
    await notification.start()
    db = Db(settings)
    records = [stamp_completed(settings, channel["channel_id"], account=f"acct-{i % 7}") for i in range(400)]
    try:
        async def burst():
            producer = Producer(settings)
            await producer.start()
            try:
                for i in range(0, len(records), 50):
                    await producer.publish_many(records[i:i + 50])
                    await asyncio.sleep(0.3)
            finally:
                await producer.stop()
        flow = asyncio.create_task(burst())
        rng = random.Random()
        kills = []
        for threshold in (60, 200):
            await wait_for(lambda t=threshold: _ready(len(receiver.hits) >= t), timeout=30,
                           what=f"{threshold} requests before the kill")
            await asyncio.sleep(rng.uniform(0, 0.2))
            kills.append((len(receiver.hits), receiver.open_now))
            notification.kill()
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await notification.start()
        await flow
        published = {r.event_id for r in records}
        await wait_for(lambda: _ready({h.event_id for h in receiver.ok()} >= published), timeout=60,
                       what="every event delivered after the restarts")

        ok_ids = [h.event_id for h in receiver.ok()]
        assert set(ok_ids) == published
        bodies: dict[str, bytes] = {}
        for hit in receiver.hits:
            assert hit.json["id"] == hit.event_id                   # the duplicate names the same event
            assert bodies.setdefault(hit.event_id, hit.body) == hit.body
        assert set(bodies) == published                             # and nothing that was not published

        async def all_delivered():
            return await db.val("notification", "SELECT count(*) FROM deliveries WHERE status = 'delivered'") == 400
        await wait_for(all_delivered, timeout=15, what="every delivery recorded as delivered")
        assert await db.val("notification", "SELECT count(*) FROM deliveries") == 400
        duplicates = len(ok_ids) - len(set(ok_ids))
        print(f"kills at (hits, in flight) {kills}; {len(receiver.hits)} requests, {duplicates} duplicate deliveries")
    finally:
        await notification.stop()
        await receiver.stop()


async def _ready(value):
    return value
