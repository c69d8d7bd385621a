"""The Kafka door for purchases: signed records are credited once; forged, unsigned or malformed
ones are dead-lettered with their reason and never credited; the consumer keeps going."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.kernel import events, kafka_auth, topics
from services.kernel.processing.deadletter import DLQ_REASON
from services.kernel.processing.kafka_source import KafkaSource
from services.kernel.producer import Producer
from services.kernel.signatures import HEADER_HMAC, hmac_hex
from services.purchase.validation import PurchaseOrder
from tests.flows import (
    Db,
    auth,
    decoded,
    kafka_submission,
    order_body,
    post_until_accepted,
    read_topic,
    wait_for,
)
from tests.platform import add_channel, cli

# the tests on the platform share one (each with a channel of its own); the topic test needs topics of its own
shared = pytest.mark.shared_platform


async def _credited(db: Db, channel_id: str) -> int:
    return await db.val("quota", "SELECT coalesce(sum(amount), 0) FROM transfers WHERE kind = 'credit' "
                                 "AND channel_id = $1", channel_id) or 0


@shared
async def test_signed_kafka_purchase_is_credited_and_poison_is_dead_lettered(platform, channel, settings):
    db = Db(settings)
    started_ms = int(time.time() * 1000) - 1000    # the dead letters of this test (the module shares the topics)
    producer = Producer(settings)
    await producer.start()
    try:
        good = kafka_submission(settings, channel, order_body(quantity=2, account="k1"))
        forged = kafka_submission(settings, channel, order_body(quantity=7, account="k1"), secret="0" * 64)
        unsigned_src = kafka_submission(settings, channel, order_body(quantity=5, account="k1"))
        unsigned = events.Outgoing(unsigned_src.topic, unsigned_src.key, unsigned_src.value,
                                   [h for h in unsigned_src.headers if h[0] != HEADER_HMAC], unsigned_src.event_id)
        stranger = dict(channel, channel_id="ch_nobody")
        unknown = kafka_submission(settings, stranger, order_body(quantity=9, account="k1"))
        # signed by this channel, naming another registered channel in the payload: the payload decides
        other = add_channel(settings)
        impostor = kafka_submission(settings, dict(other, hmac_secret=channel["hmac_secret"]),
                                    order_body(quantity=4, account="k1"))
        garbage = events.Outgoing(good.topic, b"k1", b"\x08\x96\x01garbage-not-an-envelope", [])
        negative = kafka_submission(settings, channel, order_body(quantity=-1, amount=-10_000, account="k1"))
        after = kafka_submission(settings, channel, order_body(quantity=3, account="k1"))
        for rec in (forged, unsigned, unknown, impostor, garbage, good, negative, after):
            await producer.publish(rec)
    finally:
        await producer.stop()

    await wait_for(lambda: _credited(db, channel["channel_id"]), what="credit")
    await wait_for(lambda: _eq(_credited(db, channel["channel_id"]), 5), what="both good purchases credited")
    dlq = [r for r in await read_topic(settings, topics.PURCHASE_DLQ.name, at_least=5) if r.timestamp >= started_ms]
    reasons = sorted(dict(r.headers)[DLQ_REASON].decode() for r in dlq)
    assert reasons == sorted(["SIGNATURE_INVALID", "SIGNATURE_MISSING", "CHANNEL_UNKNOWN", "SIGNATURE_INVALID",
                              "EVENT_MALFORMED"])
    # the negative quantity was authentic, so it is a rejected purchase (not poison), visible with its code
    rejected = await db.fetch("purchase", "SELECT status, code FROM purchases WHERE quantity = -1 AND channel_id = $1",
                              channel["channel_id"])
    assert [(r["status"], r["code"]) for r in rejected] == [("rejected", "QUANTITY_OUT_OF_RANGE")]
    published = [m for m in decoded(await read_topic(settings, topics.PURCHASE_EVENTS.name, at_least=3))
                 if m.channel_id == channel["channel_id"]]
    assert sorted(type(m).__name__ for m in published) == ["PurchaseConfirmed", "PurchaseConfirmed",
                                                          "PurchaseRejected"]
    assert await _credited(db, channel["channel_id"]) == 5


async def _eq(coro, value):
    return (await coro) == value


@shared
async def test_rotated_secret_keeps_the_old_one_valid_for_the_grace_period(platform, channel, settings):
    db = Db(settings)
    new = json.loads(cli(settings, "channel", "rotate-secret", channel["channel_id"], "--json").stdout)
    producer = Producer(settings)
    await producer.start()
    try:
        await producer.publish(kafka_submission(settings, channel, order_body(quantity=1, account="r")))
        await producer.publish(kafka_submission(settings, channel, order_body(quantity=2, account="r"),
                                                secret=new["hmac_secret"]))
    finally:
        await producer.stop()
    await wait_for(lambda: _eq(_credited(db, channel["channel_id"]), 3), what="old and new secret accepted")


@shared
async def test_every_purchase_delivered_three_times_is_credited_once(platform, api, channel, settings):
    """HTTP retry, the channel re-publishing to Kafka, and Kafka redelivering the confirmation."""
    db = Db(settings)
    bodies = [order_body(quantity=q, account=f"acct-{q % 4}") for q in range(1, 41)]
    producer = Producer(settings)
    await producer.start()
    try:
        for body in bodies:
            assert (await post_until_accepted(api, channel, body)).status_code == 202
            assert (await api.post("/v1/purchases", json=body, headers=auth(channel))).status_code == 202
            await producer.publish(kafka_submission(settings, channel, body))   # a fresh event id, same order
        expected = sum(b["quantity"] for b in bodies)
        await wait_for(lambda: _eq(_credited(db, channel["channel_id"]), expected), timeout=60, what="credits")
        # redeliver every confirmation to the quota service
        for rec in await read_topic(settings, topics.PURCHASE_EVENTS.name, at_least=len(bodies)):
            await producer.publish(events.Outgoing(rec.topic, rec.key, rec.value, list(rec.headers)))
    finally:
        await producer.stop()
    marker = order_body(quantity=1, account="marker")
    await post_until_accepted(api, channel, marker)
    await wait_for(lambda: _eq(_credited(db, channel["channel_id"]), expected + 1), what="marker credited")
    per_account = await db.fetch("quota", "SELECT account_id, credited, pending, committed FROM accounts "
                                          "WHERE account_id LIKE 'acct-%' AND channel_id = $1 ORDER BY account_id",
                                 channel["channel_id"])
    want = {}
    for b in bodies:
        want[b["account_id"]] = want.get(b["account_id"], 0) + b["quantity"]
    assert {r["account_id"]: r["credited"] for r in per_account} == want
    mine = channel["channel_id"]
    assert await db.val("quota", "SELECT count(*) FROM transfers WHERE kind = 'credit' AND channel_id = $1",
                        mine) == len(bodies) + 1
    assert await db.val("purchase", "SELECT count(*) FROM purchases WHERE status = 'confirmed' AND channel_id = $1",
                        mine) == len(bodies) + 1


@shared
async def test_a_body_mismatch_found_downstream_rejects_the_later_purchase(platform, api, channel, settings):
    """What happens when intake could not check (PostgreSQL away, or two doors): the consumer decides."""
    db = Db(settings)
    first = order_body(quantity=2, account="m", order_id="SAME-ORDER")
    second = dict(first, quantity=3, amount=30_000)
    producer = Producer(settings)
    await producer.start()
    try:
        await producer.publish(kafka_submission(settings, channel, first))
        await producer.publish(kafka_submission(settings, channel, second))
    finally:
        await producer.stop()
    second_id = PurchaseOrder(channel_id=channel["channel_id"], channel_order_id="SAME-ORDER", account_id="m",
                              quantity=3, amount=30_000, paid_at=dt.datetime.fromisoformat(second["paid_at"]),
                              payment_ref=second["payment_ref"]).purchase_id()

    async def rejected():
        r = await api.get(f"/v1/purchases/{second_id}", headers=auth(channel))
        return r.status_code == 200 and r.json()["status"] == "rejected" and r.json()
    status = await wait_for(rejected, what="second body rejected")
    assert status["code"] == "IDEMPOTENCY_MISMATCH"
    # the first body's credit travels on through purchase.events to the ledger: it may land after the
    # second body's rejection; exactly the first body's 2 units, never the second's 3 (or 5)
    await wait_for(lambda: _eq(_credited(db, channel["channel_id"]), 2), what="the first body credited")
    await asyncio.sleep(1)
    assert await _credited(db, channel["channel_id"]) == 2


@shared
async def test_a_channel_cannot_undo_or_repeat_a_confirmed_order_on_the_real_broker(platform, api, channel, settings):
    """The hostile resend of issue 10: a confirmed order re-sent correctly signed but back-dated an
    hour, then the same order id with another body. Before, the first flipped the purchase to
    rejected (PAID_AT_IN_FUTURE, credit kept) and the second was credited again."""
    db = Db(settings)
    body = order_body(quantity=7, account="hostile", order_id="HOSTILE-1")
    body["paid_at"] = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=20)).isoformat()
    producer = Producer(settings)
    await producer.start()
    try:
        await producer.publish(kafka_submission(settings, channel, body))
        await wait_for(lambda: _eq(_credited(db, channel["channel_id"]), 7), what="first credit")
        await producer.publish(_back_dated(kafka_submission(settings, channel, body), channel, hours=1))
        other = dict(body, quantity=9, amount=90_000)
        await producer.publish(_back_dated(kafka_submission(settings, channel, other), channel, hours=1))
    finally:
        await producer.stop()

    async def both_seen():
        r = await api.get("/v1/purchases", params={"channel_order_id": "HOSTILE-1"}, headers=auth(channel))
        return r.status_code == 200 and len(r.json()["purchases"]) == 2 and r.json()
    seen = await wait_for(both_seen, what="the second body recorded")
    assert [(p["status"], p.get("code")) for p in seen["purchases"]] == [
        ("confirmed", None), ("rejected", "IDEMPOTENCY_MISMATCH")]
    await asyncio.sleep(1.0)      # the back-dated resend was applied before the second body (same key, in order)
    assert await _credited(db, channel["channel_id"]) == 7
    assert await db.val("purchase", "SELECT status FROM purchases WHERE channel_order_id = 'HOSTILE-1' "
                                    "AND quantity = 7 AND channel_id = $1", channel["channel_id"]) == "confirmed"


def _back_dated(rec: events.Outgoing, channel: dict, hours: int) -> events.Outgoing:
    """The same record with its envelope's occurred_at moved back, re-signed as the channel would."""
    env, _ = events.decode(rec.value)
    env.occurred_at.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours))
    value = env.SerializeToString()
    return events.Outgoing(rec.topic, rec.key, value,
                           [(HEADER_HMAC, hmac_hex(channel["hmac_secret"].encode(), value).encode())])


