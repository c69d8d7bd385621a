"""The kernel's producer against the real broker: after the broker refuses its sequence numbers
(what a broker restart with batches in flight can cause), it is replaced and publishing goes on."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from services.kernel import errors, events, topics
from services.kernel.producer import Producer
from tests.flows import read_topic


def _record(settings, n: int) -> events.Outgoing:
    return events.Outgoing(settings.topic("producer.probe"), b"k", f"record-{n}".encode(), [])


async def test_a_producer_out_of_step_with_the_broker_is_replaced_and_publishing_goes_on(settings):
    await topics.ensure(settings, (topics.Topic("producer.probe", "tests", "k", "-", 1),))
    producer = Producer(settings, client_id="probe")
    await producer.start()
    try:
        await producer.publish(_record(settings, 1))
        # skip five sequence numbers, as if batches had been lost: the broker answers OUT_OF_ORDER_SEQUENCE_NUMBER,
        # which aiokafka treats as fatal for this producer id (its sender stops)
        partition = TopicPartition(settings.topic("producer.probe"), 0)
        producer._producer._txn_manager.increment_sequence_number(partition, 5)
        with pytest.raises(errors.BubuhError) as refused:
            await producer.publish(_record(settings, 2))
        assert refused.value.code == errors.UNAVAILABLE and "OutOfOrderSequenceNumber" in str(refused.value)
        assert producer.renewals == 1

        for n in (2, 3, 4):                         # the caller retries, as the outbox relay and intake do
            await producer.publish(_record(settings, n))
        assert producer.renewals == 1
    finally:
        await producer.stop()
    values = [r.value for r in await read_topic(settings, "producer.probe", at_least=4)]
    assert values == [b"record-1", b"record-2", b"record-3", b"record-4"]


async def test_publish_many_puts_each_record_where_send_would_and_keeps_order_per_key(settings):
    """A large publish_many hands over whole batches per partition: every record still lands on the
    default partitioner's partition (murmur2 of its key, as a Java client computes it), in order per
    key, with its headers; batches larger than one Kafka batch are split, not refused."""
    from aiokafka.partitioner import DefaultPartitioner

    await topics.ensure(settings, (topics.Topic("producer.many", "tests", "account", "-", 4),))
    name = settings.topic("producer.many")
    records = [events.Outgoing(name, f"ch/acct-{i % 37}".encode(), f"{i:06d}".encode() + b"x" * 400,
                               [("n", str(i).encode())]) for i in range(1500)]
    producer = Producer(settings, client_id="many")
    await producer.start()
    try:
        await producer.publish_many(records)
        await producer.publish_many(records[:3])           # below the batching threshold: send() per record
    finally:
        await producer.stop()
    got = await read_topic(settings, "producer.many", at_least=1503)
    assert len(got) == 1503
    default = DefaultPartitioner()
    by_key: dict[bytes, list[int]] = {}
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        assert r.partition == default(r.key, [0, 1, 2, 3], [0, 1, 2, 3])
        n = int(r.value[:6])
        assert dict(r.headers)["n"] == str(n).encode()
        by_key.setdefault(r.key, []).append(n)
    for k in range(37):
        expected = [i for i in range(1500) if i % 37 == k] + [i for i in range(3) if i % 37 == k]
        assert by_key[f"ch/acct-{k}".encode()] == expected
