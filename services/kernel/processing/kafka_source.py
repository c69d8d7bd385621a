"""The ``Source`` contract on a real Kafka consumer group (aiokafka).

Manual commits only (offsets move after the work). A batch the client cannot decode (a codec it
lacks, a corrupt batch) would otherwise fail every fetch of its partition forever, and with it every
partition behind it in the same consumer: it is turned into an ``Undecodable`` stretch instead,
skipped, and reported to the pipeline, which dead-letters a marker for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    UnsupportedCodecError,
)

from services.kernel import logs, readiness
from services.kernel.kafka_clients import build_consumer
from services.kernel.processing.source import Polled, Record, Undecodable
from services.kernel.settings import Settings

log = logs.get(__name__)

LOG_APPEND_TIME = 1      # a record's timestamp_type when the broker stamped it
_DECODE_ERRORS = (UnsupportedCodecError, CorruptRecordException)


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int] | None:
    """A topic's partitions, asking the broker again when the client's metadata does not know the topic
    (brand new, or narrowed to an assignment's topics). aiokafka has no public call for that refresh:
    this is the one place that uses its client's."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()  # noqa: SLF001 - see above
        parts = consumer.partitions_for_topic(topic)
    return parts or None


def is_decode_error(exc: BaseException) -> bool:
    """A failure to turn fetched bytes into records (as opposed to a network or broker error)."""
    if isinstance(exc, _DECODE_ERRORS):
        return True
    return not isinstance(exc, KafkaError | OSError | asyncio.CancelledError)


def bad_batch_of(exc: BaseException) -> tuple[TopicPartition, int, int] | None:
    """(partition, first offset, next offset) of the batch aiokafka was unpacking when ``exc`` rose.

    aiokafka raises without naming the partition; its record iterator (``_unpack_records`` in
    ``aiokafka/consumer/fetcher.py``) holds both the partition and the batch, whose header (read
    without decompressing) gives the range.
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


class _Ownership(ConsumerRebalanceListener):
    """The partitions this member owns, as the group sees it.

    aiokafka's ``assignment()`` keeps reporting the previous assignment while a rebalance is under
    way, after this member has already given it up (eager protocol: everything is revoked before
    rejoining) and possibly while another member already owns it. Ownership is what the listener
    was last told: nothing from revocation until the next assignment arrives.
    """

    def __init__(self) -> None:
        self.owned: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked) -> None:
        self.owned = set()

    async def on_partitions_assigned(self, assigned) -> None:
        self.owned = set(assigned)


class KafkaSource:
    def __init__(self, settings: Settings, topics: list[str], *, group_id: str, client_id: str,
                 max_batch: int) -> None:
        self._settings = settings
        self._group = group_id
        self._consumer = build_consumer(settings, group_id=group_id, client_id=client_id,
                                        max_poll_records=max_batch)
        self._topics = topics
        self._ownership = _Ownership()
        self._delivered: dict[TopicPartition, int] = {}   # next offset the pipeline expects, per partition

    async def start(self) -> None:
        # join only once the broker can coordinate the group: no start-up storm of library errors
        await readiness.wait_for_group_coordinator(self._settings, self._group)
        await self._consumer.start()
        self._consumer.subscribe(self._topics, listener=self._ownership)

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
            return await self._skip_undecodable(exc)
        return self._polled(batches)

    def _polled(self, batches) -> Polled:
        out = Polled()
        for tp, records in batches.items():
            if records:
                out.records[tp] = [Record(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers or ()),
                                          r.timestamp, r.timestamp if r.timestamp_type == LOG_APPEND_TIME else 0)
                                   for r in records]
                self._delivered[tp] = records[-1].offset + 1
        return out

    async def _skip_undecodable(self, exc: BaseException) -> Polled:
        """Deliver what precedes the bad batch, skip the batch, and say which offsets were skipped.

        When aiokafka raises, it has already moved the positions of the other partitions past
        records it then dropped, and of the bad batch's partition past the records before the batch:
        every partition is first put back where the pipeline is.
        """
        reason = f"{type(exc).__name__}: {exc}"[:500]
        # the pipeline commits all it was given before it polls again: the committed offset is where
        # it is (a rare path, so one look-up per partition is fine)
        for t in self._consumer.assignment():
            committed = await self._consumer.committed(t)
            where = committed if committed is not None else self._delivered.get(t)
            if where is not None:
                self.seek(t, where)
        located = bad_batch_of(exc)
        if located is None:
            located = await self._probe(exc)
        tp, start, end = located
        before: list = []
        position = self._delivered.get(tp)
        if position is None:      # nothing committed or delivered yet: the partition starts at its beginning
            position = (await self._consumer.beginning_offsets([tp]))[tp]
        if position < start:
            self._consumer.seek(tp, position)
            while position < start:
                try:
                    got = await self._consumer.getmany(tp, timeout_ms=1500, max_records=1)
                except Exception as again:  # noqa: BLE001 - the same bad batch: nothing decodable before it
                    same = bad_batch_of(again)
                    if same is None or same[1] != start:
                        raise
                    break
                records = got.get(tp, [])
                if not records:
                    break
                before.extend(r for r in records if r.offset < start)
                position = records[-1].offset + 1
        self._consumer.seek(tp, end)
        log.error("undecodable batch skipped", topic=tp.topic, partition=tp.partition, start=start, end=end,
                  reason=reason)
        polled = self._polled({tp: before})
        self._delivered[tp] = end
        polled.undecodable.append(Undecodable(tp, max(start, position), end, reason))
        return polled

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

    # A partition that a rebalance took away while its batch was in flight is skipped (aiokafka
    # raises IllegalStateError for it, which would end the consumer loop): its new owner reads it
    # from the committed offset.
    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp in self.assignment():
            self._consumer.seek(tp, offset)
            self._delivered[tp] = offset

    def pause(self, tps: Iterable[TopicPartition]) -> None:
        mine = self.assignment()
        self._consumer.pause(*[tp for tp in tps if tp in mine])

    def resume(self, tps: Iterable[TopicPartition]) -> None:
        mine = self.assignment()
        self._consumer.resume(*[tp for tp in tps if tp in mine])

    def assignment(self) -> set[TopicPartition]:
        # both: owned per the last rebalance, and still known to the client (after stop() the
        # listener is not told, and the client's view is what a stopped member reports)
        return self._ownership.owned & set(self._consumer.assignment())

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
