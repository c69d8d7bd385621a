"""The Kafka door for purchases: signed records are credited once; forged, unsigned or malformed
ones are dead-lettered with their reason and never credited; the consumer keeps going."""

from __future__ import annotations

import datetime as dt
import json

from services.kernel import events, topics
from services.kernel.processing.deadletter import DLQ_REASON
from services.kernel.producer import Producer
from services.kernel.signatures import HEADER_CHANNEL, HEADER_HMAC
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
from tests.platform import cli


async def _credited(db: Db, channel_id: str) -> int:
    return await db.val("quota", "SELECT coalesce(sum(amount), 0) FROM transfers WHERE kind = 'credit' "
                                 "AND channel_id = $1", channel_id) or 0


async def test_signed_kafka_purchase_is_credited_and_poison_is_dead_lettered(platform, channel, settings):
    db = Db(settings)
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
        impostor_src = kafka_submission(settings, channel, order_body(quantity=4, account="k1"))
        impostor = events.Outgoing(impostor_src.topic, impostor_src.key, impostor_src.value,
                                   [(k, b"ch_other" if k == HEADER_CHANNEL else v) for k, v in impostor_src.headers])
        garbage = events.Outgoing(good.topic, b"k1", b"\x08\x96\x01garbage-not-an-envelope", [])
        negative = kafka_submission(settings, channel, order_body(quantity=-1, amount=-10_000, account="k1"))
        after = kafka_submission(settings, channel, order_body(quantity=3, account="k1"))
        for rec in (forged, unsigned, unknown, impostor, garbage, good, negative, after):
            await producer.publish(rec)
    finally:
        await producer.stop()

    await wait_for(lambda: _credited(db, channel["channel_id"]), what="credit")
    await wait_for(lambda: _eq(_credited(db, channel["channel_id"]), 5), what="both good purchases credited")
    dlq = await read_topic(settings, topics.PURCHASE_DLQ.name, at_least=5)
    reasons = sorted(dict(r.headers)[DLQ_REASON].decode() for r in dlq)
    assert reasons == sorted(["SIGNATURE_INVALID", "SIGNATURE_MISSING", "CHANNEL_UNKNOWN", "SIGNATURE_INVALID",
                              "EVENT_MALFORMED"])
    # the negative quantity was authentic, so it is a rejected purchase (not poison), visible with its code
    rejected = await db.fetch("purchase", "SELECT status, code FROM purchases WHERE quantity = -1")
    assert [(r["status"], r["code"]) for r in rejected] == [("rejected", "QUANTITY_OUT_OF_RANGE")]
    published = decoded(await read_topic(settings, topics.PURCHASE_EVENTS.name, at_least=3))
    assert sorted(type(m).__name__ for m in published) == ["PurchaseConfirmed", "PurchaseConfirmed",
                                                          "PurchaseRejected"]
    assert await _credited(db, channel["channel_id"]) == 5


async def _eq(coro, value):
    return (await coro) == value


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
                                          "WHERE account_id LIKE 'acct-%' ORDER BY account_id")
    want = {}
    for b in bodies:
        want[b["account_id"]] = want.get(b["account_id"], 0) + b["quantity"]
    assert {r["account_id"]: r["credited"] for r in per_account} == want
    assert await db.val("quota", "SELECT count(*) FROM transfers WHERE kind = 'credit'") == len(bodies) + 1
    assert await db.val("purchase", "SELECT count(*) FROM purchases WHERE status = 'confirmed'") == len(bodies) + 1


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
    assert await _credited(db, channel["channel_id"]) == 2
