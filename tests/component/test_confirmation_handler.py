"""``purchase.submitted`` -> ``purchase.events``: the confirmation handler on a batch, against real PostgreSQL.

A partition batch as the pipeline hands it to ``Transactional(pool, "purchase.confirmation", apply)``:
signed submissions of a registered channel, a forged one, one from an unknown channel, duplicates
and an order id reused with another body. What a channel would notice: each paid order confirmed
once, forgeries never confirmed and handed back for the dead-letter topic (and not remembered, so
a replay after the cause is fixed applies them), a reused order id rejected with
IDEMPOTENCY_MISMATCH, and a redelivered batch changing nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import uuid

import pytest
from prometheus_client import REGISTRY

from services.kernel import errors, events, inbox, sealed, topics
from services.kernel.events import Event, Outgoing
from services.kernel.signatures import HEADER_HMAC, hmac_hex
from services.purchase.confirmation import CONSUMER, Confirmation
from services.purchase.http_intake import submitted_record
from services.purchase.registry import Registry
from services.purchase.validation import PurchaseOrder
from tests.component import handler_support as hs


@pytest.fixture(scope="module")
async def purchase():
    hs.postgres_up()
    s = hs.settings()
    async with hs.service_pool(s, "purchase") as pool:
        registry = Registry(pool, s)
        yield s, pool, registry, Confirmation(pool, registry, s).handler()


PAID_AT = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)   # part of an order's body


def _order(channel_id: str, order_id: str, account: str = "acct-1", quantity: int = 1) -> PurchaseOrder:
    return PurchaseOrder(channel_id=channel_id, channel_order_id=order_id, account_id=account, quantity=quantity,
                         amount=quantity * 10_000, paid_at=PAID_AT,
                         payment_ref="VA-1")


def _submitted(s, order: PurchaseOrder, secret: str, event_id: str | None = None) -> Event:
    """Signed with ``secret`` (HMAC over the record value), as the channel publishes it to Kafka."""
    return hs.as_event(submitted_record(s, order, secret.encode(), producer=f"channel:{order.channel_id}",
                                        event_id=event_id))


async def _published(pool, channel_id: str) -> list[tuple[str, str, str, str]]:
    """(type, purchase id, code, event id) of what the handler queued on purchase.events for a channel."""
    out = []
    for event_id, msg in await hs.outbox(pool):
        if getattr(msg, "channel_id", None) == channel_id and type(msg).__name__.startswith("Purchase"):
            out.append((type(msg).__name__, msg.purchase_id, getattr(msg, "code", ""), event_id))
    return out


async def _state(pool, channel_id: str) -> tuple:
    return (await pool.fetch("SELECT purchase_id, channel_order_id, status, code FROM purchases WHERE channel_id = $1 "
                             "ORDER BY purchase_id", channel_id),
            await pool.fetch("SELECT id, event_id, topic FROM outbox ORDER BY id"),
            await pool.fetch("SELECT event_id FROM inbox WHERE consumer = $1 ORDER BY event_id", CONSUMER))


async def test_a_mixed_batch_confirms_each_paid_order_once_and_hands_back_forgeries(purchase):
    s, pool, registry, transactional = purchase
    channel = await registry.add("pos-indonesia")
    cid, secret = channel.channel_id, channel.hmac_secret
    stranger = "ch_" + secrets.token_hex(6)          # signs correctly, with a secret of a channel we do not have
    stranger_secret = secrets.token_hex(32)

    good_1 = _submitted(s, _order(cid, "POS-1", "acct-1", quantity=2), secret)
    good_2 = _submitted(s, _order(cid, "POS-2", "acct-2", quantity=1), secret)
    forged = _submitted(s, _order(cid, "POS-3", "acct-1", quantity=5), secrets.token_hex(32))
    unknown = _submitted(s, _order(stranger, "ST-1", "acct-9", quantity=1), stranger_secret)
    resent = _submitted(s, _order(cid, "POS-2", "acct-2", quantity=1), secret, event_id=str(uuid.uuid4()))
    reused = _submitted(s, _order(cid, "POS-1", "acct-1", quantity=3), secret)     # same order id, other body
    batch = [good_1, forged, good_2, unknown, good_1, reused, resent]

    rejected = await transactional.process(batch)

    # forged and unknown come back for the dead-letter topic, with the reason a channel can act on
    assert {(r.event.event_id, r.error.code.code) for r in rejected} == {
        (forged.event_id, errors.SIGNATURE_INVALID.code), (unknown.event_id, errors.CHANNEL_UNKNOWN.code)}
    # each paid order confirmed once; the reused order id rejected; nothing for the forgeries
    pid_1, pid_2, pid_reused = (e.payload.purchase_id for e in (good_1, good_2, reused))
    published = await _published(pool, cid)
    assert [(kind, pid, code) for kind, pid, code, _ in published] == [
        ("PurchaseConfirmed", pid_1, ""), ("PurchaseConfirmed", pid_2, ""),
        ("PurchaseRejected", pid_reused, errors.IDEMPOTENCY_MISMATCH.code)]
    assert await _published(pool, stranger) == []
    topic_rows = await pool.fetch("SELECT DISTINCT topic FROM outbox WHERE event_id = ANY($1::text[])",
                                  [e for *_, e in published])
    assert [r["topic"] for r in topic_rows] == [s.topic(topics.PURCHASE_EVENTS.name)]
    confirmed = {m.purchase_id: m for _, m in await hs.outbox(pool) if type(m).__name__ == "PurchaseConfirmed"
                 and m.channel_id == cid}
    assert (confirmed[pid_1].account_id, confirmed[pid_1].quantity) == ("acct-1", 2)
    assert (confirmed[pid_2].account_id, confirmed[pid_2].quantity) == ("acct-2", 1)

    rows = {r["purchase_id"]: (r["channel_order_id"], r["status"], r["code"])
            for r in await pool.fetch("SELECT * FROM purchases WHERE channel_id = $1", cid)}
    assert rows == {pid_1: ("POS-1", "confirmed", None), pid_2: ("POS-2", "confirmed", None),
                    pid_reused: ("POS-1", "rejected", errors.IDEMPOTENCY_MISMATCH.code)}
    assert await pool.fetchval("SELECT count(*) FROM purchases WHERE channel_id = $1", stranger) == 0

    # the inbox remembers what was applied, and forgets what was handed back (a replay must apply it)
    # (keyed on the event id and the record's bytes: channels choose their event ids)
    claimed = {r["event_id"] for r in await pool.fetch("SELECT event_id FROM inbox WHERE consumer = $1", CONSUMER)}
    assert {inbox.by_content(e) for e in (good_1, good_2, resent, reused)} <= claimed
    assert not {inbox.by_content(forged), inbox.by_content(unknown)} & claimed

    # the whole batch delivered again: nothing changes; the forgeries are handed back again
    before = await _state(pool, cid)
    again = await transactional.process(batch)
    assert await _state(pool, cid) == before
    assert sorted(r.error.code.code for r in again) == sorted([errors.SIGNATURE_INVALID.code,
                                                               errors.CHANNEL_UNKNOWN.code])

    # once the unknown channel exists (registered after its record arrived), replaying that record confirms it
    await pool.execute(
        "INSERT INTO channels (channel_id, name, api_key_sha256, hmac_secret_sealed) VALUES ($1, $2, $3, $4)",
        stranger, "late-registration", secrets.token_hex(32),
        sealed.seal(s.platform_key(), stranger_secret.encode(), stranger.encode()))
    assert await transactional.process([unknown]) == []
    assert [(kind, pid) for kind, pid, _, _ in await _published(pool, stranger)] == [
        ("PurchaseConfirmed", unknown.payload.purchase_id)]
    # a forgery stays a forgery
    assert [r.error.code.code for r in await transactional.process([forged])] == [errors.SIGNATURE_INVALID.code]
    assert await pool.fetchval("SELECT count(*) FROM purchases WHERE channel_id = $1 AND channel_order_id = 'POS-3'",
                               cid) == 0


async def test_an_order_id_reused_in_a_later_batch_is_rejected_and_the_original_stays_confirmed(purchase):
    s, pool, registry, transactional = purchase
    channel = await registry.add("bank-x")
    cid, secret = channel.channel_id, channel.hmac_secret
    original = _submitted(s, _order(cid, "BX-7", "acct-1", quantity=2), secret)
    assert await transactional.process([original]) == []

    other_body = _submitted(s, _order(cid, "BX-7", "acct-1", quantity=4), secret)
    same_body_new_event = _submitted(s, _order(cid, "BX-7", "acct-1", quantity=2), secret, event_id=str(uuid.uuid4()))
    assert await transactional.process([other_body, same_body_new_event, original]) == []

    pid, other_pid = original.payload.purchase_id, other_body.payload.purchase_id
    assert [(kind, p, code) for kind, p, code, _ in await _published(pool, cid)] == [
        ("PurchaseConfirmed", pid, ""), ("PurchaseRejected", other_pid, errors.IDEMPOTENCY_MISMATCH.code)]
    status = {r["purchase_id"]: r["status"] for r in await pool.fetch(
        "SELECT purchase_id, status FROM purchases WHERE channel_id = $1", cid)}
    assert status == {pid: "confirmed", other_pid: "rejected"}


# --- hostile channels: a channel's own records cannot undo a confirmation or choose the clock ------

def _signed(s, order: PurchaseOrder, secret: str, *, occurred_at: dt.datetime | None = None,
            appended_at: dt.datetime | None = None) -> Event:
    """A submission whose envelope says ``occurred_at`` (the channel writes that field), signed after
    the change as a channel that wants it would sign it; ``appended_at`` is the broker's clock."""
    rec = submitted_record(s, order, secret.encode(), producer=f"channel:{order.channel_id}",
                           event_id=str(uuid.uuid4()))
    if occurred_at is not None:
        env, _ = events.decode(rec.value)
        env.occurred_at.FromDatetime(occurred_at)
        value = env.SerializeToString()
        rec = Outgoing(rec.topic, rec.key, value, [(HEADER_HMAC, hmac_hex(secret.encode(), value).encode())])
    event = hs.as_event(rec)
    if appended_at is not None:
        event = dataclasses.replace(event, appended_at_ms=int(appended_at.timestamp() * 1000))
    return event


