"""The ``Source`` contract in memory, so handlers are tested against PostgreSQL without a broker.

Kafka's guarantees are kept and nothing is added, because a test that passes here must mean the
same on Kafka (``tests/contracts/source_contract.py`` runs one behavioural contract against both):

- each partition is an append-only log, offsets from 0, read in order;
- partitions are shared round-robin among the live members of a group, and every join or leave
  is an eager rebalance: every member gets a new assignment and reads each partition from the
  group's committed offset, so whatever was not committed is delivered again (the redelivery the
  inbox must absorb). Pause state does not survive a rebalance, as with aiokafka;
- a commit for a partition the member does not own any more changes nothing and answers False.

Fault hooks make the rare cases ordinary: ``MemoryBroker.rebalance`` forces a rebalance,
``MemorySource.crash`` drops a member without a goodbye, ``MemoryBroker.inject_undecodable``
plants a stretch the client cannot decode. Everything runs on one asyncio loop and needs no lock.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from services.kernel.events import Outgoing
from services.kernel.processing.source import Polled, Record, TopicPartition, Undecodable

__all__ = ["MemberCrashed", "MemoryBroker", "MemoryProducer", "MemorySource"]


class MemberCrashed(Exception):
    """Raised by ``poll`` of a crashed member: a killed process does not read any more."""


@dataclass(frozen=True)
class _Stretch:
    """Offsets ``[start, end)`` that the client cannot decode; every slot of the stretch holds it."""

    start: int
    end: int
    reason: str


class MemoryBroker:
    def __init__(self, partitions: int = 4) -> None:
        self.default_partitions = partitions
        self._logs: dict[str, list[list[Record | _Stretch]]] = {}
        self._committed: dict[str, dict[TopicPartition, int]] = {}
        self._members: dict[str, list[MemorySource]] = {}     # per group, in join order
        self._round_robin: dict[str, itertools.count] = {}
        self._changed = asyncio.Event()

    # --- topics and records ---------------------------------------------------------------------
    def create_topic(self, topic: str, partitions: int | None = None) -> None:
        """Create ``topic`` if missing (producers and subscriptions auto-create it with the default count)."""
        if topic not in self._logs:
            self._logs[topic] = [[] for _ in range(partitions or self.default_partitions)]

    def partitions_of(self, topic: str) -> list[TopicPartition]:
        self.create_topic(topic)
        return [TopicPartition(topic, p) for p in range(len(self._logs[topic]))]

    def partition_for(self, topic: str, key: bytes | None) -> int:
        """Stable like Kafka's default partitioner (one key, one partition, always): crc32, not murmur2."""
        self.create_topic(topic)
        count = len(self._logs[topic])
        if key is None:
            return next(self._round_robin.setdefault(topic, itertools.count())) % count
        return zlib.crc32(key) % count

    def append(self, tp: TopicPartition, key: bytes | None, value: bytes | None,
               headers: Iterable[tuple[str, bytes]] = ()) -> int:
        """Append one record to a partition; returns its offset."""
        log = self._log(tp)
        offset = len(log)
        now_ms = int(time.time() * 1000)
        log.append(Record(tp.topic, tp.partition, offset, key, value, tuple(headers), now_ms, now_ms))
        self._wake()
        return offset

    def inject_undecodable(self, topic: str, partition: int, count: int, reason: str) -> tuple[int, int]:
        """Append ``count`` offsets that read back as one ``Undecodable`` (like a batch that will not
        decompress); returns ``(start, end)``."""
        log = self._log(TopicPartition(topic, partition))
        stretch = _Stretch(len(log), len(log) + count, reason)
        log.extend([stretch] * count)
        self._wake()
        return stretch.start, stretch.end

    def records(self, topic: str) -> list[Record]:
        """Every decodable record of ``topic``, by partition, then offset."""
        self.create_topic(topic)
        return [r for log in self._logs[topic] for r in log if isinstance(r, Record)]

    def end_offsets(self, topic: str) -> dict[TopicPartition, int]:
        return {tp: len(self._log(tp)) for tp in self.partitions_of(topic)}

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        return self._committed.get(group, {}).get(tp)

    def producer(self) -> MemoryProducer:
        return MemoryProducer(self)

    def source(self, group_id: str, topics: list[str], *, max_batch: int = 500) -> MemorySource:
        return MemorySource(self, group_id, topics, max_batch=max_batch)

    # --- groups -----------------------------------------------------------------------------------
    def rebalance(self, group: str) -> None:
        """Reassign the group's partitions round-robin over its live members, as any join or leave does.

        Every member starts again from the committed offsets (Kafka's eager protocol), so
        everything read but not committed comes again, even to a member that keeps its partition.
        """
        members = self._members.get(group, [])
        owners: dict[TopicPartition, MemorySource] = {}
        topics = sorted({t for m in members for t in m.topics})
        turn = itertools.cycle(members) if members else None
        for tp in (tp for t in topics for tp in self.partitions_of(t)):
            for _ in range(len(members)):
                member = next(turn)
                if tp.topic in member.topics:
                    owners[tp] = member
                    break
        committed = self._committed.setdefault(group, {})
        for member in members:
            member._assign({tp: committed.get(tp, 0) for tp, m in owners.items() if m is member})
        self._wake()

    def _join(self, member: MemorySource) -> None:
        for topic in member.topics:
            self.create_topic(topic)
        group = self._members.setdefault(member.group_id, [])
        if member not in group:
            group.append(member)
        self.rebalance(member.group_id)

    def _leave(self, member: MemorySource) -> None:
        group = self._members.get(member.group_id, [])
        if member in group:
            group.remove(member)
            member._assign({})
            self.rebalance(member.group_id)

    def _commit(self, member: MemorySource, offsets: dict[TopicPartition, int]) -> None:
        self._committed.setdefault(member.group_id, {}).update(offsets)

    def _log(self, tp: TopicPartition) -> list[Record | _Stretch]:
        self.create_topic(tp.topic)
        try:
            return self._logs[tp.topic][tp.partition]
        except IndexError:
            raise ValueError(f"{tp.topic} has no partition {tp.partition}") from None

    def _wake(self) -> None:
        """Wake every poll waiting for records (an appended record or a new assignment)."""
        self._changed.set()
        self._changed = asyncio.Event()


