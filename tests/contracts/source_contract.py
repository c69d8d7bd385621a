"""The behaviour the pipeline relies on from a ``Source``, written once and run against both sources.

``tests/component/test_memory_source.py`` runs every check on ``MemorySource`` and
``tests/integration/test_kafka_source.py`` on ``KafkaSource`` against the local broker (after
getsentry/arroyo's ``tests/backends/mixins.py``). A check takes a ``Backend``: a factory of fresh
topics, groups and sources, so each check has topics nobody else reads.

A rebalance is always caused by a member joining or leaving, because that is the one trigger both
sources share; the checks never sleep to "let it happen", they poll until the group has settled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from services.kernel.processing.source import Record, Source, TopicPartition, Undecodable


class Backend(Protocol):
    patience_s: float     # how long a check waits for records or for the group to settle

    async def topic(self, partitions: int) -> str:
        """A new topic with ``partitions`` partitions, empty."""
        ...

    def group(self) -> str:
        """A consumer group name nobody used yet."""
        ...

    def source(self, group: str, topics: list[str], *, max_batch: int = 500) -> Source: ...

    async def append(self, topic: str, partition: int, values: Sequence[bytes]) -> list[int]:
        """Write ``values`` to one partition, in order; their offsets."""
        ...

    async def committed(self, group: str, tp: TopicPartition) -> int | None: ...


class Reader:
    """A member plus everything it was handed, poll by poll."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.got: list[Record] = []
        self.undecodable: list[Undecodable] = []
        self.poll_sizes: list[int] = []

    async def poll(self, timeout_s: float = 0.1, max_records: int = 500) -> list[Record]:
        polled = await self.source.poll(timeout_s, max_records)
        new: list[Record] = []
        for tp, records in polled.records.items():
            assert records, f"{tp}: an empty list is not a batch"
            assert all((r.topic, r.partition) == (tp.topic, tp.partition) for r in records), f"{tp}: foreign record"
            new.extend(records)
        self.poll_sizes.append(len(new))
        self.undecodable.extend(polled.undecodable)
        self.got.extend(new)
        return new

    def offsets(self, tp: TopicPartition, since: int = 0) -> list[int]:
        return [r.offset for r in self.got[since:] if (r.topic, r.partition) == (tp.topic, tp.partition)]


class Overlaps:
    """Watches a group's members while a check runs: no partition may ever belong to two at once."""

    def __init__(self, readers: Sequence[Reader]) -> None:
        self.readers = readers
        self.seen: list[str] = []

    def sample(self) -> None:
        owned: dict[TopicPartition, int] = {}
        for i, reader in enumerate(self.readers):
            for tp in reader.source.assignment():
                if tp in owned:
                    self.seen.append(f"{tp} owned by members {owned[tp]} and {i}")
                owned[tp] = i


async def pump(readers: Sequence[Reader], until: Callable[[], bool], patience_s: float, *, what: str,
               max_records: int = 500, overlaps: Overlaps | None = None) -> None:
    """Poll every member in turn until ``until()`` holds (records arrived, the group settled)."""
    deadline = time.monotonic() + patience_s
    while True:
        if overlaps is not None:
            overlaps.sample()
        if until():
            return
        if time.monotonic() > deadline:
            state = {i: (sorted(r.source.assignment()), len(r.got)) for i, r in enumerate(readers)}
            raise AssertionError(f"not reached within {patience_s:g} s: {what}; members: {state}")
        for reader in readers:
            await reader.poll(0.1, max_records)
            if overlaps is not None:
                overlaps.sample()


def settled(readers: Sequence[Reader], tps: Sequence[TopicPartition]) -> Callable[[], bool]:
    """Every partition owned by exactly one member, and every member owns one."""
    def check() -> bool:
        owned = [r.source.assignment() for r in readers]
        flat = [tp for a in owned for tp in a]
        return all(owned) and sorted(flat) == sorted(tps)
    return check


def _tps(topic: str, n: int) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in range(n)]


def _v(partition: int, i: int) -> bytes:
    return f"{partition}:{i}".encode()


async def _fill(b: Backend, topic: str, partitions: int, per_partition: int) -> None:
    for p in range(partitions):
        await b.append(topic, p, [_v(p, i) for i in range(per_partition)])