async def test_a_confirmed_order_resent_back_dated_stays_confirmed_and_is_credited_once(purchase):
    s, pool, registry, transactional = purchase
    channel = await registry.add("resender")
    cid, secret = channel.channel_id, channel.hmac_secret
    paid = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(seconds=30)
    order = dataclasses.replace(_order(cid, "RS-1", quantity=7), paid_at=paid)
    assert await transactional.process([_signed(s, order, secret)]) == []

    an_hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    back_dated = _signed(s, order, secret, occurred_at=an_hour_ago)
    other_body = _signed(s, dataclasses.replace(order, quantity=9, amount=90_000), secret, occurred_at=an_hour_ago)
    assert await transactional.process([back_dated]) == []
    assert await transactional.process([other_body]) == []

    pid = order.purchase_id()
    rows = {r["purchase_id"]: (r["status"], r["code"]) for r in await pool.fetch(
        "SELECT purchase_id, status, code FROM purchases WHERE channel_id = $1", cid)}
    assert rows[pid] == ("confirmed", None), "a later record of the channel changed a confirmed purchase"
    published = [(kind, p, code) for kind, p, code, _ in await _published(pool, cid)]
    assert [p for p in published if p[0] == "PurchaseConfirmed"] == [("PurchaseConfirmed", pid, "")]
    assert ("PurchaseRejected", pid, errors.PAID_AT_IN_FUTURE.code) not in published
    assert published[-1] == ("PurchaseRejected", other_body.payload.purchase_id, errors.IDEMPOTENCY_MISMATCH.code)


