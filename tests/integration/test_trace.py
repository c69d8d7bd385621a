"""``bubuh trace``: a completed stamp, a dead-lettered one and a purchase, each with its whole path,
read from Kafka and the databases (the platform's logs are never read)."""

from __future__ import annotations

import asyncio
import json

import pytest

from loadtests import corpus
from tests.flows import (
    Db,
    buy,
    order_body,
    post_stamp,
    post_until_accepted,
    read_topic,
    stamp_finished,
    stamp_meta,
    wait_for,
)
from tests.integration.test_notification_support import Receiver
from tests.platform import add_channel, cli

pytestmark = pytest.mark.shared_platform


async def trace(settings, ident: str, *args: str) -> str:
    out = await asyncio.to_thread(cli, settings, "trace", ident, *args)
    print(out.stdout)
    return out.stdout


def steps_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("  ")]


def assert_in_order(lines: list[str], expected: list[str]) -> None:
    """Each expected fragment on a line after the previous one's."""
    at = -1
    for fragment in expected:
        later = [i for i, line in enumerate(lines) if i > at and fragment in line]
        assert later, f"{fragment!r} not found after line {at}:\n" + "\n".join(lines)
        at = later[0]


async def test_a_completed_stamp_shows_every_hop_with_topic_partition_and_offset(settings, api, channel):
    await buy(api, channel, "tr-ok", 1)
    r = await post_stamp(api, channel, corpus.a4_text(1), stamp_meta("tr-ok"))
    assert r.status_code == 202, r.text
    rid = r.json()["request_id"]
    # --follow, started while the request is in flight, returns once it is completed
    followed = await trace(settings, rid, "--follow")
    assert followed.splitlines()[-1].startswith("now: completed, SN ")
    assert_in_order(steps_of(followed), ["published StampRequested", "published StampCompleted"])
    done = await stamp_finished(api, channel, rid)
    assert done["status"] == "completed"
    db = Db(settings)

    async def posted_and_notified():   # the ledger posts and notification applies just after the status
        return await db.val("quota", "SELECT count(*) FROM transfers WHERE id = $1", f"{rid}:post") and \
            await db.val("notification", "SELECT count(*) FROM inbox WHERE topic LIKE '%stamp.events'")
    await wait_for(posted_and_notified, what="ledger post and notification intake")

    text = await trace(settings, rid)
    lines = steps_of(text)
    assert text.splitlines()[0].startswith(f"stamp request {rid}")
    assert_in_order(lines, [
        "accepted (POST /v1/stamps)",
        "published StampRequested",
        "quota.ledger applied StampRequested",
        "published QuotaReserved",
        "worker started signing",
        "published StampSigned",
        "quota.ledger applied StampSigned",
        "published QuotaCommitted",
        "published StampCompleted",
    ])
    assert any("ledger transfer pending" in line for line in lines)
    assert any("ledger transfer post" in line for line in lines)
    # where each event sits, and where the ledger read it: the same topic[partition]@offset
    requested = next(line for line in lines if "published StampRequested" in line)
    applied = next(line for line in lines if "quota.ledger applied StampRequested" in line)
    where = next(w for w in requested.split() if w.startswith("stamp.requested["))
    assert "@" in where and where in applied
    assert text.splitlines()[-1] == f"now: completed, SN {done['sn']}, unit posted"

    # the SN finds the same journey; --json gives the same steps to machines
    by_sn = json.loads(await trace(settings, done["sn"], "--json"))
    assert by_sn["id"] == rid and by_sn["now"]["state"] == "completed"
    kafka_steps = [s for s in by_sn["steps"] if s["topic"]]
    assert all(s["partition"] is not None and s["offset"] is not None for s in kafka_steps)
    assert {s["topic"] for s in kafka_steps} >= {"stamp.requested", "quota.events", "stamp.events"}


