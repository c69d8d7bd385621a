"""Every Kafka compression codec, from a non-Python producer, and a batch the consumer cannot decode.

Signed purchases that a channel publishes with Kafka's own Java client (idempotent, acks=all,
multi-record batches in none, gzip, snappy, lz4 and zstd) are each credited exactly once; the
broker's raw log proves the batches really were stored in each codec. A batch the platform cannot
decode (its zstd support removed, as on a consumer built without it) is dead-lettered as a marker,
and the records behind it on the same partition are credited.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from services.kernel import events, topics
from services.kernel.processing.deadletter import DLQ_MARKER, DLQ_REASON, DLQ_SOURCE
from tests import stack
from tests.flows import Db, kafka_submission, order_body, read_topic, wait_for
from tests.javaproducer import CODECS, dump_batches, publish_with_java
from tests.platform import PlatformProcess

ORDERS = 20         # per codec
ACCOUNTS = 3        # few keys, so each partition gets several records (multi-record batches)


def _expected(records) -> dict[str, tuple[str, int]]:
    out = {}
    for rec in records:
        msg = events.decode(rec.value)[1]
        out[msg.purchase_id] = (msg.account_id, msg.quantity)
    return out


async def _credits(db: Db, channel_id: str) -> dict[str, tuple[str, int]]:
    rows = await db.fetch("quota", "SELECT id, account_id, amount FROM transfers WHERE kind = 'credit' "
                                   "AND channel_id = $1", channel_id)
    return {r["id"]: (r["account_id"], r["amount"]) for r in rows}


async def test_java_producer_purchases_are_credited_once_in_every_codec(java_kafka, platform, channel, settings):
    ch = channel["channel_id"]
    expected: dict[str, tuple[str, int]] = {}
    for codec in CODECS:
        records = [kafka_submission(settings, channel,
                                    order_body(quantity=1 + i % 3, account=f"{codec}-{i % ACCOUNTS}"))
                   for i in range(ORDERS)]
        expected.update(_expected(records))
        await asyncio.to_thread(publish_with_java, settings, records, codec)
    assert len(expected) == ORDERS * len(CODECS)

    db = Db(settings)

    async def all_credited():
        got = await _credits(db, ch)
        return got if len(got) >= len(expected) else None

    credited = await wait_for(all_credited, timeout=90, what=f"{len(expected)} credits over five codecs")
    assert credited == expected                                            # each purchase, once, right account
    balances = {r["account_id"]: r["credited"] for r in await db.fetch(
        "quota", "SELECT account_id, credited FROM accounts WHERE channel_id = $1", ch)}
    per_account = Counter()
    for account, quantity in expected.values():
        per_account[account] += quantity
    assert balances == dict(per_account)
    assert await read_topic(settings, topics.PURCHASE_DLQ.name, timeout=2) == []

    if not stack.managed_kafka():
        pytest.skip("credited; the stored codecs are only checked on the locally managed broker (its log files)")
    batches = await asyncio.to_thread(dump_batches, settings, settings.topic(topics.PURCHASE_SUBMITTED.name))
    stored = [b for per_partition in batches.values() for b in per_partition]
    assert sum(int(b["count"]) for b in stored) == len(expected), batches
    by_codec = Counter()
    for b in stored:
        by_codec[b["compresscodec"]] += int(b["count"])
    assert by_codec == {codec: ORDERS for codec in CODECS}, batches        # really stored in each codec
    assert all(int(b["producerId"]) >= 0 for b in stored), batches         # the idempotent producer's batches
    assert max(int(b["count"]) for b in stored) > 1, batches               # codecs applied to real batches


async def test_an_undecodable_batch_is_a_marker_and_the_records_behind_it_are_credited(java_kafka, settings,
                                                                                      channel, tmp_path):
    # the platform's consumers lose their zstd decoder (as if built without it): a zstd batch is undecodable
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["cramjam"] = None\n')
    proc = await PlatformProcess(settings, api="purchase", workers="purchase,quota",
                                 PYTHONPATH=str(tmp_path)).start()
    try:
        account = "one-partition"                       # one key: everything lands on one partition, in order
        before = [kafka_submission(settings, channel, order_body(account=account)) for _ in range(3)]
        bad = [kafka_submission(settings, channel, order_body(account=account)) for _ in range(5)]
        after = [kafka_submission(settings, channel, order_body(account=account)) for _ in range(3)]
        await asyncio.to_thread(publish_with_java, settings, before, "none")
        await asyncio.to_thread(publish_with_java, settings, bad, "zstd")
        await asyncio.to_thread(publish_with_java, settings, after, "gzip")

        db = Db(settings)
        good = _expected(before) | _expected(after)

        async def good_credited():
            got = await _credits(db, channel["channel_id"])
            return got if set(good) <= set(got) else None

        await wait_for(good_credited, timeout=60, what="the records before and after the undecodable batch")
        markers = await read_topic(settings, topics.PURCHASE_DLQ.name, at_least=1, timeout=20)
        assert len(markers) == 1
        headers = dict(markers[0].headers)
        assert headers[DLQ_REASON] == b"EVENT_UNDECODABLE"
        assert headers[DLQ_MARKER] == b"1" and markers[0].value == b""          # a marker: no payload
        topic, partition, span = headers[DLQ_SOURCE].decode().rsplit("/", 2)
        assert topic == settings.topic(topics.PURCHASE_SUBMITTED.name)
        assert span == "3-7"                                   # offsets of the five zstd records, exactly
        await asyncio.sleep(1)
        assert await _credits(db, channel["channel_id"]) == good                 # the bad batch credited nothing
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{settings.http_port}/metrics")).text
        assert 'bubuh_consumer_undecodable_batches_total{consumer="purchase.confirmation"' in metrics
    finally:
        await proc.stop()
