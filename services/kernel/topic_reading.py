"""Reading a whole topic up to where it ends now, without a consumer group's partition assignment.

The channel view reads the compacted ``channel`` topic to its end before it says it is loaded, and
``bubuh replay`` reads a dead-letter topic up to the entries present when it started. Both take
every partition of the topic (``whole_topic``) and compare their positions with the end offsets
taken once (``TopicEnd``): records published later are beyond that end.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.kernel.processing.kafka_source import partitions_of
from services.kernel.waiting import sleep_or_stop


async def whole_topic(consumer: AIOKafkaConsumer, topic: str, *, stop: asyncio.Event | None = None,
                      poll_s: float = 0.5) -> list[TopicPartition]:
    """Assign every partition of ``topic`` to ``consumer`` (no group). A topic that does not exist yet
    is waited for while ``stop`` is given and not set; without ``stop`` it gives [] at once."""
    parts = await partitions_of(consumer, topic)
    while parts is None and stop is not None and not await sleep_or_stop(stop, poll_s):
        parts = await partitions_of(consumer, topic)  # the topic may be brand new
    tps = [TopicPartition(topic, p) for p in sorted(parts or ())]
    if tps:
        consumer.assign(tps)
    return tps


class TopicEnd:
    """The end offsets of some partitions at one moment, and how far a consumer is from them."""

    def __init__(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        self._consumer = consumer
        self.offsets = offsets

    @classmethod
    async def now(cls, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> TopicEnd:
        return cls(consumer, await consumer.end_offsets(tps) if tps else {})

    @property
    def empty(self) -> bool:
        """Nothing was ever written to these partitions."""
        return all(v == 0 for v in self.offsets.values())

    def beyond(self, tp: TopicPartition, offset: int) -> bool:
        """A record at ``offset`` came after the end was taken."""
        return offset >= self.offsets[tp]

    async def remaining(self) -> int:
        """Records between the consumer's positions and the end."""
        return sum([max(0, end - await self._consumer.position(tp)) for tp, end in self.offsets.items()])

    async def reached(self) -> bool:
        return await self.remaining() == 0
