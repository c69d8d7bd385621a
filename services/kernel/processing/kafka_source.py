"""The ``Source`` contract on a real Kafka consumer group (aiokafka).

Manual commits only (offsets move after the work). A batch the client cannot decode (a codec it
lacks, a corrupt batch) would otherwise fail every fetch of its partition forever, and with it every
partition behind it in the same consumer: it is turned into an ``Undecodable`` stretch instead,
skipped, and reported to the pipeline, which dead-letters a marker for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    UnsupportedCodecError,
)

from services.kernel import logs
from services.kernel.processing.source import Polled, Record, Undecodable
from services.kernel.settings import Settings

log = logs.get(__name__)

_DECODE_ERRORS = (UnsupportedCodecError, CorruptRecordException)


def build_consumer(settings: Settings, *topics: str, group_id: str | None, client_id: str,
                   max_poll_records: int = 500, **overrides) -> AIOKafkaConsumer:
    """Every Kafka consumer of the platform is built here (one place for its settings)."""
    options = dict(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_poll_records,
        request_timeout_ms=settings.kafka_request_timeout_ms * 2,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=2_000,
        max_poll_interval_ms=300_000,
        metadata_max_age_ms=30_000,
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def is_decode_error(exc: BaseException) -> bool:
    """A failure to turn fetched bytes into records (as opposed to a network or broker error)."""
    if isinstance(exc, _DECODE_ERRORS):
        return True
    return not isinstance(exc, KafkaError | OSError | asyncio.CancelledError)


def bad_batch_of(exc: BaseException) -> tuple[TopicPartition, int, int] | None:
    """(partition, first offset, next offset) of the batch aiokafka was unpacking when ``exc`` rose.

    aiokafka raises without naming the partition; its record iterator (``_unpack_records``) holds
    both the partition and the batch (whose header, read without decompressing, gives the range).
    """
    tb = exc.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_unpack_records":
            tp, batch = frame.f_locals.get("tp"), frame.f_locals.get("next_batch")
            if isinstance(tp, TopicPartition) and batch is not None:
                base = getattr(batch, "base_offset", None)
                nxt = getattr(batch, "next_offset", None)
                if isinstance(base, int) and isinstance(nxt, int) and nxt > base:
                    found = (tp, base, nxt)
        tb = tb.tb_next
    return found


class KafkaSource:
    def __init__(self, settings: Settings, topics: list[str], *, group_id: str, client_id: str,
                 max_batch: int) -> None:
        self._consumer = build_consumer(settings, *topics, group_id=group_id, client_id=client_id,
                                        max_poll_records=max_batch)
        self._topics = topics

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_s: float, max_records: int) -> Polled:
        try:
            batches = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except Exception as exc:  # noqa: BLE001 - sorted below: undecodable data, or a broker/network error
            if not is_decode_error(exc):
                log.warning("fetch failed", topics=self._topics, error=repr(exc))
                await asyncio.sleep(0.5)
                return Polled()
            return Polled(undecodable=[await self._skip_undecodable(exc)])
        return Polled(records={
            tp: [Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp)
                 for r in records]
            for tp, records in batches.items() if records})

    async def _skip_undecodable(self, exc: BaseException) -> Undecodable:
        reason = f"{type(exc).__name__}: {exc}"[:500]
        located = bad_batch_of(exc)
        if located is None:
            located = await self._probe(exc)
        tp, start, end = located
        position = await self._consumer.position(tp)
        start = max(start, position) if start <= position < end else start
        self._consumer.seek(tp, end)
        log.error("undecodable batch skipped", topic=tp.topic, partition=tp.partition, start=start, end=end,
                  reason=reason)
        return Undecodable(tp, start, end, reason)

    async def _probe(self, exc: BaseException) -> tuple[TopicPartition, int, int]:
        """Partition by partition, find the one whose next record cannot be decoded (one offset at a time)."""
        for tp in sorted(self._consumer.assignment()):
            position = await self._consumer.position(tp)
            try:
                got = await self._consumer.getmany(tp, timeout_ms=1000, max_records=1)
            except Exception as again:  # noqa: BLE001
                if is_decode_error(again):
                    return tp, position, position + 1
                continue
            for records in got.values():   # a healthy partition: put back what the probe read
                if records:
                    self._consumer.seek(tp, records[0].offset)
        raise exc

    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        if not offsets:
            return True
        try:
            await self._consumer.commit(offsets)
            return True
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # a rebalance took the partitions: the new owner re-reads, the inbox makes that harmless
            log.warning("commit failed; records will be redelivered", topics=self._topics, error=repr(exc))
            return False

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(tp, offset)

    def pause(self, tps: Iterable[TopicPartition]) -> None:
        self._consumer.pause(*tps)

    def resume(self, tps: Iterable[TopicPartition]) -> None:
        mine = self._consumer.assignment()
        self._consumer.resume(*[tp for tp in tps if tp in mine])

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    async def lag(self) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except (KafkaError, IllegalStateError):
                continue
            out[tp] = max(0, high - position)
        return out