async def test_a_purchase_shows_submission_confirmation_credit_and_webhook(settings, api):
    receiver = await Receiver().start()
    try:
        channel = await asyncio.to_thread(add_channel, settings, "trace-hooked", receiver.url)
        body = order_body(quantity=3, account="tr-buy")
        r = await post_until_accepted(api, channel, body)
        assert r.status_code in (200, 201, 202), r.text
        pid = r.json()["purchase_id"]
        db = Db(settings)

        async def delivered():
            return await db.val("notification", "SELECT count(*) FROM deliveries WHERE status = 'delivered' "
                                                "AND channel_id = $1", channel["channel_id"])
        await wait_for(delivered, what="the webhook delivered")
    finally:
        await receiver.stop()

    text = await trace(settings, pid)
    lines = steps_of(text)
    assert text.splitlines()[0].startswith(f"purchase {pid}")
    assert_in_order(lines, [
        "published PurchaseSubmitted",
        "purchase.confirmation applied PurchaseSubmitted",
        "published PurchaseConfirmed",
        "quota.ledger applied PurchaseConfirmed",
        "ledger transfer credit",
        "published QuotaCredited",
        "notification.intake applied QuotaCredited",
        "webhook queued (quota.credited)",
        "webhook attempt 1 delivered",
    ])
    submitted = next(line for line in lines if "published PurchaseSubmitted" in line)
    applied = next(line for line in lines if "purchase.confirmation applied PurchaseSubmitted" in line)
    where = next(w for w in submitted.split() if w.startswith("purchase.submitted["))
    assert where in applied
    assert text.splitlines()[-1].startswith("now: completed, 3 units credited")


@pytest.mark.platform_env(BUBUH_PADES_LEVEL="b-t", BUBUH_SIGNING_TSA_URL="http://127.0.0.1:9/tsa",
                          BUBUH_STAMP_MAX_ATTEMPTS=2, BUBUH_STAMP_RETRY_BASE_S=8)
async def test_a_dead_lettered_stamp_shows_its_retries_and_the_reason(settings, api, channel):
    await buy(api, channel, "tr-dlq", 1)
    r = await post_stamp(api, channel, corpus.a4_text(2), stamp_meta("tr-dlq"))
    rid = r.json()["request_id"]
    # --follow shows it waiting for its retry (due 4-8 s after the first failure: a loaded box takes seconds
    # to start the command), then ends once it is dead-lettered
    followed = (await trace(settings, rid, "--follow")).splitlines()
    assert any(line.startswith("now: waiting at ") for line in followed[:-1]), followed
    assert followed[-1].startswith("now: dead-lettered with TSA_UNAVAILABLE")
    assert_in_order(steps_of("\n".join(followed)), ["attempt 1 failed", "retry QuotaReserved (attempt 2)",
                                                     "dead-lettered QuotaReserved"])
    await read_topic(settings, "stamp.dead-letter", at_least=1, timeout=60)

    text = await trace(settings, rid)
    lines = steps_of(text)
    assert_in_order(lines, [
        "accepted (POST /v1/stamps)",
        "published StampRequested",
        "published QuotaReserved",
        "attempt 1 failed",
        "retry QuotaReserved (attempt 2)",
        "attempt 2 failed",
        "dead-lettered QuotaReserved: TSA_UNAVAILABLE",
    ])
    dead = next(line for line in lines if "dead-lettered QuotaReserved" in line)
    assert "stamp.dead-letter[" in dead and "stamping.worker" in dead
    assert text.splitlines()[-1].startswith("now: dead-lettered with TSA_UNAVAILABLE; its unit stays reserved")
    assert f"bubuh replay stamp.dead-letter --key {rid}" in text.splitlines()[-1]


async def test_an_unknown_id_is_said_so(settings, platform):
    out = await asyncio.to_thread(cli, settings, "trace", "no-such-thing", check=False)
    assert out.returncode == 1 and "no stamp request, purchase or SN" in out.stderr