# --- the checks -------------------------------------------------------------------------------------

async def check_each_partition_arrives_in_offset_order(b: Backend) -> None:
    topic = await b.topic(3)
    for i in range(12):                       # interleaved: order is per partition, not global
        for p in range(3):
            await b.append(topic, p, [_v(p, i)])
    reader = Reader(b.source(b.group(), [topic]))
    await reader.source.start()
    await pump([reader], lambda: len(reader.got) >= 36, b.patience_s, what="36 records", max_records=5)
    assert max(reader.poll_sizes) <= 5, "a poll returned more than max_records"
    for tp in _tps(topic, 3):
        assert reader.offsets(tp) == list(range(12)), tp
        assert [r.value for r in reader.got if r.partition == tp.partition] == [_v(tp.partition, i) for i in range(12)]
    await reader.source.stop()


async def check_poll_waits_for_records_up_to_its_timeout(b: Backend) -> None:
    topic = await b.topic(1)
    tp = TopicPartition(topic, 0)
    reader = Reader(b.source(b.group(), [topic]))
    await reader.source.start()
    await pump([reader], lambda: reader.source.assignment() == {tp}, b.patience_s, what="assignment")
    started = time.monotonic()
    assert not await reader.poll(0.3), "records from an empty topic"
    assert time.monotonic() - started >= 0.25, "an empty poll did not wait for its timeout"

    async def later() -> None:
        await asyncio.sleep(0.3)
        await b.append(topic, 0, [b"late"])
    writer = asyncio.create_task(later())
    started = time.monotonic()
    got = await reader.poll(10.0)
    waited = time.monotonic() - started
    await writer
    got += [] if got else await reader.poll(b.patience_s)     # a broker may answer the first fetch empty
    assert [r.value for r in got] == [b"late"]
    assert waited < 8.0, f"poll slept {waited:.1f} s although a record arrived after 0.3 s"
    await reader.source.stop()


async def check_a_restart_redelivers_what_was_not_committed(b: Backend) -> None:
    topic, group = await b.topic(2), b.group()
    p0, p1 = _tps(topic, 2)
    await _fill(b, topic, 2, 6)
    first = Reader(b.source(group, [topic]))
    await first.source.start()
    await pump([first], lambda: len(first.got) >= 12, b.patience_s, what="12 records")
    assert await first.source.commit({p0: 4})          # p0: 0..3 done; p1: nothing committed
    await first.source.stop()

    second = Reader(b.source(group, [topic]))
    await second.source.start()
    await pump([second], lambda: len(second.got) >= 8, b.patience_s, what="the 8 uncommitted records")
    assert second.offsets(p0) == [4, 5], "committed records came again, or uncommitted ones did not"
    assert second.offsets(p1) == list(range(6))
    assert (await b.committed(group, p0), await b.committed(group, p1)) == (4, None)
    assert await second.source.commit({p0: 6, p1: 6})
    await second.source.stop()

    third = Reader(b.source(group, [topic]))
    await third.source.start()
    await pump([third], lambda: third.source.assignment() == {p0, p1}, b.patience_s, what="assignment")
    await third.poll(0.5)
    assert third.got == [], "records delivered again although their offsets were committed"
    await third.source.stop()


async def check_a_rebalance_redelivers_what_was_not_committed(b: Backend) -> None:
    topic, group = await b.topic(4), b.group()
    tps = _tps(topic, 4)
    await _fill(b, topic, 4, 5)
    a = Reader(b.source(group, [topic]))
    await a.source.start()
    await pump([a], lambda: len(a.got) >= 20, b.patience_s, what="20 records")
    assert await a.source.commit({tps[0]: 5, tps[1]: 2})
    mark = len(a.got)

    new = Reader(b.source(group, [topic]))           # a member joins: the group rebalances
    await new.source.start()

    def again(tp: TopicPartition) -> list[int]:
        return a.offsets(tp, since=mark) + new.offsets(tp)
    await pump([a, new], lambda: settled([a, new], tps)() and len(again(tps[1])) == 3
               and len(again(tps[2])) == 5 and len(again(tps[3])) == 5, b.patience_s, what="redelivery")
    await a.poll(0.3)
    await new.poll(0.3)
    assert again(tps[0]) == [], "a committed partition was delivered again"
    assert again(tps[1]) == [2, 3, 4], "not resumed from the committed offset"
    assert again(tps[2]) == again(tps[3]) == list(range(5))
    for tp in tps[1:]:
        stranger = new if tp in a.source.assignment() else a
        assert stranger.offsets(tp, since=mark if stranger is a else 0) == [], f"{tp} read by a member not owning it"
    await a.source.stop()
    await new.source.stop()


