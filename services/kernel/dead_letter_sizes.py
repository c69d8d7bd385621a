"""How many records each dead-letter topic holds, read from Kafka itself (no exporter needed).

A process measures the dead-letter topics of the services whose workers it runs (each service's
principal may read its own), every ``interval_s``: the sum over partitions of end minus start offset.
Replay reads a dead letter without removing it, so this is what the topic retains, not what is left
to fix: its growth is the signal (a counter of dead letters written resets with its process; this
does not). Off the processing path: a failed reading leaves the last value and tries again.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.kernel import logs, topics
from services.kernel.kafka_clients import build_admin, build_consumer
from services.kernel.metrics import DEAD_LETTER_TOPIC_RECORDS
from services.kernel.settings import Settings
from services.kernel.waiting import sleep_or_stop

log = logs.get(__name__)

_DEAD_LETTERS = (topics.PURCHASE_DLQ, topics.QUOTA_DLQ, topics.STAMP_DLQ, topics.NOTIFICATION_DLQ)


def owned_by(services: list[str]) -> list[topics.Topic]:
    return [t for t in _DEAD_LETTERS if t.owner in services]


class DeadLetterSizes:
    def __init__(self, settings: Settings, services: list[str], interval_s: float = 10.0) -> None:
        self._settings = settings
        self._topics = owned_by(services)
        self._interval_s = interval_s

    async def read(self, admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer) -> None:
        names = {self._settings.topic(t.name): t.name for t in self._topics}
        described = await asyncio.wait_for(admin.describe_topics(sorted(names)), 10)
        for d in described:
            if d.get("error_code"):
                continue
            tps = [TopicPartition(d["topic"], p["partition"]) for p in d["partitions"]]
            if not tps:
                continue
            start = await asyncio.wait_for(consumer.beginning_offsets(tps), 10)
            end = await asyncio.wait_for(consumer.end_offsets(tps), 10)
            DEAD_LETTER_TOPIC_RECORDS.labels(names[d["topic"]]).set(sum(end[tp] - start[tp] for tp in tps))

    async def run(self, stop: asyncio.Event) -> None:
        if not self._topics:
            return
        admin = build_admin(self._settings, client_id="bubuh-dead-letter-sizes")
        consumer = build_consumer(self._settings, group_id=None, client_id="bubuh-dead-letter-sizes")
        admin_started = consumer_started = False
        try:
            # not at start-up: the consumers wait for the broker to coordinate their groups first, and
            # the first reading has nothing to say before them
            while not await sleep_or_stop(stop, self._interval_s):
                try:
                    if not admin_started:
                        await admin.start()
                        admin_started = True
                    if not consumer_started:
                        await consumer.start()
                        consumer_started = True
                    await self.read(admin, consumer)
                except Exception as exc:  # noqa: BLE001 - Kafka away: the gauges keep their last reading
                    log.warning("dead-letter topic sizes skipped", error=repr(exc))
        finally:
            if consumer_started:
                await consumer.stop()
            if admin_started:
                await admin.close()
