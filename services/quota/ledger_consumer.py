"""Events in, ledger operations, events out: the quota service's consumers and its expiry sweep.

Each handler applies one event in one transaction: inbox claim, ledger operation, outbox rows.
Outgoing event ids are derived from the request or purchase id and the operation, so a replay
publishes the same ids.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections import Counter

import asyncpg

from services.contracts.bubuh.v1 import purchase_pb2, quota_pb2, stamp_pb2
from services.kernel import derived_ids, events, logs, outbox, topics
from services.kernel.events import Event
from services.kernel.settings import Settings
from services.kernel.waiting import sleep_or_stop
from services.quota import NAME, ledger
from services.quota.metrics import LEDGER_OPERATIONS, LEDGER_SECONDS

log = logs.get(__name__)
CONSUMER = "quota.ledger"
_NS = uuid.UUID("0b5d7f0e-8e8f-4c4e-a1f1-52d1c3a0f7a2").bytes


def derived_event_id(subject_id: str, what: str) -> str:
    return derived_ids.uuid5(_NS, f"{subject_id}\x1f{what}")


def _balance(b: ledger.Balance | None) -> quota_pb2.Balance:
    if b is None:
        return quota_pb2.Balance()
    return quota_pb2.Balance(credited=b.credited, pending=b.pending, committed=b.committed, available=b.available)


def _account_of(msg) -> tuple[str, str] | None:
    if isinstance(msg, purchase_pb2.PurchaseConfirmed | stamp_pb2.StampRequested | stamp_pb2.StampSigned
                  | stamp_pb2.StampCompleted | stamp_pb2.StampFailed):
        return msg.channel_id, msg.account_id
    return None


class QuotaHandlers:
    TYPES = frozenset(events.type_name(t) for t in (purchase_pb2.PurchaseConfirmed, stamp_pb2.StampRequested,
                                                    stamp_pb2.StampSigned, stamp_pb2.StampCompleted,
                                                    stamp_pb2.StampFailed))
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._topic = settings.topic(topics.QUOTA_EVENTS.name)
        self._debug = False         # per-record ledger lines (set per batch from the log level)
        self._operations = {
            stamp_pb2.StampRequested: ("reserve", self._reserve),
            stamp_pb2.StampSigned: ("commit", self._commit),
            # before StampSigned existed the worker's StampCompleted asked for the commit; now it follows
            # the commit, so this is a duplicate (kept for records written by older workers)
            stamp_pb2.StampCompleted: ("commit", self._commit),
            stamp_pb2.StampFailed: ("release", self._release),
        }

    async def apply(self, conn: asyncpg.Connection, batch: list[Event]) -> None:
        """One partition batch, in the pipeline's transaction (the inbox has claimed it already).

        The batch's accounts are locked first, in one fixed order, so two batches that share
        accounts wait for each other instead of deadlocking.
        """
        await ledger.lock_accounts(conn, {_account_of(e.payload) for e in batch} - {None})
        outgoing: list[events.Outgoing] = []
        done: Counter[tuple[str, str]] = Counter()     # (operation, result) -> how many
        self._debug = log.is_enabled_for(logging.DEBUG)
        credits: list[Event] = []          # a run of consecutive credits is applied set-based
        for event in batch:
            if isinstance(event.payload, purchase_pb2.PurchaseConfirmed):
                credits.append(event)
                continue
            await self._credit_run(conn, credits, outgoing, done)
            credits = []
            entry = self._operations.get(type(event.payload))
            if entry is None:
                continue      # PurchaseRejected and other events on these topics are not the ledger's business
            operation, op = entry
            started = time.perf_counter()
            outcome = await op(conn, event, outgoing)
            LEDGER_SECONDS.labels(operation).observe(time.perf_counter() - started)
            self._record(operation, outcome, event, done)
        await self._credit_run(conn, credits, outgoing, done)
        await outbox.add(conn, outgoing)
        for (operation, result), n in done.items():
            LEDGER_OPERATIONS.labels(operation, result).inc(n)
        if done:
            # one line per batch (a line per record was a tenth of this consumer's CPU); each refusal
            # has its own line, each other operation its own at debug level
            log.info("ledger batch", records=len(batch),
                     operations={f"{op}/{result}": n for (op, result), n in sorted(done.items())})

    def _record(self, operation: str, outcome: ledger.Outcome, event: Event, done: Counter[tuple[str, str]]) -> None:
        done[(operation, outcome.result)] += 1
        refused = outcome.result == "refused"
        if not (refused or self._debug):
            return
        (log.info if refused else log.debug)(
            "ledger", operation=operation, result=outcome.result, code=outcome.code or None,
            subject=getattr(event.payload, "request_id", "") or getattr(event.payload, "purchase_id", ""),
            balance=outcome.balance.as_dict() if outcome.balance else None, trace_id=event.envelope.trace_id)

    async def _credit_run(self, conn: asyncpg.Connection, run: list[Event], outgoing: list[events.Outgoing],
                          done: Counter[tuple[str, str]]) -> None:
        if not run:
            return
        started = time.perf_counter()
        outcomes = await ledger.credit_many(conn, [
            ledger.Credit(m.purchase_id, m.channel_id, m.account_id, m.quantity, e.event_id)
            for e in run for m in (e.payload,)])
        LEDGER_SECONDS.labels("credit").observe((time.perf_counter() - started) / len(run))
        for event, out in zip(run, outcomes, strict=True):
            m: purchase_pb2.PurchaseConfirmed = event.payload
            if out.applied:
                outgoing.append(self._outgoing(
                    quota_pb2.QuotaCredited(channel_id=m.channel_id, account_id=m.account_id,
                                            purchase_id=m.purchase_id, quantity=m.quantity,
                                            balance=_balance(out.balance), buyer_email=m.buyer_email),
                    events.account_key(m.channel_id, m.account_id), derived_event_id(m.purchase_id, "credited"),
                    event))
            self._record("credit", out, event, done)

    def _outgoing(self, msg, key: str, event_id: str, cause: Event | None) -> events.Outgoing:
        env = events.envelope(msg, producer=NAME, event_id=event_id,
                              causation_id=cause.event_id if cause else "",
                              trace_id=cause.envelope.trace_id if cause else None)
        return events.outgoing(self._topic, key, env)

    async def _reserve(self, conn, event: Event, outgoing: list[events.Outgoing]) -> ledger.Outcome:
        m: stamp_pb2.StampRequested = event.payload
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._settings.reservation_ttl_s)
        out = await ledger.reserve(conn, request_id=m.request_id, channel_id=m.channel_id, account_id=m.account_id,
                                   deadline=deadline, event_id=event.event_id)
        key = events.account_key(m.channel_id, m.account_id)
        if out.result == "applied":
            reserved = quota_pb2.QuotaReserved(channel_id=m.channel_id, account_id=m.account_id,
                                               request_id=m.request_id, balance=_balance(out.balance))
            reserved.deadline.FromDatetime(out.deadline)
            outgoing.append(self._outgoing(reserved, key, derived_event_id(m.request_id, "reserved"), event))
        elif out.result == "refused":
            outgoing.append(self._outgoing(quota_pb2.QuotaRejected(channel_id=m.channel_id, account_id=m.account_id,
                                                           request_id=m.request_id, code=out.code,
                                                           detail="no available unit", balance=_balance(out.balance)),
                                           key, derived_event_id(m.request_id, "rejected"), event))
        return out

    async def _commit(self, conn, event: Event, outgoing: list[events.Outgoing]) -> ledger.Outcome:
        m: stamp_pb2.StampSigned | stamp_pb2.StampCompleted = event.payload
        out = await ledger.commit(conn, request_id=m.request_id, event_id=event.event_id)
        outgoing.extend(self._after_resolution(event, m, out, "commit"))
        return out

    async def _release(self, conn, event: Event, outgoing: list[events.Outgoing]) -> ledger.Outcome:
        m: stamp_pb2.StampFailed = event.payload
        out = await ledger.release(conn, request_id=m.request_id, code=m.code, event_id=event.event_id)
        outgoing.extend(self._after_resolution(event, m, out, "release"))
        return out

    def _after_resolution(self, cause: Event | None, m, out: ledger.Outcome, operation: str,
                          code: str = "") -> list[events.Outgoing]:
        key = events.account_key(m.channel_id, m.account_id)
        if out.result == "applied":
            if operation == "commit":
                msg = quota_pb2.QuotaCommitted(channel_id=m.channel_id, account_id=m.account_id,
                                               request_id=m.request_id, balance=_balance(out.balance))
            else:
                msg = quota_pb2.QuotaReleased(channel_id=m.channel_id, account_id=m.account_id,
                                              request_id=m.request_id, code=code or out.code,
                                              balance=_balance(out.balance))
            return [self._outgoing(msg, key, derived_event_id(m.request_id, operation), cause)]
        if out.result == "refused":
            # reported, never silently applied
            log.warning("ledger refused", operation=operation, request_id=m.request_id, code=out.code)
            refused = quota_pb2.QuotaRefused(channel_id=m.channel_id, account_id=m.account_id,
                                             request_id=m.request_id, operation=operation, code=out.code)
            cause_id = cause.event_id if cause else ""
            return [self._outgoing(refused, key, derived_event_id(m.request_id, f"refused-{operation}-{cause_id}"),
                                   cause)]
        return []

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
                await outbox.add(conn, self._after_resolution(None, m, out, "release", code="RESERVATION_EXPIRED"))
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
            await sleep_or_stop(stop, self._settings.expiry_interval_s)