async def check_members_split_the_partitions_and_never_share_one(b: Backend) -> None:
    topic, group = await b.topic(4), b.group()
    tps = _tps(topic, 4)
    a, c = Reader(b.source(group, [topic])), Reader(b.source(group, [topic]))
    overlaps = Overlaps([a, c])
    await a.source.start()
    await pump([a], settled([a], tps), b.patience_s, what="the first member owns all", overlaps=overlaps)
    await c.source.start()
    await pump([a, c], settled([a, c], tps), b.patience_s, what="two members split", overlaps=overlaps)
    assert len(a.source.assignment()) == len(c.source.assignment()) == 2
    await c.source.stop()
    overlaps.readers = [a]      # a stopped KafkaSource still reports its last assignment; it reads nothing
    await pump([a], settled([a], tps), b.patience_s, what="the survivor owns all again", overlaps=overlaps)
    assert overlaps.seen == []
    await a.source.stop()


async def check_pause_stops_that_partition_only_and_resume_goes_on_where_it_was(b: Backend) -> None:
    topic = await b.topic(2)
    p0, p1 = _tps(topic, 2)
    await _fill(b, topic, 2, 4)
    reader = Reader(b.source(b.group(), [topic]))
    await reader.source.start()
    await pump([reader], lambda: bool(reader.offsets(p0)), b.patience_s, what="a first p0 record", max_records=1)
    before = reader.offsets(p0)
    reader.source.pause([p0])
    await b.append(topic, 0, [_v(0, 4), _v(0, 5)])
    await b.append(topic, 1, [_v(1, 4), _v(1, 5)])
    await pump([reader], lambda: len(reader.offsets(p1)) >= 6, b.patience_s, what="all of p1 while p0 is paused")
    await reader.poll(0.5)
    assert reader.offsets(p0) == before, "a paused partition was delivered"
    assert reader.offsets(p1) == list(range(6))
    reader.source.resume([p0])
    await pump([reader], lambda: len(reader.offsets(p0)) >= 6, b.patience_s, what="the rest of p0 after resume")
    assert reader.offsets(p0) == list(range(6)), "resume did not go on where the partition was"
    await reader.source.stop()


async def check_seek_rewinds(b: Backend) -> None:
    topic = await b.topic(2)
    p0 = TopicPartition(topic, 0)
    await b.append(topic, 0, [_v(0, i) for i in range(5)])
    reader = Reader(b.source(b.group(), [topic]))
    await reader.source.start()
    await pump([reader], lambda: len(reader.got) >= 5, b.patience_s, what="5 records")
    mark = len(reader.got)
    reader.source.seek(p0, 2)
    await pump([reader], lambda: len(reader.got) >= mark + 3, b.patience_s, what="the records after the seek")
    assert reader.offsets(p0, since=mark) == [2, 3, 4]
    await reader.source.stop()


async def check_lag_counts_what_this_member_has_not_read(b: Backend) -> None:
    topic = await b.topic(1)
    p0 = TopicPartition(topic, 0)
    await b.append(topic, 0, [_v(0, i) for i in range(10)])
    reader = Reader(b.source(b.group(), [topic]))
    await reader.source.start()
    await pump([reader], lambda: len(reader.got) >= 3, b.patience_s, what="3 records", max_records=3)
    lag = await reader.source.lag()
    assert lag.get(p0) == 10 - len(reader.got)
    await reader.source.stop()


