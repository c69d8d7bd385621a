"""From ``purchase.submitted`` to ``purchase.confirmed``: authenticate, validate, de-duplicate, record.

Runs for both doors; the rules are the public contract in ``docs/channels.md``.
- Origin: a record is the named channel's only with a valid HMAC of its value under that channel's
  secret (the registry table is the authority). One that does not verify proves nothing about its
  sender: it is dead-lettered and counted per claimed channel, never reported to that channel.
- Refusal of an authentic record (invalid order, suspended channel, a secret past its grace period)
  is a ``PurchaseRejected`` the channel sees (webhook, ``GET /v1/purchases``).
- A confirmed purchase is final: no later record changes it, whatever its body or timestamps.
  De-duplication is by (channel, order id): the same body again is a no-op, another body is
  rejected with ``IDEMPOTENCY_MISMATCH``; so one order id is credited at most once, ever.
- Time: "paid_at not in the future" is judged against the platform's receive time (the broker's
  append time on ``purchase.submitted``), never a time the channel wrote.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import asyncpg

from services.contracts.bubuh.v1 import purchase_pb2
from services.kernel import derived_ids, errors, events, inbox, logs, outbox, topics
from services.kernel.events import Event
from services.kernel.processing.handler import Rejection, Transactional
from services.kernel.settings import Settings
from services.kernel.signatures import HEADER_HMAC, matches
from services.purchase import NAME
from services.purchase.metrics import PURCHASES, UNVERIFIED
from services.purchase.registry import ChannelSecrets, Registry
from services.purchase.validation import PurchaseOrder, validate

log = logs.get(__name__)
CONSUMER = "purchase.confirmation"


def order_of(msg: purchase_pb2.PurchaseSubmitted) -> PurchaseOrder:
    return PurchaseOrder(channel_id=msg.channel_id, channel_order_id=msg.channel_order_id,
                         account_id=msg.account_id, quantity=msg.quantity, amount=msg.amount,
                         paid_at=events.utc_datetime(msg.paid_at), payment_ref=msg.payment_ref,
                         buyer_email=msg.buyer_email)


# what a hostile or broken channel can send: dead-lettered, but never a reason to stop the consumer
CHANNEL_FAULTS = frozenset(c.code for c in (errors.SIGNATURE_MISSING, errors.SIGNATURE_INVALID, errors.CHANNEL_UNKNOWN,
                                            errors.EVENT_MALFORMED, errors.EVENT_TYPE_UNKNOWN))
UNVERIFIED_LOG_EVERY_S = 60.0     # one warning per claimed channel per minute, with the count since the last


@dataclass
class _Authentic:
    event: Event
    msg: purchase_pb2.PurchaseSubmitted
    order: PurchaseOrder
    refusal: errors.BubuhError | None = None    # the channel sent it, and it is refused (it is told why)


class Confirmation:
    def __init__(self, pool: asyncpg.Pool, registry: Registry, settings: Settings) -> None:
        self._pool = pool
        self._registry = registry
        self._settings = settings
        self._events_topic = settings.topic(topics.PURCHASE_EVENTS.name)
        self._last_warned: dict[str, tuple[float, int]] = {}   # claimed channel -> (last warning, since)

    def handler(self) -> Transactional:
        """The pipeline's handler: a batch in one transaction. Channels choose their event ids, so
        the inbox keys on the record's bytes as well: a record of one channel (or a forgery) that
        reuses another's event id cannot make that one look applied already."""
        return Transactional(self._pool, CONSUMER, self.apply, inbox_key=inbox.by_content)

    async def apply(self, conn: asyncpg.Connection, batch: list[Event]) -> list[Rejection]:
        """One poll's batch (each partition's records in order), in the pipeline's transaction (the inbox
        has claimed it already).

        Set-based: one query reads (and locks) what is known of the batch's orders, one statement
        writes every decision, one the outbox rows. The decisions themselves are taken in the order
        of the records, exactly as one record at a time would take them.
        """
        rejected: list[Rejection] = []
        secrets: dict[str, ChannelSecrets | None] = {}
        authentic: list[_Authentic] = []
        for event in batch:
            msg = event.payload
            try:
                if not isinstance(msg, purchase_pb2.PurchaseSubmitted):
                    raise errors.BubuhError(errors.EVENT_TYPE_UNKNOWN, f"{event.type} on purchase.submitted")
                refusal = await self._authenticate(conn, event, msg, secrets)
            except errors.BubuhError as exc:
                rejected.append(Rejection(event, exc))
                continue
            authentic.append(_Authentic(event, msg, order_of(msg), refusal))
        if not authentic:
            return rejected
        live = await self._live(conn, authentic)
        decided: list[tuple] = []
        outgoing: list[events.Outgoing] = []
        outcomes: Counter[str] = Counter()
        for a in authentic:
            outcomes[self._decide(a, live, decided, outgoing)] += 1
        if decided:
            # One statement for the batch. A purchase decided twice in it (refused, then confirmed by a
            # later copy) keeps its last decision, as row-by-row upserts would leave it; a confirmed
            # row is never changed again, whatever arrives later (belt and braces: the decisions above
            # already never ask for it).
            last = {row[0]: i for i, row in enumerate(decided)}
            rows = [row for i, row in enumerate(decided) if last[row[0]] == i]
            await conn.execute(
                "INSERT INTO purchases (purchase_id, channel_id, channel_order_id, account_id, quantity, amount, "
                "paid_at, payment_ref, body_sha256, status, code, detail, decided_at) "
                "SELECT *, now() FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], "
                "$6::bigint[], $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[]) "
                "ON CONFLICT (purchase_id) DO UPDATE SET status = EXCLUDED.status, code = EXCLUDED.code, "
                "detail = EXCLUDED.detail, decided_at = now() WHERE purchases.status <> 'confirmed'",
                *([row[c] for row in rows] for c in range(12)))
        await outbox.add(conn, outgoing)
        for outcome, n in outcomes.items():
            PURCHASES.labels(outcome).inc(n)
        # one line per batch (a line per record was a tenth of this consumer's CPU): each refusal has
        # its own line above, each confirmation its own at debug level
        log.info("purchases decided", records=len(batch), unverified=len(rejected), **outcomes)
        return rejected

    @staticmethod
    async def _live(conn: asyncpg.Connection, authentic: list[_Authentic]) -> dict[tuple[str, str], tuple[str, str]]:
        """(channel, order id) -> (purchase id, status) of the batch's orders not rejected, locked."""
        keys = sorted({(a.order.channel_id, a.order.channel_order_id) for a in authentic})
        rows = await conn.fetch(
            "SELECT channel_id, channel_order_id, purchase_id, status FROM purchases "
            "WHERE (channel_id, channel_order_id) IN (SELECT c, o FROM unnest($1::text[], $2::text[]) AS u(c, o)) "
            "AND status <> 'rejected' ORDER BY channel_id, channel_order_id FOR UPDATE",
            [k[0] for k in keys], [k[1] for k in keys])
        return {(r["channel_id"], r["channel_order_id"]): (r["purchase_id"], r["status"]) for r in rows}

    def _decide(self, a: _Authentic, live: dict[tuple[str, str], tuple[str, str]], decided: list[tuple],
                outgoing: list[events.Outgoing]) -> str:
        """Decide one record; returns the outcome (``bubuh_purchases_total``'s label)."""
        event, msg, order = a.event, a.msg, a.order
        purchase_id = order.purchase_id()
        key = (order.channel_id, order.channel_order_id)
        current = live.get(key)
        if current is not None and current[0] != purchase_id:
            self._reject(order, purchase_id, errors.IDEMPOTENCY_MISMATCH.code,
                         f"order {order.channel_order_id!r} is {current[1]} as {current[0]} with another body",
                         event, decided, outgoing)
            return "rejected"
        if current is not None and current[1] == "confirmed":
            return "duplicate"      # final: nothing a later record says changes it
        try:
            if a.refusal is not None:
                raise a.refusal
            validate(order, price=self._settings.stamp_price_rupiah,
                     max_quantity=self._settings.purchase_max_quantity, now=event.received_at())
        except errors.BubuhError as exc:
            if current is not None:
                del live[key]               # the 'accepted' row becomes a rejected one below
            self._reject(order, purchase_id, exc.code.code, exc.detail, event, decided, outgoing)
            return "rejected"
        live[key] = (purchase_id, "confirmed")
        decided.append(self._row(order, purchase_id, "confirmed", None, None))
        confirmed = purchase_pb2.PurchaseConfirmed(
            purchase_id=purchase_id, channel_id=order.channel_id, channel_order_id=order.channel_order_id,
            account_id=order.account_id, quantity=order.quantity, amount=order.amount,
            buyer_email=order.buyer_email)
        confirmed.paid_at.CopyFrom(msg.paid_at)
        outgoing.append(self._event(confirmed, order, purchase_id, "confirmed", event))
        log.debug("purchase confirmed", purchase_id=purchase_id, channel_id=order.channel_id,
                  account_id=order.account_id, quantity=order.quantity, trace_id=event.envelope.trace_id)
        return "confirmed"

    @staticmethod
    def _row(order: PurchaseOrder, purchase_id: str, status: str, code: str | None, detail: str | None) -> tuple:
        return (purchase_id, order.channel_id, order.channel_order_id, order.account_id, order.quantity,
                order.amount, order.paid_at, order.payment_ref, order.body_sha256(), status, code, detail)

    async def _authenticate(self, conn: asyncpg.Connection, event: Event, msg,
                            cache: dict[str, ChannelSecrets | None]) -> errors.BubuhError | None:
        """Raise for a record that does not prove its sender; return the refusal of one that does
        but may not be confirmed (the channel is told), or None."""
        signature = event.headers.get(HEADER_HMAC)
        if msg.channel_id not in cache:
            cache[msg.channel_id] = await self._registry.secrets(conn, msg.channel_id)
        found = cache[msg.channel_id]
        if not signature:
            raise self._unverified(found, msg.channel_id, errors.SIGNATURE_MISSING, f"no {HEADER_HMAC} header")
        if found is None:
            raise self._unverified(None, msg.channel_id, errors.CHANNEL_UNKNOWN, f"channel {msg.channel_id[:80]!r}")
        sig = signature.decode(errors="replace")
        if matches(found.accepted, event.raw, sig):
            if found.status != "active":
                return errors.BubuhError(errors.CHANNEL_INACTIVE, f"channel {msg.channel_id} is {found.status}")
            return None
        if found.expired and matches(found.expired, event.raw, sig):
            return errors.BubuhError(errors.SIGNATURE_KEY_EXPIRED,
                                     "signed with the previous secret after its grace period ended")
        raise self._unverified(found, msg.channel_id, errors.SIGNATURE_INVALID,
                               f"HMAC does not match channel {msg.channel_id}")

    def _unverified(self, found: ChannelSecrets | None, claimed: str, code: errors.ErrorCode,
                    detail: str) -> errors.BubuhError:
        """Count a record that proves nothing about its sender under the channel it claims (the
        label only for registered channels: anyone can write any name), and warn at most once a
        minute per claimed channel."""
        label = claimed if found is not None else "unknown"
        UNVERIFIED.labels(label, code.code).inc()
        now = time.monotonic()
        last, count = self._last_warned.get(label, (0.0, 0))
        if now - last >= UNVERIFIED_LOG_EVERY_S:
            log.warning("unverified purchase records", claimed_channel=label, code=code.code,
                        since_last_warning=count + 1)
            self._last_warned[label] = (now, 0)
        else:
            self._last_warned[label] = (last, count + 1)
        return errors.BubuhError(code, detail)

    def _reject(self, order: PurchaseOrder, purchase_id: str, code: str, detail: str, event: Event,
                decided: list[tuple], outgoing: list[events.Outgoing]) -> None:
        decided.append(self._row(order, purchase_id, "rejected", code, detail))
        rejected = purchase_pb2.PurchaseRejected(purchase_id=purchase_id, channel_id=order.channel_id,
                                                 channel_order_id=order.channel_order_id,
                                                 account_id=order.account_id, code=code, detail=detail)
        outgoing.append(self._event(rejected, order, purchase_id, "rejected", event))
        log.info("purchase rejected", purchase_id=purchase_id, code=code, detail=detail,
                 trace_id=event.envelope.trace_id)

    def _event(self, msg, order: PurchaseOrder, purchase_id: str, what: str, cause: Event) -> events.Outgoing:
        env = events.envelope(msg, producer=NAME, causation_id=cause.event_id,
                              event_id=derived_ids.uuid5(derived_ids.uuid_bytes(purchase_id), what),
                              trace_id=cause.envelope.trace_id)
        return events.outgoing(self._events_topic, events.account_key(order.channel_id, order.account_id), env)
