"""The contract of a record source, as the pipeline relies on it.

Kafka's guarantees, and nothing more: records of one partition arrive in offset order; after a
restart or a rebalance a partition is read again from its last committed offset (so everything not
yet committed is delivered again); a partition belongs to one member of a group at a time.
``KafkaSource`` is the real thing, ``MemorySource`` the same contract in memory for component tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import TopicPartition

__all__ = ["Polled", "Record", "Source", "TopicPartition", "Undecodable"]


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp_ms: int = 0
    # when the broker appended the record, if the topic records that (LogAppendTime); 0 when the
    # timestamp is the producer's own choice (CreateTime) and so proves nothing
    appended_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A stretch of a partition that the client could not decode (a corrupt or unsupported batch).

    ``[start, end)`` is skipped: the pipeline dead-letters a marker naming it and moves on.
    """

    tp: TopicPartition
    start: int
    end: int
    reason: str


@dataclass
class Polled:
    records: dict[TopicPartition, list[Record]] = field(default_factory=dict)
    undecodable: list[Undecodable] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.records or self.undecodable)


class Source(Protocol):
    """What the pipeline needs from a consumer group member."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def poll(self, timeout_s: float, max_records: int) -> Polled:
        """Records fetched since the last poll (at most ``max_records``), by partition, in order."""
        ...

    async def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit "next offset to read" per partition; False when the group took the partitions away."""
        ...

    def seek(self, tp: TopicPartition, offset: int) -> None: ...

    def pause(self, tps: Iterable[TopicPartition]) -> None: ...

    def resume(self, tps: Iterable[TopicPartition]) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...

    async def lag(self) -> dict[TopicPartition, int]:
        """Records between this member's position and the end of each assigned partition."""
        ...
