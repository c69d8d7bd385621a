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
from collections.abc import Sequence

import asyncpg

from services.contracts.bubuh.v1 import purchase_pb2, quota_pb2, stamp_pb2
from services.kernel import derived_ids, events, inbox, logs, topics
from services.kernel.events import Event
from services.kernel.processing.handler import Transactional
from services.kernel.settings import Settings
from services.kernel.waiting import sleep_or_stop
from services.quota import NAME, ledger
from services.quota.metrics import LEDGER_BATCHES, LEDGER_OPERATIONS, LEDGER_SECONDS

log = logs.get(__name__)
CONSUMER = "quota.ledger"
_NS = uuid.UUID("0b5d7f0e-8e8f-4c4e-a1f1-52d1c3a0f7a2").bytes


def derived_event_id(subject_id: str, what: str) -> str:
    return derived_ids.uuid5(_NS, f"{subject_id}\x1f{what}")


def _balance(b: ledger.Balance | None) -> quota_pb2.Balance:
    if b is None:
        return quota_pb2.Balance()
    return quota_pb2.Balance(credited=b.credited, pending=b.pending, committed=b.committed, available=b.available)


class QuotaHandlers:
    TYPES = frozenset(events.type_name(t) for t in (purchase_pb2.PurchaseConfirmed, stamp_pb2.StampRequested,
                                                    stamp_pb2.StampSigned, stamp_pb2.StampCompleted,
                                                    stamp_pb2.StampFailed))
    # before StampSigned existed the worker's StampCompleted asked for the commit; now it follows the
    # commit, so it is a duplicate (kept for records written by older workers)
    _OPERATION = {purchase_pb2.PurchaseConfirmed: "credit", stamp_pb2.StampRequested: "reserve",
                  stamp_pb2.StampSigned: "commit", stamp_pb2.StampCompleted: "commit", stamp_pb2.StampFailed: "release"}

    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._topic = settings.topic(topics.QUOTA_EVENTS.name)
        self._debug = False         # per-record ledger lines (set per batch from the log level)

    def handler(self) -> Transactional:
        """How the pipeline applies this consumer's batches: in one statement when it can
        (``apply_at_once``), else in a transaction (``apply``); a process's batches that share an
        account take turns."""
        return Transactional(self._pool, CONSUMER, self.apply, self.TYPES, serialize_by=self.accounts_of,
                             at_once=self.apply_at_once)

    @staticmethod
    def accounts_of(batch: Sequence[Event]) -> set[tuple[str, str]]:
        """The accounts a batch will lock (``Transactional(serialize_by=...)``)."""
        return {(e.payload.channel_id, e.payload.account_id) for e in batch
                if type(e.payload) in QuotaHandlers._OPERATION}

    def _operation(self, name: str, m, event_id: str, deadline: dt.datetime) -> ledger.Operation:
        if name == "credit":
            return ledger.Credit(m.purchase_id, m.channel_id, m.account_id, m.quantity, event_id)
        if name == "reserve":
            return ledger.Reserve(m.request_id, m.channel_id, m.account_id, deadline, event_id)
        return ledger.Resolve("post" if name == "commit" else "void", m.request_id, m.channel_id, m.account_id,
                              m.code if name == "release" else "", event_id)

    async def apply(self, conn: asyncpg.Connection, batch: list[Event]) -> None:
        """One poll's batch (each partition's records in order), in the pipeline's transaction (the inbox
        has claimed it already).

        ``ledger.apply`` works the batch out, then locks its accounts in one fixed order (two batches
        that share accounts wait for each other instead of deadlocking) and writes the ledger's rows
        and this batch's events in one statement.
        """
        started = time.perf_counter()
        ours, operations, announce = self._prepare(batch)
        self._done(batch, ours, await ledger.apply(conn, operations, announce), started)
        LEDGER_BATCHES.labels("transaction").inc()

    async def apply_at_once(self, conn: asyncpg.Connection, batch: list[Event], claims: inbox.Claims) -> bool:
        """The same batch in one autocommitted statement with its inbox ``claims`` (``Transactional``'s
        ``at_once``, tried first): no account stays locked while this process is away. False when
        nothing was written (accounts changed under every attempt): ``apply`` then."""
        started = time.perf_counter()
        ours, operations, announce = self._prepare(batch)
        if len(ours) != len(batch):
            return False           # an event that is not the ledger's: claimed by the transaction
        outcomes = await ledger.apply_at_once(conn, operations, announce, claims)
        if outcomes is None:
            return False
        self._done(batch, ours, outcomes, started)
        LEDGER_BATCHES.labels("at_once").inc()
        return True

    def _prepare(self, batch: list[Event]):
        """The ledger's operations of a batch, and what announces their outcomes."""
        base = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._settings.reservation_ttl_s)
        ours = [(name, e) for e in batch for name in (self._OPERATION.get(type(e.payload)),) if name]
        # PurchaseRejected and other events on these topics are not the ledger's business.
        # The deadlines of one batch are a microsecond apart, so the expiry sweep (oldest deadline
        # first) releases reservations in the order they were made, as with one clock read each.

        def announce(outcomes: list[ledger.Outcome]) -> list[events.Outgoing]:
            return [o for (name, event), out in zip(ours, outcomes, strict=True)
                    for o in self._events_of(name, event, out)]

        operations = [self._operation(name, e.payload, e.event_id, base + dt.timedelta(microseconds=i))
                      for i, (name, e) in enumerate(ours)]
        return ours, operations, announce

    def _done(self, batch: list[Event], ours, outcomes: list[ledger.Outcome], started: float) -> None:
        each = (time.perf_counter() - started) / max(1, len(ours))
        done: Counter[tuple[str, str]] = Counter()     # (operation, result) -> how many
        self._debug = log.is_enabled_for(logging.DEBUG)
        for (name, event), out in zip(ours, outcomes, strict=True):
            LEDGER_SECONDS.labels(name).observe(each)
            self._record(name, out, event, done)
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
        # a refused commit or release is an anomaly (a reservation unknown or resolved the other way)
        (log.debug if not refused else log.info if operation in ("credit", "reserve") else log.warning)(
            "ledger", operation=operation, result=outcome.result, code=outcome.code or None,
            subject=getattr(event.payload, "request_id", "") or getattr(event.payload, "purchase_id", ""),
            balance=outcome.balance.as_dict() if outcome.balance else None, trace_id=event.envelope.trace_id)

    def _events_of(self, name: str, event: Event, out: ledger.Outcome) -> list[events.Outgoing]:
        """What one operation's outcome announces on quota.events."""
        m = event.payload
        if name == "credit":
            if not out.applied:
                return []
            key = events.account_key(m.channel_id, m.account_id)
            return [self._outgoing(
                quota_pb2.QuotaCredited(channel_id=m.channel_id, account_id=m.account_id, purchase_id=m.purchase_id,
                                        quantity=m.quantity, balance=_balance(out.balance), buyer_email=m.buyer_email),
                key, derived_event_id(m.purchase_id, "credited"), event)]
        key = m.request_id      # a reservation's events: one request's in order, an account's spread out
        if name == "reserve":
            if out.result == "applied":
                reserved = quota_pb2.QuotaReserved(channel_id=m.channel_id, account_id=m.account_id,
                                                   request_id=m.request_id, balance=_balance(out.balance))
                reserved.deadline.FromDatetime(out.deadline)
                return [self._outgoing(reserved, key, derived_event_id(m.request_id, "reserved"), event)]
            if out.result == "refused":
                return [self._outgoing(quota_pb2.QuotaRejected(
                    channel_id=m.channel_id, account_id=m.account_id, request_id=m.request_id, code=out.code,
                    detail="no available unit", balance=_balance(out.balance)),
                    key, derived_event_id(m.request_id, "rejected"), event)]
            return []
        return self._after_resolution(event, m, out, name)

    def _outgoing(self, msg, key: str, event_id: str, cause: Event | None) -> events.Outgoing:
        env = events.envelope(msg, producer=NAME, event_id=event_id,
                              causation_id=cause.event_id if cause else "",
                              trace_id=cause.envelope.trace_id if cause else None)
        return events.outgoing(self._topic, key, env)

    def _after_resolution(self, cause: Event | None, m, out: ledger.Outcome, operation: str,
                          code: str = "") -> list[events.Outgoing]:
        key = m.request_id
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
            # reported, never silently applied (and logged by whoever applied it: this only builds)
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

            def announce(outcomes: list[ledger.Outcome]) -> list[events.Outgoing]:
                return [o for r, out in zip(due, outcomes, strict=True) for o in self._after_resolution(
                    None, stamp_pb2.StampFailed(request_id=r.request_id, channel_id=r.channel_id,
                                                account_id=r.account_id), out, "release", code="RESERVATION_EXPIRED")]

            outcomes = await ledger.apply(conn, [
                ledger.Resolve("void", r.request_id, r.channel_id, r.account_id, "RESERVATION_EXPIRED",
                               derived_event_id(r.request_id, "expired")) for r in due], announce)
            for r, out in zip(due, outcomes, strict=True):
                LEDGER_OPERATIONS.labels("expire", out.result).inc()
                if out.result == "refused":
                    log.warning("ledger refused", operation="expire", request_id=r.request_id, code=out.code)
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
