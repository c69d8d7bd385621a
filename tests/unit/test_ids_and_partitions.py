"""Cheaper derivations that must give exactly what the standard ones give: ids a replay republishes,
and the partition a Java client would choose for the same key."""

from __future__ import annotations

import datetime as dt
import random
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from google.protobuf import timestamp_pb2

from services.contracts.bubuh.v1 import quota_pb2
from services.kernel import derived_ids, events, partitioning


def _signed(x: int) -> int:
    return x - 2**32 if x >= 2**31 else x


# org.apache.kafka.common.utils.UtilsTest#testMurmur2: what the Java client computes
@pytest.mark.parametrize("data, java", [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
])
def test_murmur2_matches_the_java_client(data, java):
    assert _signed(partitioning.murmur2(data)) == java


def test_partition_is_the_default_partitioners_for_any_key():
    rng = random.Random(9)
    default = DefaultPartitioner()
    for i in range(3000):
        key = rng.randbytes(rng.randrange(0, 70)) if i % 2 else f"ch_{i % 7}/acct-{i}".encode()
        assert partitioning.murmur2(key) == aiokafka_murmur2(key)
        for n in (1, 3, 4, 12):
            parts = list(range(n))
            assert partitioning.partitioner(key, parts, parts) == default(key, parts, parts)
            # asked again (remembered hash): the same answer
            assert partitioning.partitioner(bytearray(key), parts, parts[:1]) == default(key, parts, parts)


def test_unkeyed_records_go_to_an_available_partition():
    assert {partitioning.partitioner(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert partitioning.partitioner(None, [0, 1], []) in (0, 1)


def test_uuid5_is_the_standard_librarys():
    rng = random.Random(5)
    for _ in range(2000):
        ns = uuid.UUID(int=rng.getrandbits(128))
        name = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)]))
                       for _ in range(rng.randrange(0, 90)))
        expected = str(uuid.uuid5(ns, name))
        assert derived_ids.uuid5(ns, name) == expected
        assert derived_ids.uuid5(derived_ids.uuid_bytes(str(ns)), name) == expected


def test_utc_datetime_is_the_librarys_conversion():
    rng = random.Random(7)
    for seconds in [0, -1, 1, -62135596800, 253402300799] + [rng.randrange(-62135596800, 253402300800)
                                                               for _ in range(3000)]:
        for nanos in (0, 999, 1000, 999_999_999, rng.randrange(0, 10**9)):
            ts = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
            assert events.utc_datetime(ts) == ts.ToDatetime(tzinfo=dt.UTC)
            assert events.utc_datetime(ts).tzinfo is dt.UTC
    for seconds, nanos in ((253402300800, 0), (-62135596801, 0), (0, -1), (0, 10**9)):
        with pytest.raises(ValueError):
            events.utc_datetime(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))


def test_envelope_time_is_now_to_the_microsecond():
    before = dt.datetime.now(dt.UTC)
    env = events.envelope(quota_pb2.Balance(), producer="x")
    after = dt.datetime.now(dt.UTC)
    assert env.occurred_at.nanos % 1000 == 0
    assert before <= env.occurred_at.ToDatetime(tzinfo=dt.UTC) <= after
    given = dt.datetime(2024, 9, 5, 10, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=7)))
    env = events.envelope(quota_pb2.Balance(), producer="x", occurred_at=given)
    assert env.occurred_at.ToDatetime(tzinfo=dt.UTC) == given


def test_uuid_bytes_of_any_spelling_is_the_standard_librarys():
    u = uuid.uuid4()
    for text in (str(u), str(u).upper(), u.hex, "{" + str(u) + "}", "urn:uuid:" + str(u)):
        assert derived_ids.uuid_bytes(text) == u.bytes
    for bad in ("x" * 36, "12345678-1234-1234-1234-12345678901g", ""):
        with pytest.raises(ValueError):
            derived_ids.uuid_bytes(bad)


@pytest.mark.parametrize("paid_at", [
    dt.datetime(2024, 9, 5, 10, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=7))),
    dt.datetime(2024, 9, 5, 3, 0, 0, 123456, tzinfo=dt.UTC),
    dt.datetime(1000, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC),
    dt.datetime(999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
    dt.datetime(5, 1, 1, tzinfo=dt.UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
])
def test_purchase_fingerprint_keeps_its_strftime_form(paid_at):
    import hashlib

    from services.purchase.validation import PurchaseOrder
    order = PurchaseOrder(channel_id="ch", channel_order_id="o-1", account_id="a", quantity=2, amount=20000,
                          paid_at=paid_at, payment_ref="VA-1")
    paid = paid_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    canon = "\x1f".join(["o-1", "a", "2", "20000", paid, "VA-1"])
    assert order.body_sha256() == hashlib.sha256(canon.encode()).hexdigest()
    assert order.purchase_id() == str(uuid.uuid5(uuid.UUID("6f1c1a4e-2f0b-4c53-9b7e-6d8a2b4f0e11"),
                                                 f"ch\x1fo-1\x1f{order.body_sha256()}"))
