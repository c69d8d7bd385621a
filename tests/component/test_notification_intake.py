"""Events in, scheduled notifications out: the notification intake on a batch, against real PostgreSQL.

``Transactional(pool, "notification.intake", Intake.apply)`` as the pipeline drives it, with the
channel view filled in memory (the records the compacted ``channel`` topic would carry). What a
channel and a buyer would notice: one webhook per piece of news (to the channel's URL) and one
email when the request carried an address; nothing twice when the batch is delivered again;
nothing for events that are not news.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import uuid

import pytest

from services.contracts.bubuh.v1 import channel_pb2, purchase_pb2, quota_pb2, stamp_pb2
from services.kernel.channels import ChannelView
from services.kernel.events import Event
from services.kernel.processing.handler import Transactional
from services.notification.event_intake import CONSUMER, Intake, delivery_id, email_id
from tests.component import handler_support as hs

HOOK = "https://hooks.example.test:8443/bubuh/events?token=t"
HOOK_ENDPOINT = "https://hooks.example.test:8443"


@pytest.fixture(scope="module")
async def notification():
    hs.postgres_up()
    s = hs.settings()
    view = ChannelView(s)
    async with hs.service_pool(s, "notification") as pool:
        yield pool, view, Transactional(pool, CONSUMER, Intake(pool, view, s).apply)


def _channel(view: ChannelView, webhook_url: str) -> str:
    cid = "ch_" + secrets.token_hex(6)
    view.apply(channel_pb2.Channel(channel_id=cid, name=cid, status="active", default_profile="standard",
                                   webhook_url=webhook_url, version=1))
    return cid


def _credited(cid: str, email: str = "") -> Event:
    msg = quota_pb2.QuotaCredited(channel_id=cid, account_id="acct-1", purchase_id=str(uuid.uuid4()), quantity=2,
                                  balance=quota_pb2.Balance(credited=2, available=2), buyer_email=email)
    return hs.event(msg, producer="quota")


def _completed(cid: str, email: str = "", rewritten: str = "") -> Event:
    msg = stamp_pb2.StampCompleted(request_id=str(uuid.uuid4()), channel_id=cid, account_id="acct-1",
                                   sn="1ABC0000000000000000000", output_sha256="ab" * 32, email=email,
                                   rewritten_sha256=rewritten)
    return hs.event(msg, producer="stamping")


async def _deliveries(pool, cid: str) -> dict[str, dict]:
    rows = await pool.fetch("SELECT * FROM deliveries WHERE channel_id = $1", cid)
    return {r["event_id"]: dict(r) for r in rows}


async def _emails(pool, cid: str) -> dict[str, dict]:
    rows = await pool.fetch("SELECT * FROM emails WHERE channel_id = $1", cid)
    return {r["event_id"]: dict(r) for r in rows}


async def test_news_makes_one_webhook_each_and_an_email_when_there_is_an_address(notification):
    pool, view, transactional = notification
    cid = _channel(view, HOOK)
    credited_mail = _credited(cid, email="buyer@example.co.id")
    credited_quiet = _credited(cid)
    completed_mail = _completed(cid, email="  applicant@example.go.id ")
    completed_bad_address = _completed(cid, email="not an address")
    batch = [credited_mail, credited_quiet, completed_mail, completed_bad_address]
    started = dt.datetime.now(dt.UTC)

    assert await transactional.process(batch) == []

    deliveries = await _deliveries(pool, cid)
    assert set(deliveries) == {e.event_id for e in batch}
    for ev in batch:
        d = deliveries[ev.event_id]
        assert d["delivery_id"] == delivery_id(ev.event_id)
        assert (d["url"], d["endpoint"], d["status"], d["attempts"]) == (HOOK, HOOK_ENDPOINT, "pending", 0)
        assert started - dt.timedelta(seconds=5) <= d["next_attempt_at"] <= dt.datetime.now(dt.UTC)  # due now
        body = json.loads(d["body"])
        assert body["id"] == ev.event_id and body["type"] == d["event_type"]
    assert deliveries[credited_mail.event_id]["event_type"] == "quota.credited"
    assert deliveries[completed_mail.event_id]["event_type"] == "stamp.completed"
    credited_body = json.loads(deliveries[credited_mail.event_id]["body"])
    assert credited_body["data"] == {"channel_id": cid, "account_id": "acct-1",
                                     "purchase_id": credited_mail.payload.purchase_id, "quantity": 2,
                                     "balance": {"credited": 2, "pending": 0, "committed": 0, "available": 2}}
    assert "buyer_email" not in credited_body["data"]            # the buyer's address stays internal
    completed_body = json.loads(deliveries[completed_mail.event_id]["body"])
    assert completed_body["data"] == {"channel_id": cid, "account_id": "acct-1",
                                      "request_id": completed_mail.payload.request_id,
                                      "sn": "1ABC0000000000000000000", "output_sha256": "ab" * 32}

    emails = await _emails(pool, cid)
    assert {k: v["recipient"] for k, v in emails.items()} == {
        credited_mail.event_id: "buyer@example.co.id", completed_mail.event_id: "applicant@example.go.id"}
    for ev in (credited_mail, completed_mail):
        e = emails[ev.event_id]
        assert e["email_id"] == email_id(ev.event_id) and e["status"] == "pending" and e["subject"]
    assert "1ABC0000000000000000000" in emails[completed_mail.event_id]["body"]     # the SN is in the mail

    # delivered again (alone, in a later batch, twice in one batch): no second webhook, no second email
    assert await transactional.process(batch) == []
    assert await transactional.process([completed_mail, _credited(cid), completed_mail]) == []
    again = await _deliveries(pool, cid)
    assert len(again) == len(batch) + 1
    assert {k: again[k] for k in deliveries} == deliveries
    assert await _emails(pool, cid) == emails


async def test_a_stamp_on_a_rewrite_says_so_in_its_webhook(notification):
    """docs/webhooks.md: ``rewritten_sha256`` only when the stamp went onto a rewrite of the document."""
    pool, view, transactional = notification
    cid = _channel(view, HOOK)
    rewritten = _completed(cid, rewritten="cd" * 32)
    assert await transactional.process([rewritten]) == []
    data = json.loads((await _deliveries(pool, cid))[rewritten.event_id]["body"])["data"]
    assert (data["output_sha256"], data["rewritten_sha256"]) == ("ab" * 32, "cd" * 32)


async def test_events_that_are_not_news_schedule_nothing(notification):
    pool, view, transactional = notification
    cid = _channel(view, HOOK)
    balance = quota_pb2.Balance(credited=1, pending=1, available=0)
    quiet = [
        hs.event(quota_pb2.QuotaReserved(channel_id=cid, account_id="a", request_id="r1", balance=balance),
                 producer="quota"),
        hs.event(quota_pb2.QuotaCommitted(channel_id=cid, account_id="a", request_id="r1", balance=balance),
                 producer="quota"),
        hs.event(purchase_pb2.PurchaseConfirmed(purchase_id=str(uuid.uuid4()), channel_id=cid, account_id="a",
                                                quantity=1, amount=10_000, buyer_email="buyer@example.co.id"),
                 producer="purchase"),
        hs.event(stamp_pb2.StampRequested(request_id="r1", channel_id=cid, account_id="a",
                                          email="applicant@example.go.id"), producer="stamping"),
    ]
    assert await transactional.process(quiet) == []
    assert await _deliveries(pool, cid) == {}
    assert await _emails(pool, cid) == {}


async def test_a_channel_without_a_webhook_gets_no_delivery_but_the_buyer_still_gets_the_email(notification):
    pool, view, transactional = notification
    cid = _channel(view, "")
    ev = _completed(cid, email="applicant@example.go.id")
    assert await transactional.process([ev]) == []
    assert await _deliveries(pool, cid) == {}
    assert [e["recipient"] for e in (await _emails(pool, cid)).values()] == ["applicant@example.go.id"]