async def test_purchase_submitted_is_stamped_by_the_broker_even_when_created_before(settings, local_stack):
    """LogAppendTime on purchase.submitted: a channel cannot choose the time a record was received.
    A topic created without it (an older deployment) gets it when the services start."""
    admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(settings))
    await admin.start()
    try:
        name = settings.topic(topics.PURCHASE_SUBMITTED.name)
        await admin.create_topics([NewTopic(name, 1, 1)])                  # CreateTime, the broker default
        assert await _timestamp_type(admin, name) == "CreateTime"
        await topics.ensure(settings)
        assert await _timestamp_type(admin, name) == "LogAppendTime"
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**kafka_auth.aiokafka_options(settings), acks="all")
    await producer.start()
    try:
        claimed = int((dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).timestamp() * 1000)
        await producer.send_and_wait(name, b"v", timestamp_ms=claimed)
    finally:
        await producer.stop()
    source = KafkaSource(settings, [name], group_id=settings.group("stamp-check"), client_id="t", max_batch=10)
    await source.start()
    try:
        got: list = []
        deadline = asyncio.get_running_loop().time() + 20
        while not got and asyncio.get_running_loop().time() < deadline:
            got = [r for rs in (await source.poll(0.5, 10)).records.values() for r in rs]
    finally:
        await source.stop()
    assert got, "the record was not read back"
    assert abs(got[0].appended_at_ms - time.time() * 1000) < 60_000, "the producer's timestamp was kept"


async def _timestamp_type(admin, name: str) -> str:
    async def described():     # a topic just created may take a moment to be described
        got = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, {"message.timestamp.type": None})])
        return {e[0]: e[1] for r in got for res in r.resources for e in res[4]}.get("message.timestamp.type")
    return await wait_for(described, timeout=15, what=f"{name} described")