async def test_paid_at_is_judged_by_the_platforms_receive_time_not_the_envelope(purchase):
    s, pool, registry, transactional = purchase
    channel = await registry.add("clockwork")
    cid, secret = channel.channel_id, channel.hmac_secret
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    future = dataclasses.replace(_order(cid, "CW-1"), paid_at=now + dt.timedelta(hours=1))
    # the channel claims its record was written two hours from now: irrelevant
    claims_later = _signed(s, future, secret, occurred_at=now + dt.timedelta(hours=2))
    # the broker appended it half an hour ago; paid 10 minutes ago is after that receive time
    early = dataclasses.replace(_order(cid, "CW-2"), paid_at=now - dt.timedelta(minutes=10))
    received_earlier = _signed(s, early, secret, appended_at=now - dt.timedelta(minutes=30))
    ok = dataclasses.replace(_order(cid, "CW-3"), paid_at=now - dt.timedelta(minutes=10))
    received_now = _signed(s, ok, secret, occurred_at=now - dt.timedelta(days=3), appended_at=now)
    assert await transactional.process([claims_later, received_earlier, received_now]) == []
    codes = {r["channel_order_id"]: (r["status"], r["code"]) for r in await pool.fetch(
        "SELECT channel_order_id, status, code FROM purchases WHERE channel_id = $1", cid)}
    assert codes == {"CW-1": ("rejected", errors.PAID_AT_IN_FUTURE.code),
                     "CW-2": ("rejected", errors.PAID_AT_IN_FUTURE.code),
                     "CW-3": ("confirmed", None)}


