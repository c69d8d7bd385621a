"""``KafkaSource`` keeps the source contract (tests/contracts/source_contract.py) on the local broker.

Each check gets topics of its own (``isolated_settings`` prefix + ``topics.ensure``) and groups of
its own, so the checks do not see each other's records or members.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import IllegalStateError

from services.kernel import kafka_auth, topics
from services.kernel.processing.kafka_source import KafkaSource
from services.kernel.processing.source import TopicPartition
from tests.contracts import source_contract as contract


class KafkaBackend:
    patience_s = 30.0

    def __init__(self, settings) -> None:
        self.settings = settings
        self._names = itertools.count()
        self._sources: list[KafkaSource] = []
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None

    async def topic(self, partitions: int) -> str:
        name = f"contract.{next(self._names)}"
        await topics.ensure(self.settings, (topics.Topic(name, "tests", "-", "-", partitions),))
        return self.settings.topic(name)

    def group(self) -> str:
        return self.settings.group(f"contract-{uuid.uuid4().hex[:8]}")

    def source(self, group: str, topic_names: list[str], *, max_batch: int = 500) -> KafkaSource:
        source = KafkaSource(self.settings, topic_names, group_id=group,
                             client_id=f"contract-{len(self._sources)}", max_batch=max_batch)
        self._sources.append(source)
        return source

    async def append(self, topic: str, partition: int, values: Sequence[bytes]) -> list[int]:
        if self._producer is None:
            self._producer = AIOKafkaProducer(**kafka_auth.aiokafka_options(self.settings), acks="all")
            await self._producer.start()
        futures = [await self._producer.send(topic, v, partition=partition) for v in values]
        return [(await f).offset for f in futures]

    async def committed(self, group: str, tp: TopicPartition) -> int | None:
        if self._admin is None:
            self._admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(self.settings))
            await self._admin.start()
        found = await self._admin.list_consumer_group_offsets(group, partitions=[tp])
        meta = found.get(tp)
        return None if meta is None or meta.offset < 0 else meta.offset

    async def close(self) -> None:
        for source in self._sources:       # a check that failed half-way leaves members behind
            try:
                await source.stop()
            except Exception:  # noqa: BLE001, S110 - already stopped
                pass
        if self._producer is not None:
            await self._producer.stop()
        if self._admin is not None:
            await self._admin.close()


@pytest.fixture
async def kafka(settings):
    backend = KafkaBackend(settings)
    yield backend
    await backend.close()


@pytest.mark.parametrize("check", contract.CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
async def test_kafka_source_keeps_the_contract(kafka, check):
    await check(kafka)


async def test_what_a_commit_for_a_lost_partition_does_on_kafka(kafka):
    """What actually happens on Kafka, beneath ``KafkaSource.commit``'s False.

    A member cannot be handed a partition's loss without rejoining (the eager protocol waits for
    every member before the new generation starts), so by the time it commits it already holds its
    new assignment, and aiokafka refuses the request locally: ``IllegalStateError`` "Partition ...
    is not assigned", for the whole request, before anything is sent. (A member the group expelled,
    say after a freeze longer than the session timeout, gets ``CommitFailedError`` from the broker
    instead; ``KafkaSource`` answers False to both.)
    """
    topic, group = await kafka.topic(4), kafka.group()
    tps = [TopicPartition(topic, p) for p in range(4)]
    for p in range(4):
        await kafka.append(topic, p, [b"x"])
    a = contract.Reader(kafka.source(group, [topic]))
    await a.source.start()
    await contract.pump([a], lambda: len(a.got) >= 4, kafka.patience_s, what="4 records")
    other = contract.Reader(kafka.source(group, [topic]))
    await other.source.start()
    await contract.pump([a, other], contract.settled([a, other], tps), kafka.patience_s, what="two members")
    lost = sorted(set(tps) - a.source.assignment())
    with pytest.raises(IllegalStateError, match="not assigned"):
        await a.source._consumer.commit({tp: 1 for tp in lost})
    assert [await kafka.committed(group, tp) for tp in tps] == [None] * 4
