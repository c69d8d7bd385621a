"""The one way to write to Kafka: idempotent, acks=all, and awaited.

"Accepted means durable": a caller answers 202 only after ``publish`` returned, which is after
every in-sync replica has the record.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.kernel import errors
from services.kernel.events import Outgoing
from services.kernel.settings import Settings


class Producer:
    def __init__(self, settings: Settings, client_id: str = "bubuh") -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=settings.producer_linger_ms,
            request_timeout_ms=settings.kafka_request_timeout_ms,
            max_request_size=16 * 1024 * 1024,
        )
        self._timeout_s = settings.kafka_request_timeout_ms / 1000 * 2

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, record: Outgoing) -> None:
        """Send and wait for the broker's acknowledgement; ``UNAVAILABLE`` when it does not come."""
        await self.publish_many([record])

    async def publish_many(self, records: list[Outgoing]) -> None:
        """Send a batch and wait for every acknowledgement (the idempotent producer keeps key order)."""
        try:
            futures = [
                await self._producer.send(r.topic, r.value, key=r.key, headers=r.headers) for r in records
            ]
            await asyncio.wait_for(asyncio.gather(*futures), timeout=self._timeout_s)
        except (TimeoutError, KafkaError) as exc:
            raise errors.BubuhError(errors.UNAVAILABLE, f"Kafka did not acknowledge: {exc!r}") from exc
