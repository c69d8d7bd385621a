"""``MemorySource`` keeps the source contract (the same checks run against Kafka in
tests/integration/test_kafka_source.py), and its fault hooks do what the pipeline tests rely on."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from services.kernel.events import Outgoing
from services.kernel.processing.memory import MemberCrashed, MemoryBroker
from services.kernel.processing.source import TopicPartition
from tests.contracts import source_contract as contract


class MemoryBackend:
    patience_s = 2.0

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self._names = itertools.count()

    async def topic(self, partitions: int) -> str:
        name = f"contract.{next(self._names)}"
        self.broker.create_topic(name, partitions)
        return name

    def group(self) -> str:
        return f"group-{next(self._names)}"

    def source(self, group: str, topics: list[str], *, max_batch: int = 500):
        return self.broker.source(group, topics, max_batch=max_batch)

    async def append(self, topic: str, partition: int, values: Sequence[bytes]) -> list[int]:
        return [self.broker.append(TopicPartition(topic, partition), None, v) for v in values]

    async def committed(self, group: str, tp: TopicPartition) -> int | None:
        return self.broker.committed(group, tp)

    async def inject_undecodable(self, topic: str, partition: int, count: int, reason: str) -> None:
        self.broker.inject_undecodable(topic, partition, count, reason)


@pytest.mark.parametrize("check", [*contract.CHECKS,
                                   contract.check_an_undecodable_stretch_is_reported_and_the_records_after_it_are_delivered],
                         ids=lambda c: c.__name__.removeprefix("check_"))
async def test_memory_source_keeps_the_contract(check):
    await check(MemoryBackend())


# --- the broker's own promises and fault hooks --------------------------------------------------------

async def test_one_key_always_lands_on_one_partition_and_no_key_spreads():
    broker = MemoryBroker(partitions=4)
    producer = broker.producer()
    await producer.start()
    await producer.publish_many([Outgoing("t", f"k{i % 10}".encode(), b"v") for i in range(200)])
    await producer.publish_many([Outgoing("t", None, b"v") for _ in range(8)])
    await producer.stop()
    by_key: dict[bytes | None, set[int]] = {}
    for r in broker.records("t"):
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for key, parts in by_key.items() if key is not None)
    assert len({p for k, ps in by_key.items() if k is not None for p in ps}) > 1, "every key on one partition"
    assert by_key[None] == {0, 1, 2, 3}
    assert sum(broker.end_offsets("t").values()) == 208
    fresh = MemoryBroker(partitions=4)      # stable across brokers (a new process), not only within one
    assert all(fresh.partition_for("t", f"k{i}".encode()) == broker.partition_for("t", f"k{i}".encode())
               for i in range(10))


async def test_a_forced_rebalance_hands_the_same_member_its_uncommitted_records_again():
    broker = MemoryBroker(partitions=2)
    tp = TopicPartition("t", 0)
    for i in range(4):
        broker.append(tp, None, str(i).encode())
    source = broker.source("g", ["t"])
    await source.start()
    first = await source.poll(0, 100)
    assert [r.offset for r in first.records[tp]] == [0, 1, 2, 3]
    assert await source.commit({tp: 2})
    source.pause([tp])
    broker.rebalance("g")
    assert source.paused() == set(), "pause survived a rebalance (aiokafka forgets it too)"
    again = await source.poll(0, 100)
    assert [r.offset for r in again.records[tp]] == [2, 3]


async def test_a_crashed_member_reads_nothing_more_and_its_late_commit_fails():
    broker = MemoryBroker(partitions=2)
    tp = TopicPartition("t", 0)
    broker.append(tp, None, b"x")
    doomed, survivor = broker.source("g", ["t"]), broker.source("g", ["t"])
    await doomed.start()
    await survivor.start()
    owned = doomed.assignment()
    assert owned and owned.isdisjoint(survivor.assignment())
    doomed.crash()
    assert survivor.assignment() == {tp, TopicPartition("t", 1)}
    assert await doomed.commit({tp: 1}) is False
    assert broker.committed("g", tp) is None
    with pytest.raises(MemberCrashed):
        await doomed.poll(0, 10)
    await doomed.stop()         # what a pipeline's finally does: harmless
    assert (await survivor.poll(0, 10)).records[tp][0].value == b"x"


async def test_a_seek_into_a_stretch_reports_the_rest_of_it():
    broker = MemoryBroker(partitions=1)
    start, end = broker.inject_undecodable("t", 0, 5, "corrupt")
    assert (start, end) == (0, 5)
    source = broker.source("g", ["t"])
    await source.start()
    source.seek(TopicPartition("t", 0), 3)
    polled = await source.poll(0, 10)
    assert [(u.start, u.end) for u in polled.undecodable] == [(3, 5)]
    assert broker.records("t") == []
    assert broker.end_offsets("t") == {TopicPartition("t", 0): 5}
