"""The records of a few keys on a few topics, read without a consumer group.

Why only some partitions, and only from a time on: a key always lands on the partition Kafka's
partitioner gives it (``kernel/partitioning.py``, the same as the Java clients'), and nothing about
a journey was written before it began; so a trace reads a bounded stretch of a few partitions, not
whole topics. The reader remembers where it stopped, so ``--follow`` reads only what is new.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from aiokafka import TopicPartition

from services.kernel.kafka_clients import build_consumer
from services.kernel.partitioning import partitioner
from services.kernel.processing.kafka_source import partitions_of
from services.kernel.settings import Settings


@dataclass(frozen=True)
class KeyedRecord:
    topic: str              # the catalogue's name (without the deployment's prefix)
    partition: int
    offset: int
    timestamp_ms: int       # the record's timestamp (create or append time, as the topic keeps it)
    key: bytes
    value: bytes
    headers: dict[str, bytes]


class KeyedReader:
    def __init__(self, settings: Settings, topics: list[str], keys: set[str], since: dt.datetime) -> None:
        self._settings = settings
        self._topics = topics
        self._keys = {k.encode() for k in keys}
        self._since_ms = int(since.timestamp() * 1000)
        self._consumer = build_consumer(settings, group_id=None, client_id="bubuh-trace",
                                        fetch_min_bytes=1, fetch_max_wait_ms=50)
        self._tps: list[TopicPartition] | None = None
        self._next: dict[TopicPartition, int] = {}   # where the next read starts

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def _partitions(self) -> list[TopicPartition]:
        """The partitions of the keys, found once: assigning partitions narrows the client's metadata to
        their topics, so a topic not looked up before would not be found afterwards."""
        if self._tps is not None:
            return self._tps
        wanted = []
        for name in self._topics:
            parts = await partitions_of(self._consumer, self._settings.topic(name))
            if parts:
                ordered = sorted(parts)
                wanted += [TopicPartition(self._settings.topic(name), partitioner(k, ordered, ordered))
                           for k in self._keys]
        self._tps = sorted(set(wanted))
        if self._tps:
            self._consumer.assign(self._tps)
            starts = await self._consumer.offsets_for_times({tp: self._since_ms for tp in self._tps})
            ends = await self._consumer.end_offsets(self._tps)
            self._next = {tp: starts[tp].offset if starts.get(tp) else ends[tp] for tp in self._tps}
        return self._tps

    async def read_new(self) -> list[KeyedRecord]:
        """The records of the keys written since the last call (since ``since`` the first time)."""
        tps = await self._partitions()
        if not tps:
            return []
        ends = await self._consumer.end_offsets(tps)
        todo = {tp: (self._next[tp], ends[tp]) for tp in tps if self._next[tp] < ends[tp]}
        if not todo:
            return []
        for tp in tps:
            self._consumer.seek(tp, self._next[tp])
        out: list[KeyedRecord] = []
        prefix = len(self._settings.topic_prefix)
        while todo:
            batch = await self._consumer.getmany(*todo, timeout_ms=500)
            if not batch:
                break   # nothing came back in time: what is left is read on the next call
            for tp, records in batch.items():
                end = todo[tp][1] if tp in todo else 0
                for r in records:
                    if r.offset >= end:
                        continue
                    self._next[tp] = r.offset + 1
                    if r.key in self._keys:
                        out.append(KeyedRecord(tp.topic[prefix:], tp.partition, r.offset, r.timestamp, r.key,
                                               r.value or b"", dict(r.headers or ())))
                if tp in todo and self._next[tp] >= end:
                    del todo[tp]
        for tp in todo:     # past what was read: gaps (control records, compaction) are not waited for
            self._next[tp] = max(self._next[tp], await self._consumer.position(tp))
        return out
