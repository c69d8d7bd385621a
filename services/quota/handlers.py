"""Events in, ledger operations, events out: the quota service's consumers and its expiry sweep.

Each handler applies one event in one transaction: inbox claim, ledger operation, outbox rows.
Outgoing event ids are derived from the request or purchase id and the operation, so a replay
publishes the same ids.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import asyncpg

from services.contracts.bubuh.v1 import purchase_pb2, quota_pb2, stamp_pb2
from services.kernel import events, inbox, logs, outbox, topics
from services.kernel.events import Event
from services.kernel.settings import Settings
from services.quota import NAME, ledger
from services.quota.metrics import LEDGER_OPERATIONS, LEDGER_SECONDS

log = logs.get(__name__)
CONSUMER = "quota.ledger"
_NS = uuid.UUID("0b5d7f0e-8e8f-4c4e-a1f1-52d1c3a0f7a2")


def derived_event_id(subject_id: str, what: str) -> str:
    return str(uuid.uuid5(_NS, f"{subject_id}\x1f{what}"))


def _balance(b: ledger.Balance | None) -> quota_pb2.Balance:
    if b is None:
        return quota_pb2.Balance()
    return quota_pb2.Balance(credited=b.credited, pending=b.pending, committed=b.committed, available=b.available)


class QuotaHandlers:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._topic = settings.topic(topics.QUOTA_EVENTS.name)

    async def handle(self, event: Event) -> None:
        msg = event.payload
        if isinstance(msg, purchase_pb2.PurchaseConfirmed):
            await self._apply(event, "credit", self._credit)
        elif isinstance(msg, stamp_pb2.StampRequested):
            await self._apply(event, "reserve", self._reserve)
        elif isinstance(msg, stamp_pb2.StampCompleted):
            await self._apply(event, "commit", self._commit)
        elif isinstance(msg, stamp_pb2.StampFailed):
            await self._apply(event, "release", self._release)
        # PurchaseRejected and other events on these topics are not the ledger's business

    async def _apply(self, event: Event, operation: str, op) -> None:
        started = time.perf_counter()
        async with self._pool.acquire() as conn, conn.transaction():
            if not await inbox.claim(conn, CONSUMER, event.event_id):
                LEDGER_OPERATIONS.labels(operation, "redelivered").inc()
                return
            outcome = await op(conn, event)
        LEDGER_SECONDS.labels(operation).observe(time.perf_counter() - started)
        LEDGER_OPERATIONS.labels(operation, outcome.result).inc()
        log.info("ledger", operation=operation, result=outcome.result, code=outcome.code or None,
                 subject=getattr(event.payload, "request_id", "") or getattr(event.payload, "purchase_id", ""),
                 balance=outcome.balance.as_dict() if outcome.balance else None)

    async def _emit(self, conn, msg, key: str, event_id: str, cause: Event | None) -> None:
        env = events.envelope(msg, producer=NAME, event_id=event_id,
                              causation_id=cause.event_id if cause else "",
                              trace_id=cause.envelope.trace_id if cause else None)
        await outbox.add(conn, [events.outgoing(self._topic, key, env)])

    async def _credit(self, conn, event: Event) -> ledger.Outcome:
        m: purchase_pb2.PurchaseConfirmed = event.payload
        out = await ledger.credit(conn, purchase_id=m.purchase_id, channel_id=m.channel_id, account_id=m.account_id,
                                  quantity=m.quantity, event_id=event.event_id)
        if out.applied:
            await self._emit(conn, quota_pb2.QuotaCredited(channel_id=m.channel_id, account_id=m.account_id,
                                                           purchase_id=m.purchase_id, quantity=m.quantity,
                                                           balance=_balance(out.balance), buyer_email=m.buyer_email),
                             events.account_key(m.channel_id, m.account_id),
                             derived_event_id(m.purchase_id, "credited"), event)
        return out

    async def _reserve(self, conn, event: Event) -> ledger.Outcome:
        m: stamp_pb2.StampRequested = event.payload
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._settings.reservation_ttl_s)
        out = await ledger.reserve(conn, request_id=m.request_id, channel_id=m.channel_id, account_id=m.account_id,
                                   deadline=deadline, event_id=event.event_id)
        key = events.account_key(m.channel_id, m.account_id)
        if out.result == "applied":
            reserved = quota_pb2.QuotaReserved(channel_id=m.channel_id, account_id=m.account_id,
                                               request_id=m.request_id, balance=_balance(out.balance))
            reserved.deadline.FromDatetime(out.deadline)
            await self._emit(conn, reserved, key, derived_event_id(m.request_id, "reserved"), event)
        elif out.result == "refused":
            await self._emit(conn, quota_pb2.QuotaRejected(channel_id=m.channel_id, account_id=m.account_id,
                                                           request_id=m.request_id, code=out.code,
                                                           detail="no available unit", balance=_balance(out.balance)),
                             key, derived_event_id(m.request_id, "rejected"), event)
        return out

    async def _commit(self, conn, event: Event) -> ledger.Outcome:
        m: stamp_pb2.StampCompleted = event.payload
        out = await ledger.commit(conn, request_id=m.request_id, event_id=event.event_id)
        await self._after_resolution(conn, event, m, out, "commit")
        return out

    async def _release(self, conn, event: Event) -> ledger.Outcome:
        m: stamp_pb2.StampFailed = event.payload
        out = await ledger.release(conn, request_id=m.request_id, code=m.code, event_id=event.event_id)
        await self._after_resolution(conn, event, m, out, "release")
        return out

    async def _after_resolution(self, conn, cause: Event | None, m, out: ledger.Outcome, operation: str,
                                code: str = "") -> None:
        key = events.account_key(m.channel_id, m.account_id)
        if out.result == "applied":
            if operation == "commit":
                msg = quota_pb2.QuotaCommitted(channel_id=m.channel_id, account_id=m.account_id,
                                               request_id=m.request_id, balance=_balance(out.balance))
            else:
                msg = quota_pb2.QuotaReleased(channel_id=m.channel_id, account_id=m.account_id,
                                              request_id=m.request_id, code=code or out.code,
                                              balance=_balance(out.balance))
            await self._emit(conn, msg, key, derived_event_id(m.request_id, operation), cause)
        elif out.result == "refused":
            # reported, never silently applied
            log.warning("ledger refused", operation=operation, request_id=m.request_id, code=out.code)
            refused = quota_pb2.QuotaRefused(channel_id=m.channel_id, account_id=m.account_id,
                                             request_id=m.request_id, operation=operation, code=out.code)
            cause_id = cause.event_id if cause else ""
            await self._emit(conn, refused, key, derived_event_id(m.request_id, f"refused-{operation}-{cause_id}"),
                             cause)

    async def expire_due(self, now: dt.datetime | None = None) -> int:
        """Void every reservation past its deadline; returns how many."""
        now = now or dt.datetime.now(dt.UTC)
        async with self._pool.acquire() as conn, conn.transaction():
            due = await ledger.due_expiries(conn, now)
            for request_id in due:
                row = await conn.fetchrow("SELECT channel_id, account_id FROM transfers WHERE id = $1", request_id)
                out = await ledger.release(conn, request_id=request_id, code="RESERVATION_EXPIRED",
                                           event_id=derived_event_id(request_id, "expired"))
                m = stamp_pb2.StampFailed(request_id=request_id, channel_id=row["channel_id"],
                                          account_id=row["account_id"])
                await self._after_resolution(conn, None, m, out, "release", code="RESERVATION_EXPIRED")
                LEDGER_OPERATIONS.labels("expire", out.result).inc()
        if due:
            log.info("reservations expired", count=len(due))
        return len(due)

    async def run_expiry(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                while await self.expire_due():
                    pass
            except Exception as exc:  # noqa: BLE001 - database away: try again next tick
                log.warning("expiry sweep failed", error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), self._settings.expiry_interval_s)
            except TimeoutError:
                pass
