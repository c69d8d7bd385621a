"""The kernel's consumer loop against the real broker and database: round trip, redelivery,
poison, and a broker restart in the middle of a stream."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from services.contracts.bubuh.v1 import purchase_pb2
from services.kernel import errors, events, kafka_auth, topics
from services.kernel.processing.deadletter import DLQ_REASON
from services.kernel.processing.handler import Transactional
from services.kernel.processing.pipeline import ConsumerLoop
from services.kernel.producer import Producer
from tests import stack

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS inbox (consumer text, event_id text, applied_at timestamptz DEFAULT now(),
                                  topic text, "partition" int, "offset" bigint, PRIMARY KEY (consumer, event_id));
CREATE TABLE IF NOT EXISTS applied (event_id text PRIMARY KEY, order_id text, quantity bigint);
CREATE TABLE IF NOT EXISTS effects (n bigint NOT NULL);
INSERT INTO effects SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM effects);
"""


class Harness:
    """A minimal service: applies PurchaseConfirmed events into a table, through the inbox."""

    def __init__(self, settings):
        self.settings = settings
        self.topic = settings.topic("smoke.events")
        self.dlq = settings.topic("smoke.dead-letter")
        self.schema = settings.schema("smoke")

    async def __aenter__(self):
        await topics.ensure(self.settings, (topics.Topic("smoke.events", "tests", "order", "PurchaseConfirmed", 3),
                                            topics.Topic("smoke.dead-letter", "tests", "-", "-", 1)))
        self.pool = await asyncpg.create_pool(self.settings.database_url, min_size=1, max_size=4,
                                              server_settings={"search_path": self.schema})
        async with self.pool.acquire() as conn:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(SCHEMA_SQL)
        self.producer = Producer(self.settings)
        await self.producer.start()
        self.stop = asyncio.Event()
        self.loop = ConsumerLoop(self.settings, self.producer, name="smoke", topics=[self.topic],
                                 handler=Transactional(self.pool, "smoke", self.apply), pool=self.pool,
                                 dead_letter_topic=self.dlq, max_batch=50)
        self.task = asyncio.create_task(self.loop.run(self.stop))
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 20)
        await self.producer.stop()
        await self.pool.close()

    async def apply(self, conn, batch: list[events.Event]) -> None:
        for event in batch:
            msg = event.payload
            await conn.execute("INSERT INTO applied VALUES ($1, $2, $3)", event.event_id,
                               msg.channel_order_id, msg.quantity)
            await conn.execute("UPDATE effects SET n = n + 1")

    def record(self, order: int, event_id: str | None = None):
        msg = purchase_pb2.PurchaseConfirmed(purchase_id=f"p{order}", channel_order_id=f"o{order}", quantity=order)
        env = events.envelope(msg, producer="tests", event_id=event_id)
        return events.outgoing(self.topic, f"o{order}", env)

    async def wait_applied(self, n: int, timeout: float = 60) -> None:
        async def _poll():
            while await self.pool.fetchval("SELECT count(*) FROM applied") < n:
                await asyncio.sleep(0.1)
        await asyncio.wait_for(_poll(), timeout)

    async def effects(self) -> int:
        return await self.pool.fetchval("SELECT n FROM effects")


async def test_event_round_trips_from_kafka_into_postgres(settings):
    async with Harness(settings) as h:
        rec = h.record(7)
        await h.producer.publish(rec)
        await h.wait_applied(1)
        row = await h.pool.fetchrow("SELECT * FROM applied")
        assert (row["event_id"], row["order_id"], row["quantity"]) == (rec.event_id, "o7", 7)


async def test_same_event_delivered_twice_leaves_one_row(settings):
    async with Harness(settings) as h:
        rec = h.record(1)
        await h.producer.publish(rec)
        await h.producer.publish(rec)          # a redelivery: same event id
        await h.producer.publish(h.record(2))  # a marker that both were read
        await h.wait_applied(2)
        await asyncio.sleep(0.5)
        assert await h.pool.fetchval("SELECT count(*) FROM applied WHERE event_id = $1", rec.event_id) == 1
        assert await h.effects() == 2


async def test_poison_goes_to_dead_letter_and_the_partition_moves_on(settings):
    async with Harness(settings) as h:
        await h.producer.publish(events.Outgoing(topic=h.topic, key=b"o1", value=b"\x00not a protobuf envelope"))
        good = h.record(1)
        await h.producer.publish(events.Outgoing(topic=h.topic, key=b"o1", value=good.value, headers=good.headers,
                                                 event_id=good.event_id))
        await h.wait_applied(1)
        from aiokafka import AIOKafkaConsumer
        c = AIOKafkaConsumer(h.dlq, **kafka_auth.aiokafka_options(settings), auto_offset_reset="earliest")
        await c.start()
        try:
            rec = await asyncio.wait_for(c.getone(), 20)
        finally:
            await c.stop()
        assert dict(rec.headers)[DLQ_REASON].decode() == errors.EVENT_MALFORMED.code
        assert rec.value == b"\x00not a protobuf envelope"


async def test_broker_restart_mid_stream_loses_nothing_and_applies_nothing_twice(settings, tmp_path):
    if not stack.managed_kafka():
        pytest.skip("needs the local stack's Kafka scripts and jars")
    total = 400
    broker = stack.OwnKafka(tmp_path)      # a broker of its own: restarting it stops no other test
    await asyncio.to_thread(broker.start)
    try:
        await _restart_mid_stream(broker, broker.settings(settings, as_admin=True), total)
    finally:
        await asyncio.to_thread(broker.stop)


async def _restart_mid_stream(broker: stack.OwnKafka, settings, total: int) -> None:
    async with Harness(settings) as h:
        await asyncio.wait_for(h.loop.ready.wait(), 30)

        async def publish_all():
            # like a channel: retry each record (same event id) until Kafka acknowledges it
            for i in range(total):
                rec = h.record(i)
                while True:
                    try:
                        await h.producer.publish(rec)
                        break
                    except errors.BubuhError:
                        await asyncio.sleep(0.5)
                await asyncio.sleep(0.005)

        publisher = asyncio.create_task(publish_all())
        await h.wait_applied(50)
        before = broker.pid()
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(3)
        await asyncio.to_thread(broker.start)
        assert broker.pid() != before, "the broker was not restarted"
        await asyncio.wait_for(publisher, 180)
        await h.wait_applied(total, timeout=180)
        await asyncio.sleep(1)
        assert await h.pool.fetchval("SELECT count(DISTINCT order_id) FROM applied") == total
        assert await h.effects() == await h.pool.fetchval("SELECT count(*) FROM applied")