async def _lose_partitions(b: Backend, topic: str, group: str, tps: list[TopicPartition]):
    """A reads everything and commits p0 up to 1; then a second member takes half the partitions."""
    await _fill(b, topic, len(tps), 3)
    a = Reader(b.source(group, [topic]))
    await a.source.start()
    await pump([a], lambda: len(a.got) >= 3 * len(tps), b.patience_s, what="all records")
    assert await a.source.commit({tps[0]: 1})
    other = Reader(b.source(group, [topic]))
    await other.source.start()
    await pump([a, other], settled([a, other], tps), b.patience_s, what="two members split")
    return a, other


async def check_a_commit_for_a_partition_taken_away_changes_nothing(b: Backend) -> None:
    """After a rebalance, the old owner's commit is refused, and as a whole: not even the partitions
    it kept move. (aiokafka refuses locally, IllegalStateError "not assigned", before sending.)"""
    topic, group = await b.topic(4), b.group()
    tps = _tps(topic, 4)
    a, other = await _lose_partitions(b, topic, group, tps)
    lost = sorted(set(tps) - a.source.assignment())
    before = {tp: await b.committed(group, tp) for tp in tps}
    assert before == {tps[0]: 1, tps[1]: None, tps[2]: None, tps[3]: None}
    assert await a.source.commit({tp: 3 for tp in lost}) is False
    assert await a.source.commit({tp: 3 for tp in tps}) is False
    assert {tp: await b.committed(group, tp) for tp in tps} == before, "a refused commit moved an offset"
    kept = sorted(a.source.assignment())
    assert await a.source.commit({tp: 3 for tp in kept}) is True     # refused for ownership, nothing else
    await a.source.stop()
    await other.source.stop()


async def check_seek_pause_resume_of_a_partition_taken_away_are_harmless(b: Backend) -> None:
    """The pipeline commits, then rewinds and pauses the partitions it halted; a rebalance during the
    batch may have taken them away. That must not break the member, nor touch the new owner."""
    topic, group = await b.topic(4), b.group()
    tps = _tps(topic, 4)
    a, other = await _lose_partitions(b, topic, group, tps)
    lost = sorted(set(tps) - a.source.assignment())
    kept = a.source.assignment()
    mark = len(a.got)
    for tp in lost:
        a.source.seek(tp, 0)
    a.source.pause(lost)
    a.source.resume(lost)
    assert a.source.assignment() == kept
    await a.poll(0.3)
    assert not [r for r in a.got[mark:] if TopicPartition(r.topic, r.partition) in lost]
    await a.source.stop()
    await other.source.stop()


CHECKS = (
    check_each_partition_arrives_in_offset_order,
    check_poll_waits_for_records_up_to_its_timeout,
    check_a_restart_redelivers_what_was_not_committed,
    check_a_rebalance_redelivers_what_was_not_committed,
    check_members_split_the_partitions_and_never_share_one,
    check_pause_stops_that_partition_only_and_resume_goes_on_where_it_was,
    check_seek_rewinds,
    check_lag_counts_what_this_member_has_not_read,
    check_a_commit_for_a_partition_taken_away_changes_nothing,
    check_seek_pause_resume_of_a_partition_taken_away_are_harmless,
)


# --- for sources that can be handed undecodable data on demand (MemorySource) ------------------------

class CorruptingBackend(Backend, Protocol):
    async def inject_undecodable(self, topic: str, partition: int, count: int, reason: str) -> None: ...


async def check_an_undecodable_stretch_is_reported_and_the_records_after_it_are_delivered(b: CorruptingBackend) -> None:
    topic = await b.topic(2)
    p0, p1 = _tps(topic, 2)
    await b.append(topic, 0, [_v(0, 0), _v(0, 1)])
    await b.inject_undecodable(topic, 0, 3, "UnsupportedCodecError: zstd")
    await b.append(topic, 0, [_v(0, 5), _v(0, 6)])
    await b.append(topic, 1, [_v(1, 0), _v(1, 1)])
    reader = Reader(b.source(b.group(), [topic]))
    await reader.source.start()
    await pump([reader], lambda: len(reader.got) >= 6, b.patience_s, what="the records around the stretch")
    assert reader.undecodable == [Undecodable(p0, 2, 5, "UnsupportedCodecError: zstd")]
    assert reader.offsets(p0) == [0, 1, 5, 6]
    assert reader.offsets(p1) == [0, 1]
    await reader.source.stop()
