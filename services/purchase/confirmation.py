"""From ``purchase.submitted`` to ``purchase.confirmed``: authenticate, validate, de-duplicate, record.

Runs for both doors. A record is authentic only with a valid HMAC of its value under the named
channel's secret (checked against the registry table, the authority); anything else is
dead-lettered and never credited. De-duplication is by (channel, order id): the first body
confirms, the same body again is a no-op, another body is rejected with ``IDEMPOTENCY_MISMATCH``.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from services.contracts.bubuh.v1 import purchase_pb2
from services.kernel import errors, events, logs, outbox, topics
from services.kernel.events import Event
from services.kernel.processing.handler import Rejection
from services.kernel.settings import Settings
from services.kernel.signatures import HEADER_CHANNEL, HEADER_HMAC, matches
from services.purchase import NAME
from services.purchase.metrics import PURCHASES
from services.purchase.registry import Registry
from services.purchase.validation import PurchaseOrder, validate

log = logs.get(__name__)
CONSUMER = "purchase.confirmation"


def order_of(msg: purchase_pb2.PurchaseSubmitted) -> PurchaseOrder:
    return PurchaseOrder(channel_id=msg.channel_id, channel_order_id=msg.channel_order_id,
                         account_id=msg.account_id, quantity=msg.quantity, amount=msg.amount,
                         paid_at=msg.paid_at.ToDatetime(tzinfo=dt.UTC), payment_ref=msg.payment_ref,
                         buyer_email=msg.buyer_email)


# what a hostile or broken channel can send: dead-lettered, but never a reason to stop the consumer
CHANNEL_FAULTS = frozenset(c.code for c in (errors.SIGNATURE_MISSING, errors.SIGNATURE_INVALID, errors.CHANNEL_UNKNOWN,
                                            errors.CHANNEL_INACTIVE, errors.EVENT_MALFORMED,
                                            errors.EVENT_TYPE_UNKNOWN))


class Confirmation:
    def __init__(self, pool: asyncpg.Pool, registry: Registry, settings: Settings) -> None:
        self._pool = pool
        self._registry = registry
        self._settings = settings
        self._events_topic = settings.topic(topics.PURCHASE_EVENTS.name)

    async def apply(self, conn: asyncpg.Connection, batch: list[Event]) -> list[Rejection]:
        """One partition batch, in the pipeline's transaction (the inbox has claimed it already).

        Set-based: one query reads (and locks) what is known of the batch's orders, one statement
        writes every decision, one the outbox rows. The decisions themselves are taken in the order
        of the records, exactly as one record at a time would take them.
        """
        rejected: list[Rejection] = []
        secrets: dict[str, tuple[str, list[bytes]] | None] = {}
        authentic: list[tuple[Event, purchase_pb2.PurchaseSubmitted, PurchaseOrder]] = []
        for event in batch:
            msg = event.payload
            try:
                if not isinstance(msg, purchase_pb2.PurchaseSubmitted):
                    raise errors.BubuhError(errors.EVENT_TYPE_UNKNOWN, f"{event.type} on purchase.submitted")
                await self._authenticate(conn, event, msg, secrets)
            except errors.BubuhError as exc:
                rejected.append(Rejection(event, exc))
                continue
            authentic.append((event, msg, order_of(msg)))
        if not authentic:
            return rejected
        live = await self._live(conn, authentic)
        decided: list[tuple] = []
        outgoing: list[events.Outgoing] = []
        for event, msg, order in authentic:
            self._decide(event, msg, order, live, decided, outgoing)
        if decided:
            await conn.executemany(
                "INSERT INTO purchases (purchase_id, channel_id, channel_order_id, account_id, quantity, amount, "
                "paid_at, payment_ref, body_sha256, status, code, detail, decided_at) "
                "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12, now()) "
                "ON CONFLICT (purchase_id) DO UPDATE SET status = EXCLUDED.status, code = EXCLUDED.code, "
                "detail = EXCLUDED.detail, decided_at = now()", decided)
        await outbox.add(conn, outgoing)
        return rejected

    @staticmethod
    async def _live(conn: asyncpg.Connection, authentic) -> dict[tuple[str, str], tuple[str, str]]:
        """(channel, order id) -> (purchase id, status) of the batch's orders not rejected, locked."""
        keys = sorted({(o.channel_id, o.channel_order_id) for _, _, o in authentic})
        rows = await conn.fetch(
            "SELECT channel_id, channel_order_id, purchase_id, status FROM purchases "
            "WHERE (channel_id, channel_order_id) IN (SELECT c, o FROM unnest($1::text[], $2::text[]) AS u(c, o)) "
            "AND status <> 'rejected' ORDER BY channel_id, channel_order_id FOR UPDATE",
            [k[0] for k in keys], [k[1] for k in keys])
        return {(r["channel_id"], r["channel_order_id"]): (r["purchase_id"], r["status"]) for r in rows}

    def _decide(self, event: Event, msg: purchase_pb2.PurchaseSubmitted, order: PurchaseOrder,
                live: dict[tuple[str, str], tuple[str, str]], decided: list[tuple],
                outgoing: list[events.Outgoing]) -> None:
        purchase_id = order.purchase_id()
        key = (order.channel_id, order.channel_order_id)
        try:
            validate(order, price=self._settings.stamp_price_rupiah,
                     max_quantity=self._settings.purchase_max_quantity,
                     now=event.envelope.occurred_at.ToDatetime(tzinfo=dt.UTC))
        except errors.BubuhError as exc:
            if live.get(key, ("",))[0] == purchase_id:
                del live[key]               # the upsert below turns that row into a rejected one
            self._reject(order, purchase_id, exc.code.code, exc.detail, event, decided, outgoing)
            return
        current = live.get(key)
        if current is not None and current[0] != purchase_id:
            self._reject(order, purchase_id, errors.IDEMPOTENCY_MISMATCH.code,
                         f"order {order.channel_order_id!r} was confirmed as {current[0]} with another body",
                         event, decided, outgoing)
            return
        if current is not None and current[1] == "confirmed":
            PURCHASES.labels("duplicate").inc()
            return
        live[key] = (purchase_id, "confirmed")
        decided.append(self._row(order, purchase_id, "confirmed", None, None))
        confirmed = purchase_pb2.PurchaseConfirmed(
            purchase_id=purchase_id, channel_id=order.channel_id, channel_order_id=order.channel_order_id,
            account_id=order.account_id, quantity=order.quantity, amount=order.amount,
            buyer_email=order.buyer_email)
        confirmed.paid_at.CopyFrom(msg.paid_at)
        outgoing.append(self._event(confirmed, order, purchase_id, "confirmed", event))
        PURCHASES.labels("confirmed").inc()
        log.info("purchase confirmed", purchase_id=purchase_id, channel_id=order.channel_id,
                 account_id=order.account_id, quantity=order.quantity, trace_id=event.envelope.trace_id)

    @staticmethod
    def _row(order: PurchaseOrder, purchase_id: str, status: str, code: str | None, detail: str | None) -> tuple:
        return (purchase_id, order.channel_id, order.channel_order_id, order.account_id, order.quantity,
                order.amount, order.paid_at, order.payment_ref, order.body_sha256(), status, code, detail)

    async def _authenticate(self, conn: asyncpg.Connection, event: Event, msg,
                            cache: dict[str, tuple[str, list[bytes]] | None]) -> None:
        signature = event.headers.get(HEADER_HMAC)
        if not signature:
            raise errors.BubuhError(errors.SIGNATURE_MISSING, f"no {HEADER_HMAC} header")
        claimed = (event.headers.get(HEADER_CHANNEL) or b"").decode(errors="replace")
        if claimed != msg.channel_id:
            raise errors.BubuhError(errors.SIGNATURE_INVALID,
                                    f"header channel {claimed!r} != payload channel {msg.channel_id!r}")
        if msg.channel_id not in cache:
            cache[msg.channel_id] = await self._registry.secrets(conn, msg.channel_id)
        found = cache[msg.channel_id]
        if found is None:
            raise errors.BubuhError(errors.CHANNEL_UNKNOWN, f"channel {msg.channel_id!r}")
        status, secrets = found
        if not matches(secrets, event.raw, signature.decode(errors="replace")):
            raise errors.BubuhError(errors.SIGNATURE_INVALID, f"HMAC does not match channel {msg.channel_id}")
        if status != "active":
            raise errors.BubuhError(errors.CHANNEL_INACTIVE, f"channel {msg.channel_id} is {status}")

    def _reject(self, order: PurchaseOrder, purchase_id: str, code: str, detail: str, event: Event,
                decided: list[tuple], outgoing: list[events.Outgoing]) -> None:
        decided.append(self._row(order, purchase_id, "rejected", code, detail))
        rejected = purchase_pb2.PurchaseRejected(purchase_id=purchase_id, channel_id=order.channel_id,
                                                 channel_order_id=order.channel_order_id,
                                                 account_id=order.account_id, code=code, detail=detail)
        outgoing.append(self._event(rejected, order, purchase_id, "rejected", event))
        PURCHASES.labels("rejected").inc()
        log.info("purchase rejected", purchase_id=purchase_id, code=code, detail=detail,
                 trace_id=event.envelope.trace_id)

    def _event(self, msg, order: PurchaseOrder, purchase_id: str, what: str, cause: Event) -> events.Outgoing:
        env = events.envelope(msg, producer=NAME, causation_id=cause.event_id,
                              event_id=str(uuid.uuid5(uuid.UUID(purchase_id), what)),
                              trace_id=cause.envelope.trace_id)
        return events.outgoing(self._events_topic, events.account_key(order.channel_id, order.account_id), env)
