"""The consumer loop every service runs: decode, handle, dead-letter poison, commit after the work.

Why it looks like this:
- Offsets are committed only after the records before them were handled (manual commit), so a
  killed process re-reads, and the inbox turns the re-read into a no-op.
- Back-pressure is the fetch itself: the next batch is fetched only when the current one is done,
  so at most ``max_batch`` records are in memory, whatever the lag.
- Records of one partition are handled in order; partitions of a batch run concurrently.
- Three kinds of failure, three answers:
  * the record is bad (undecodable, forged, a ``BubuhError`` from the handler, a crash): it goes to
    the dead-letter topic with its reason and the partition moves on (invariant 5);
  * a dependency is down (``database.is_outage``): the partition is rewound to that record and the
    consumer pauses with backoff, polling to keep its group membership, and resumes where it was;
  * a transient failure of this record alone: the handler schedules a durable retry itself
    (``retry.py``) and returns; nothing sleeps here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from services.kernel import database, errors, events, logs, tracing
from services.kernel.events import Event, Outgoing
from services.kernel.metrics import CONSUMED, DEAD_LETTERED, HANDLE_SECONDS, LAG, OUTAGE_PAUSES
from services.kernel.producer import Producer
from services.kernel.settings import Settings

log = logs.get(__name__)

Handler = Callable[[Event], Awaitable[None]]
RawHandler = Callable[[ConsumerRecord], Awaitable[None]]

DLQ_REASON = "bubuh-dlq-reason"
DLQ_DETAIL = "bubuh-dlq-detail"
DLQ_SOURCE = "bubuh-dlq-source"
DLQ_CONSUMER = "bubuh-dlq-consumer"
DLQ_AT = "bubuh-dlq-at"


class _Outage(Exception):
    """A dependency outage on the record at ``offset``."""

    def __init__(self, offset: int, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.offset = offset
        self.cause = cause


def dead_letter_headers(headers, *, code: str, detail: str, source: str, consumer: str,
                        extra: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    """The original headers (minus earlier ``bubuh-dlq-*``) with the reason, where from, who, when."""
    kept = [(k, v) for k, v in headers if not k.startswith("bubuh-dlq-")]
    return kept + [
        (DLQ_REASON, code.encode()),
        (DLQ_DETAIL, detail[:2000].encode()),
        (DLQ_SOURCE, source.encode()),
        (DLQ_CONSUMER, consumer.encode()),
        (DLQ_AT, dt.datetime.now(dt.UTC).isoformat().encode()),
    ] + (extra or [])


def dead_letter_record(record: ConsumerRecord, dlq_topic: str, consumer: str, code: str,
                       detail: str) -> Outgoing:
    """The original record, unchanged, with the reason in ``bubuh-dlq-*`` headers (replayable as is)."""
    headers = dead_letter_headers(record.headers or (), code=code, detail=detail, consumer=consumer,
                                  source=f"{record.topic}/{record.partition}/{record.offset}")
    return Outgoing(topic=dlq_topic, key=record.key, value=record.value or b"", headers=headers)


class ConsumerLoop:
    def __init__(self, settings: Settings, producer: Producer, *, name: str, topics: list[str],
                 handler: Handler, dead_letter_topic: str, max_batch: int | None = None,
                 group_id: str | None = None) -> None:
        self.name = name
        self._settings = settings
        self._producer = producer
        self._topics = topics
        self._handler = handler
        self._dlq = dead_letter_topic
        self._max_batch = max_batch or settings.consumer_max_batch
        self._group = group_id or settings.group(name)
        self._consumer: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()   # set once the group assigned this member its partitions

    def _make_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            *self._topics,
            bootstrap_servers=self._settings.kafka_bootstrap,
            group_id=self._group,
            client_id=f"bubuh-{self.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self._max_batch,
            request_timeout_ms=self._settings.kafka_request_timeout_ms * 2,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            max_poll_interval_ms=300_000,
            metadata_max_age_ms=30_000,
        )

    async def run(self, stop: asyncio.Event) -> None:
        consumer = self._consumer = self._make_consumer()
        await consumer.start()
        log.info("consumer started", consumer=self.name, topics=self._topics, group=self._group)
        backoff = 0.2
        try:
            while not stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=300, max_records=self._max_batch)
                except KafkaError as exc:
                    log.warning("fetch failed", consumer=self.name, error=repr(exc))
                    await asyncio.sleep(0.5)
                    continue
                if consumer.assignment():
                    self.ready.set()
                if not batches:
                    continue
                outages = await self._handle_batch(consumer, batches)
                if outages:
                    OUTAGE_PAUSES.labels(self.name).inc()
                    log.warning("dependency outage: pausing", consumer=self.name, backoff_s=backoff,
                                error=repr(outages[0].cause))
                    await self._pause(consumer, stop, backoff)
                    backoff = min(backoff * 2, 5.0)
                else:
                    backoff = 0.2
                await self._report_lag(consumer)
        finally:
            await consumer.stop()
            log.info("consumer stopped", consumer=self.name)

    async def _handle_batch(self, consumer: AIOKafkaConsumer,
                            batches: dict[TopicPartition, list[ConsumerRecord]]) -> list[_Outage]:
        tps = list(batches)
        results = await asyncio.gather(*(self._handle_partition(batches[tp]) for tp in tps),
                                       return_exceptions=True)
        commits: dict[TopicPartition, int] = {}
        outages: list[_Outage] = []
        for tp, result in zip(tps, results, strict=True):
            if isinstance(result, _Outage):
                outages.append(result)
                consumer.seek(tp, result.offset)
                if result.offset > batches[tp][0].offset:
                    commits[tp] = result.offset
            elif isinstance(result, BaseException):
                # only a failure to dead-letter lands here (Kafka down): re-read the whole batch later
                outages.append(_Outage(batches[tp][0].offset, result))
                consumer.seek(tp, batches[tp][0].offset)
            else:
                commits[tp] = batches[tp][-1].offset + 1
        if commits:
            try:
                await consumer.commit(commits)
            except (CommitFailedError, IllegalStateError, KafkaError) as exc:
                # a rebalance took the partitions: the new owner re-reads, the inbox makes that harmless
                log.warning("commit failed; records will be redelivered", consumer=self.name, error=repr(exc))
        return outages

    async def _handle_partition(self, records: list[ConsumerRecord]) -> None:
        for record in records:
            started = time.perf_counter()
            outcome = await self._handle_one(record)
            HANDLE_SECONDS.labels(self.name, record.topic).observe(time.perf_counter() - started)
            CONSUMED.labels(self.name, record.topic, outcome).inc()

    async def _handle_one(self, record: ConsumerRecord) -> str:
        try:
            env, payload = events.decode(record.value)
        except errors.BubuhError as exc:
            await self._dead_letter(record, exc.code.code, exc.detail)
            return "dead_lettered"
        event = Event(envelope=env, payload=payload, topic=record.topic, partition=record.partition,
                      offset=record.offset, key=record.key, headers=dict(record.headers or ()),
                      raw=record.value)
        token = tracing.bind(env.trace_id)
        try:
            await self._handler(event)
            return "handled"
        except errors.BubuhError as exc:
            if exc.code.retryable:
                raise _Outage(record.offset, exc) from exc
            await self._dead_letter(record, exc.code.code, exc.detail)
            return "dead_lettered"
        except Exception as exc:  # noqa: BLE001 - classify: outage, or poison
            if database.is_outage(exc):
                raise _Outage(record.offset, exc) from exc
            log.exception("handler crashed", consumer=self.name, event_id=env.event_id, type=env.type)
            await self._dead_letter(record, errors.HANDLER_CRASHED.code, f"{type(exc).__name__}: {exc}")
            return "dead_lettered"
        finally:
            tracing.reset(token)

    async def _dead_letter(self, record: ConsumerRecord, code: str, detail: str) -> None:
        DEAD_LETTERED.labels(self.name, code).inc()
        log.warning("dead-lettered", consumer=self.name, reason=code, detail=detail[:300],
                    source=f"{record.topic}/{record.partition}/{record.offset}")
        await self._producer.publish(dead_letter_record(record, self._dlq, self.name, code, detail))

    async def _pause(self, consumer: AIOKafkaConsumer, stop: asyncio.Event, seconds: float) -> None:
        """Stop fetching for ``seconds`` while still polling, so the group keeps this member."""
        assigned = list(consumer.assignment())
        consumer.pause(*assigned)
        deadline = time.monotonic() + seconds
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                await consumer.getmany(timeout_ms=min(200, max(1, int((deadline - time.monotonic()) * 1000))))
        finally:
            consumer.resume(*[tp for tp in assigned if tp in consumer.assignment()])

    async def _report_lag(self, consumer: AIOKafkaConsumer) -> None:
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await consumer.position(tp)   # local once the position is known
            except (KafkaError, IllegalStateError):
                continue
            LAG.labels(self.name, tp.topic, str(tp.partition)).set(max(0, high - position))
