"""The HTTP door for purchases: authenticate, validate, answer 202 once Kafka has the event.

Idempotency without depending on PostgreSQL: the purchase id is derived from the channel, the
order id and the body, so a retry is the same purchase whether or not the database answered.
When PostgreSQL is up, intake also records the purchase as ``accepted`` (so it is visible at once)
and answers a repeated order from the table (same body: the original answer; other body: 409).
When it is down, intake goes on accepting; the consumer de-duplicates later.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg

from services.contracts.bubuh.v1 import purchase_pb2
from services.kernel import derived_ids, errors, events, failures, logs, topics
from services.kernel.channels import ChannelInfo, ChannelView
from services.kernel.producer import Producer
from services.kernel.settings import Settings
from services.kernel.signatures import HEADER_HMAC, hmac_hex
from services.purchase import NAME
from services.purchase.metrics import PURCHASES
from services.purchase.validation import PurchaseOrder, validate

log = logs.get(__name__)

DB_CHECK_TIMEOUT_S = 0.5
DB_RETRY_AFTER_S = 2.0   # after an outage, answer without the database for this long (latency stays flat)


@dataclass(frozen=True)
class Accepted:
    purchase_id: str
    status: str
    replayed: bool = False


def submitted_event_id(purchase_id: str) -> str:
    # the same purchase submitted again is the same event: every consumer's inbox sees one
    return derived_ids.uuid5(derived_ids.uuid_bytes(purchase_id), "submitted")


def submitted_record(settings: Settings, order: PurchaseOrder, secret: bytes, *, producer: str,
                     event_id: str | None = None) -> events.Outgoing:
    """A signed ``purchase.submitted`` record, as a channel (or our intake on its behalf) publishes it."""
    msg = purchase_pb2.PurchaseSubmitted(
        purchase_id=order.purchase_id(), channel_id=order.channel_id, channel_order_id=order.channel_order_id,
        account_id=order.account_id, quantity=order.quantity, amount=order.amount, payment_ref=order.payment_ref,
        buyer_email=order.buyer_email)
    msg.paid_at.FromDatetime(order.paid_at.astimezone(dt.UTC))
    env = events.envelope(msg, producer=producer, event_id=event_id or submitted_event_id(order.purchase_id()))
    value = env.SerializeToString()
    rec = events.outgoing(settings.topic(topics.PURCHASE_SUBMITTED.name),
                          events.account_key(order.channel_id, order.account_id), env,
                          [(HEADER_HMAC, hmac_hex(secret, value).encode())])
    return rec


_STATUS_COLUMNS = ("purchase_id, channel_order_id, account_id, quantity, amount, status, code, detail, "
                   "accepted_at, decided_at")


def _status(row: asyncpg.Record) -> dict:
    out = {k: row[k] for k in ("purchase_id", "channel_order_id", "account_id", "quantity", "amount", "status")}
    if row["code"]:
        out["code"], out["detail"] = row["code"], row["detail"]
    out["accepted_at"] = row["accepted_at"].isoformat()
    if row["decided_at"]:
        out["decided_at"] = row["decided_at"].isoformat()
    return out


class Intake:
    def __init__(self, settings: Settings, producer: Producer, channels: ChannelView,
                 pool: asyncpg.Pool | None) -> None:
        self._settings = settings
        self._producer = producer
        self._channels = channels
        self._pool = pool
        # purchases this process accepted, for reads while PostgreSQL is away (bounded)
        self._recent: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._db_down_until = 0.0

    async def _db(self, call):
        """Run ``call`` against PostgreSQL unless it is known to be away; None when it is."""
        loop = asyncio.get_running_loop()
        if self._pool is None or loop.time() < self._db_down_until:
            return None
        try:
            return await asyncio.wait_for(call(self._pool), DB_CHECK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            if not failures.classify(exc).waits:
                raise
            self._db_down_until = loop.time() + DB_RETRY_AFTER_S
            log.warning("intake continues without PostgreSQL; de-duplication happens downstream", error=repr(exc))
            return None

    async def submit(self, channel: ChannelInfo, order: PurchaseOrder) -> Accepted:
        try:
            validate(order, price=self._settings.stamp_price_rupiah, max_quantity=self._settings.purchase_max_quantity)
        except errors.BubuhError as exc:
            PURCHASES.labels("invalid").inc()
            await self._publish_rejected(order, exc)
            raise
        purchase_id = order.purchase_id()
        inserted = False
        existing = await self._check_existing(order, purchase_id)
        if existing is not None:
            status, same_body = existing
            if not same_body:
                PURCHASES.labels("mismatch").inc()
                raise errors.BubuhError(errors.IDEMPOTENCY_MISMATCH,
                                        f"channel_order_id {order.channel_order_id!r} was used with another body")
            if status != "accepted":
                PURCHASES.labels("replayed").inc()
                return Accepted(purchase_id, status, replayed=True)
        self._producer.refuse_while_away()         # before writing the row: it would be refused after all
        if existing is None:
            inserted = await self._insert_accepted(order, purchase_id)
        secret = self._channels.hmac_secrets(channel.channel_id)[0]
        try:
            await self._producer.publish(submitted_record(self._settings, order, secret, producer=NAME),
                                         timeout_s=self._settings.intake_publish_timeout_s)
        except errors.BubuhError:
            if inserted:
                await self._forget(purchase_id)
            raise
        self._remember(purchase_id, channel.channel_id)
        PURCHASES.labels("accepted").inc()
        log.info("purchase accepted", purchase_id=purchase_id, channel_id=channel.channel_id,
                 account_id=order.account_id, quantity=order.quantity)
        return Accepted(purchase_id, "accepted", replayed=existing is not None)

    async def status(self, channel_id: str, purchase_id: str) -> dict | None:
        row = await self._db(lambda pool: pool.fetchrow(
            f"SELECT {_STATUS_COLUMNS} FROM purchases WHERE purchase_id = $1 AND channel_id = $2",
            purchase_id, channel_id))
        if row is not None:
            return _status(row)
        recent = self._recent.get(purchase_id)
        if recent and recent[0] == channel_id:
            return {"purchase_id": purchase_id, "status": "accepted"}
        return None

    async def by_order(self, channel_id: str, channel_order_id: str) -> list[dict]:
        """Every purchase recorded under one of the channel's order ids, oldest first: at most one
        confirmed, and the refused ones with their codes."""
        rows = await self._db(lambda pool: pool.fetch(
            f"SELECT {_STATUS_COLUMNS} FROM purchases WHERE channel_id = $1 AND channel_order_id = $2 "
            "ORDER BY accepted_at, purchase_id", channel_id, channel_order_id))
        if rows is None:
            raise errors.BubuhError(errors.UNAVAILABLE, "purchase records are unavailable for a moment")
        return [_status(r) for r in rows]

    async def _check_existing(self, order: PurchaseOrder, purchase_id: str) -> tuple[str, bool] | None:
        row = await self._db(lambda pool: pool.fetchrow(
            "SELECT purchase_id, status FROM purchases WHERE channel_id = $1 AND channel_order_id = $2 "
            "AND status <> 'rejected'", order.channel_id, order.channel_order_id))
        if row is None:
            return None
        return row["status"], row["purchase_id"] == purchase_id

    async def _insert_accepted(self, order: PurchaseOrder, purchase_id: str) -> bool:
        done = await self._db(lambda pool: pool.execute(
            "INSERT INTO purchases (purchase_id, channel_id, channel_order_id, account_id, quantity, amount, "
            "paid_at, payment_ref, body_sha256, status) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,'accepted') "
            "ON CONFLICT DO NOTHING", purchase_id, order.channel_id, order.channel_order_id, order.account_id,
            order.quantity, order.amount, order.paid_at, order.payment_ref, order.body_sha256()))
        return bool(done and done.endswith(" 1"))

    async def _forget(self, purchase_id: str) -> None:
        """Kafka refused: the purchase was not accepted, so it must not linger as ``accepted``."""
        await self._db(lambda pool: pool.execute(
            "DELETE FROM purchases WHERE purchase_id = $1 AND status = 'accepted'", purchase_id))

    async def _publish_rejected(self, order: PurchaseOrder, exc: errors.BubuhError) -> None:
        msg = purchase_pb2.PurchaseRejected(purchase_id=order.purchase_id(), channel_id=order.channel_id,
                                            channel_order_id=order.channel_order_id, account_id=order.account_id,
                                            code=exc.code.code, detail=exc.detail)
        env = events.envelope(msg, producer=NAME)
        try:
            await self._producer.publish(events.outgoing(
                self._settings.topic(topics.PURCHASE_EVENTS.name),
                events.account_key(order.channel_id, order.account_id), env),
                timeout_s=self._settings.intake_publish_timeout_s)
        except errors.BubuhError:
            log.warning("purchase.rejected not published", code=exc.code.code)

    def _remember(self, purchase_id: str, channel_id: str) -> None:
        self._recent[purchase_id] = (channel_id, "accepted")
        self._recent.move_to_end(purchase_id)
        while len(self._recent) > 100_000:
            self._recent.popitem(last=False)
