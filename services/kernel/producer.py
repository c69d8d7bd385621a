"""The one way to write to Kafka: idempotent, acks=all, and awaited.

"Accepted means durable": a caller answers 202 only after ``publish`` returned, which is after
every in-sync replica has the record.

An idempotent producer can lose step with the broker (after a broker restart with batches in
flight, the broker answers OUT_OF_ORDER_SEQUENCE_NUMBER). aiokafka treats that as fatal: its
sender task ends and every later send fails the same way until the process restarts
(aio-libs/aiokafka#1017). ``Producer`` replaces the underlying producer instead: a new one gets a
new producer id, the caller sees ``UNAVAILABLE`` once and retries, and the consumers' inboxes
absorb any record the old producer did write.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from services.kernel import errors, partitioning
from services.kernel.events import Outgoing
from services.kernel.kafka_clients import build_producer
from services.kernel.metrics import PRODUCER_RENEWALS
from services.kernel.settings import Settings

log = structlog.get_logger("bubuh.producer")

BATCHED_FROM = 16      # publish_many hands over whole record batches from this many records on
PROBE_EVERY_S = 1.0    # while Kafka is away, one caller a second may still try (refuse_while_away)

# errors after which this producer id is unusable: the producer is replaced, not retried
FATAL_FOR_PRODUCER = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch,
                      InvalidProducerIdMapping, ProducerFenced)


class Producer:
    def __init__(self, settings: Settings, client_id: str = "bubuh") -> None:
        self._settings = settings
        self._client_id = client_id
        self._producer = self._new()
        self._generation = 0
        self._renewing = asyncio.Lock()
        self._retired: set[asyncio.Task] = set()
        self._timeout_s = settings.kafka_request_timeout_ms / 1000 * 2
        self._away_since: float | None = None     # the first failed publish since the last acknowledged one
        self._next_probe = 0.0

    def _new(self) -> AIOKafkaProducer:
        return build_producer(self._settings, client_id=self._client_id)

    @property
    def renewals(self) -> int:
        """How many times the underlying producer was replaced after a fatal error."""
        return self._generation

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()
        for task in list(self._retired):
            await asyncio.gather(task, return_exceptions=True)

    def refuse_while_away(self) -> None:
        """``UNAVAILABLE`` at once while Kafka is away: since a publish failed and none was acknowledged.

        A front door calls this before it does a request's work (store the document, write its row):
        with the broker restarting, each request otherwise did all of that, held its admission slot
        for the whole publish budget, and was refused anyway (the deadline-day run, README). One
        caller a second (``PROBE_EVERY_S`` after the last failure, or after the last probe let
        through) still goes through and publishes: the probe that finds Kafka back, after which
        everyone is let in again."""
        if self._away_since is None:
            return
        now = time.monotonic()
        if now >= self._next_probe:
            self._next_probe = now + PROBE_EVERY_S
            return
        raise errors.BubuhError(errors.UNAVAILABLE, f"Kafka has acknowledged nothing for {now - self._away_since:.0f} s"
                                                    "; the request was not accepted")

    async def publish(self, record: Outgoing, *, timeout_s: float | None = None) -> None:
        """Send and wait for the broker's acknowledgement; ``UNAVAILABLE`` when it does not come."""
        await self.publish_many([record], timeout_s=timeout_s)

    async def publish_many(self, records: list[Outgoing], *, timeout_s: float | None = None) -> None:
        """Send a batch and wait for every acknowledgement (the idempotent producer keeps key order).

        ``timeout_s`` (default: twice Kafka's request timeout) bounds the whole call, the sends too: with
        the broker away, ``send`` itself waits for metadata. A caller that answers someone (stamp intake)
        passes its own, shorter budget. After a timeout a record may still reach the broker later (it can
        sit in the producer's buffer): whoever retries sends the same event id, and consumers' inboxes
        drop the second copy."""
        producer, generation = self._producer, self._generation

        async def send_all() -> None:
            if len(records) >= BATCHED_FROM:
                futures = await self._send_batches(producer, records)
            else:
                futures = [await producer.send(r.topic, r.value, key=r.key, headers=r.headers) for r in records]
            await asyncio.gather(*futures)

        try:
            await asyncio.wait_for(send_all(), timeout=timeout_s or self._timeout_s)
        except (TimeoutError, KafkaError) as exc:
            if isinstance(exc, TimeoutError) or getattr(exc, "retriable", False):   # not a record refused as such
                self._away_since = self._away_since or time.monotonic()
                self._next_probe = time.monotonic() + PROBE_EVERY_S
            if isinstance(exc, FATAL_FOR_PRODUCER):
                await self._renew(generation, exc)
            raise errors.BubuhError(errors.UNAVAILABLE, f"Kafka did not acknowledge: {exc!r}") from exc
        self._away_since = None

    @staticmethod
    async def _send_batches(producer: AIOKafkaProducer, records: list[Outgoing]) -> list[asyncio.Future]:
        """Records grouped into record batches per partition, in order, handed over whole.

        What ``send`` does per record (metadata look-up, partitioner, a future and a callback each)
        was most of a relay's cost at hundreds of records per call. Each record goes to the partition
        ``send`` would choose (the same partitioner); a partition's batches are queued in order, and
        the idempotent producer numbers them when it drains them, as it does for ``send``'s batches.
        """
        futures: list[asyncio.Future] = []
        partitions: dict[str, tuple[list[int], list[int]]] = {}
        open_batches: dict[tuple[str, int], object] = {}
        for r in records:
            known = partitions.get(r.topic)
            if known is None:
                every = sorted(await producer.partitions_for(r.topic))
                available = list(producer.client.cluster.available_partitions_for_topic(r.topic) or ())
                known = partitions[r.topic] = (every, available)
            partition = partitioning.partitioner(r.key, *known)
            batch = open_batches.get((r.topic, partition))
            if batch is None:
                batch = open_batches[(r.topic, partition)] = producer.create_batch()
            if batch.append(timestamp=None, key=r.key, value=r.value, headers=r.headers) is None:
                # full: queue it, and go on in a new one (a record alone always fits an empty batch)
                futures.append(await producer.send_batch(batch, r.topic, partition=partition))
                batch = open_batches[(r.topic, partition)] = producer.create_batch()
                if batch.append(timestamp=None, key=r.key, value=r.value, headers=r.headers) is None:
                    raise errors.BubuhError(errors.EVENT_MALFORMED,
                                            f"a record of {len(r.value)} bytes does not fit a Kafka batch")
        for (topic, partition), batch in open_batches.items():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures

    async def _renew(self, generation: int, cause: BaseException) -> None:
        """Replace the producer that failed (once, however many callers saw it fail)."""
        async with self._renewing:
            if generation != self._generation:
                return                                  # another caller already replaced it
            fresh = self._new()
            try:
                await fresh.start()
            except KafkaError as exc:
                log.warning("kafka producer could not be replaced yet", cause=repr(cause), error=repr(exc))
                await fresh.stop()
                return                                  # the next failure tries again
            old, self._producer = self._producer, fresh
            self._generation += 1
            PRODUCER_RENEWALS.labels(self._client_id).inc()
            log.warning("kafka producer replaced after a fatal error", cause=repr(cause),
                        renewals=self._generation)
            task = asyncio.create_task(self._retire(old))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def _retire(self, old: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(old.stop(), timeout=self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - it already failed; its pending sends fail to their callers
            log.info("failed kafka producer stopped with an error", error=repr(exc))