async def test_an_authentic_refusal_reaches_the_channel_and_a_forgery_is_only_counted(purchase):
    s, pool, registry, transactional = purchase
    channel = await registry.add("told")
    cid, secret = channel.channel_id, channel.hmac_secret
    rotated = await registry.rotate_secret(cid, grace=dt.timedelta(seconds=-1))    # grace already over
    stale = _submitted(s, _order(cid, "TD-1"), secret)
    fresh = _submitted(s, _order(cid, "TD-2"), rotated.hmac_secret)
    forged = _submitted(s, _order(cid, "TD-3"), secrets.token_hex(32))
    before = _unverified(cid, errors.SIGNATURE_INVALID.code)
    handed_back = await transactional.process([stale, fresh, forged])
    assert [(r.event.payload.channel_order_id, r.error.code.code) for r in handed_back] == [
        ("TD-3", errors.SIGNATURE_INVALID.code)]
    assert _unverified(cid, errors.SIGNATURE_INVALID.code) == before + 1

    await registry.set_status(cid, "suspended")
    suspended = _submitted(s, _order(cid, "TD-4"), rotated.hmac_secret)
    assert await transactional.process([suspended]) == []
    told = [(kind, code) for kind, _, code, _ in await _published(pool, cid)]
    assert told == [("PurchaseRejected", errors.SIGNATURE_KEY_EXPIRED.code), ("PurchaseConfirmed", ""),
                    ("PurchaseRejected", errors.CHANNEL_INACTIVE.code)]
    rows = {r["channel_order_id"]: r["code"] for r in await pool.fetch(
        "SELECT channel_order_id, code FROM purchases WHERE channel_id = $1", cid)}
    assert rows == {"TD-1": errors.SIGNATURE_KEY_EXPIRED.code, "TD-2": None, "TD-4": errors.CHANNEL_INACTIVE.code}

    nobody = _submitted(s, _order("ch_" + secrets.token_hex(6), "NB-1"), secrets.token_hex(32))
    before_unknown = _unverified("unknown", errors.CHANNEL_UNKNOWN.code)
    assert [r.error.code.code for r in await transactional.process([nobody])] == [errors.CHANNEL_UNKNOWN.code]
    assert _unverified("unknown", errors.CHANNEL_UNKNOWN.code) == before_unknown + 1


def _unverified(claimed: str, code: str) -> float:
    return REGISTRY.get_sample_value("bubuh_purchase_unverified_records_total",
                                     {"claimed_channel": claimed, "code": code}) or 0.0


async def test_a_record_reusing_another_channels_event_id_does_not_pre_empt_it(purchase):
    """Channels choose event ids (the HTTP door's are derived from public rules): a record of
    channel B, or a forgery naming A, under A's next event id must not make A's record a duplicate."""
    s, pool, registry, transactional = purchase
    a = await registry.add("victim")
    b = await registry.add("squatter")
    shared_id = str(uuid.uuid4())
    genuine = _submitted(s, _order(a.channel_id, "V-1", quantity=3), a.hmac_secret, event_id=shared_id)
    squatting = _submitted(s, _order(b.channel_id, "S-1", quantity=1), b.hmac_secret, event_id=shared_id)
    forged = _submitted(s, _order(a.channel_id, "V-2", quantity=9), secrets.token_hex(32), event_id=shared_id)
    assert await transactional.process([squatting]) == []
    handed_back = await transactional.process([forged, genuine])
    assert [r.event.payload.channel_order_id for r in handed_back] == ["V-2"]
    confirmed = {r["channel_order_id"] for r in await pool.fetch(
        "SELECT channel_order_id FROM purchases WHERE status = 'confirmed' AND channel_id = ANY($1::text[])",
        [a.channel_id, b.channel_id])}
    assert confirmed == {"V-1", "S-1"}
    assert await transactional.process([genuine]) == []          # the same record again: a duplicate
    assert [k for k, *_ in await _published(pool, a.channel_id)] == ["PurchaseConfirmed"]
