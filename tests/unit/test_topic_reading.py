"""Reading a topic to the end it had when reading began (kernel/topic_reading.py), on a stand-in consumer."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from services.kernel.topic_reading import TopicEnd, whole_topic

T0, T1 = TopicPartition("t", 0), TopicPartition("t", 1)


class Consumer:
    """The few calls the helpers make, over fixed partitions, ends and positions."""

    def __init__(self, parts: set[int] | None, ends: dict, positions: dict) -> None:
        self.parts, self.ends, self.positions = parts, ends, positions
        self.assigned: list | None = None
        self.asked = 0

    def partitions_for_topic(self, topic):
        self.asked += 1
        return self.parts

    async def end_offsets(self, tps):
        return {tp: self.ends[tp] for tp in tps}

    async def position(self, tp):
        return self.positions[tp]

    def assign(self, tps):
        self.assigned = list(tps)


async def test_the_end_is_the_one_taken_at_the_start_and_records_beyond_it_do_not_count():
    consumer = Consumer({1, 0}, {T0: 5, T1: 0}, {T0: 2, T1: 0})
    tps = await whole_topic(consumer, "t")
    assert tps == consumer.assigned == [T0, T1]
    end = await TopicEnd.now(consumer, tps)
    assert not end.empty and await end.remaining() == 3 and not await end.reached()
    consumer.ends[T0] = 9                                  # published after reading began
    consumer.positions[T0] = 5
    assert await end.reached() and end.beyond(T0, 5) and not end.beyond(T0, 4)
    consumer.positions[T1] = 3                             # past the end on one partition: not "ahead" elsewhere
    consumer.positions[T0] = 4
    assert await end.remaining() == 1


async def test_a_missing_topic_is_empty_at_once_without_stop_and_waited_for_with_it():
    class Client:
        async def force_metadata_update(self):
            return None

    consumer = Consumer(None, {}, {})
    consumer._client = Client()
    assert await whole_topic(consumer, "t") == [] and consumer.assigned is None
    assert (await TopicEnd.now(consumer, [])).empty
    stop = asyncio.Event()
    waiting = asyncio.create_task(whole_topic(consumer, "t", stop=stop, poll_s=0.01))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    consumer.parts, consumer.ends = {0}, {T0: 0}          # the topic appears
    assert await asyncio.wait_for(waiting, 1) == [T0]
    consumer.parts = None
    stop.set()
    assert await asyncio.wait_for(whole_topic(consumer, "t", stop=stop, poll_s=0.01), 1) == []