class MemoryProducer:
    """Stands in for ``services.kernel.producer.Producer`` wherever one is passed (pipeline, outbox relay)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def publish(self, record: Outgoing) -> None:
        await self.publish_many([record])

    async def publish_many(self, records: list[Outgoing]) -> None:
        for r in records:
            tp = TopicPartition(r.topic, self._broker.partition_for(r.topic, r.key))
            self._broker.append(tp, r.key, r.value, r.headers)
        await asyncio.sleep(0)      # a real send yields to the loop; so does this one


class MemorySource:
    """One member of a consumer group on a ``MemoryBroker``; the ``Source`` contract, nothing more."""

    def __init__(self, broker: MemoryBroker, group_id: str, topics: list[str], *, max_batch: int = 500) -> None:
        self.group_id = group_id
        self.topics = list(topics)
        self._broker = broker
        self._max_batch = max_batch
        self._positions: dict[TopicPartition, int] = {}   # the assignment, each with the next offset to read
        self._paused: set[TopicPartition] = set()
        self._turn = 0           # which partition a poll reads first, so none starves the others
        self._crashed = False

    def _assign(self, positions: dict[TopicPartition, int]) -> None:
        self._positions = dict(positions)
        self._paused.clear()

    async def start(self) -> None:
        if self._crashed:
            raise MemberCrashed("a crashed member cannot start again; make a new source")
        self._broker._join(self)

    async def stop(self) -> None:
        self._broker._leave(self)

    def crash(self) -> None:
        """Leave the group at once without committing, like SIGKILL: the others re-read what this
        member had not committed; what it still tries afterwards (a late commit) fails."""
        self._crashed = True
        self._broker._leave(self)

    async def poll(self, timeout_s: float, max_records: int) -> Polled:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await asyncio.sleep(0)      # like a fetch, a poll always lets the other tasks run
        while True:
            if self._crashed:
                raise MemberCrashed(f"member of {self.group_id} crashed")
            changed = self._broker._changed
            polled = self._read(min(max_records, self._max_batch))
            remaining = deadline - loop.time()
            if polled or remaining <= 0:
                return polled
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    def _read(self, budget: int) -> Polled:
        """Up to ``budget`` records. An undecodable stretch comes in the same poll as the records just
        before it, as ``KafkaSource`` delivers it, and ends that partition's read: the pipeline handles
        those records, then the stretch; the records behind it come with the next poll."""
        polled = Polled()
        tps = sorted(self._positions)
        if not tps:
            return polled
        self._turn = (self._turn + 1) % len(tps)
        for tp in tps[self._turn:] + tps[:self._turn]:
            if tp in self._paused or budget <= 0:
                continue
            log, pos = self._broker._log(tp), self._positions[tp]
            taken: list[Record] = []
            while pos < len(log) and len(taken) < budget and isinstance(log[pos], Record):
                taken.append(log[pos])
                pos += 1
            if taken:
                polled.records[tp] = taken
                budget -= len(taken)
            if pos < len(log) and isinstance(slot := log[pos], _Stretch):
                polled.undecodable.append(Undecodable(tp, max(slot.start, pos), slot.end, slot.reason))
                pos = slot.end
            self._positions[tp] = pos
        return polled

    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        if not offsets:
            return True
        # all or nothing, as aiokafka checks the whole request before sending any of it
        if self._crashed or any(tp not in self._positions for tp in offsets):
            return False
        self._broker._commit(self, offsets)
        return True

    # A partition this member lost in a rebalance is ignored by seek, pause and resume: its new
    # owner reads it from the committed offset, and a late seek by the old owner means nothing.
    def seek(self, tp: TopicPartition, offset: int) -> None:
        if offset < 0:
            raise ValueError("offset must not be negative")
        if tp in self._positions:
            self._positions[tp] = offset

    def pause(self, tps: Iterable[TopicPartition]) -> None:
        self._paused.update(tp for tp in tps if tp in self._positions)

    def resume(self, tps: Iterable[TopicPartition]) -> None:
        self._paused.difference_update(tps)

    def assignment(self) -> set[TopicPartition]:
        return set(self._positions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    async def lag(self) -> dict[TopicPartition, int]:
        return {tp: max(0, len(self._broker._log(tp)) - pos) for tp, pos in self._positions.items()}
