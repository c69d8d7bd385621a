"""The two shapes of handler the pipeline drives.

``Transactional``: the records of one partition batch are applied in one database transaction:
the inbox claims the batch in one statement (recording where each event was read), the service's
``apply`` does the effects and writes outbox rows, and the commit makes it all durable at once
(one fsync for the batch instead of one per record). A service whose batch can be worked out before
it writes may instead write claims, effects and outbox rows in one autocommitted statement
(``at_once``): then no row lock is held across a round trip. When the batch fails, the pipeline redoes it
record by record, so the others still land and only the failing one meets the failure policy.

``PerRecord``: for work that is not one transaction (the stamping worker signs between two), the
records are handled one at a time; such a handler keeps its own idempotency.

A handler names the event types it acts on: the others on its topics (a consumer of
``purchase.events`` that only credits skips ``PurchaseRejected``) are passed over by their
``bubuh-event-type`` header, undecoded and unclaimed, which spares a decode and an inbox row each.

Either returns the records it *rejects* (a forged or invalid event: a ``BubuhError`` with a
non-retryable code) instead of raising, so one bad record does not undo its batch; the pipeline
dead-letters them. Anything raised is a failure of the whole call, classified by ``failures.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from services.kernel import errors, inbox
from services.kernel.events import Event


@dataclass(frozen=True)
class Rejection:
    event: Event
    error: errors.BubuhError


class Handler(Protocol):
    batched: bool
    # optional: ``types``, the event types it acts on (absent or None: all); others are skipped unread
    # optional: ``concurrency`` and ``chain_key`` (PerRecord): records of different chains at once

    async def process(self, events: Sequence[Event]) -> list[Rejection]: ...


Apply = Callable[[asyncpg.Connection, list[Event]], Awaitable[list[Rejection] | None]]
AtOnce = Callable[[asyncpg.Connection, list[Event], inbox.Claims], Awaitable[bool]]


class KeyedLocks:
    """In-process locks by key, taken in sorted order (no deadlock between two holders of several)."""

    def __init__(self) -> None:
        self._locks: dict[tuple, asyncio.Lock] = {}
        self._users: dict[tuple, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, keys: Iterable[tuple]) -> AsyncIterator[None]:
        ordered = sorted(set(keys))
        for k in ordered:
            self._users[k] = self._users.get(k, 0) + 1
        taken: list[asyncio.Lock] = []
        try:
            for k in ordered:
                lock = self._locks.setdefault(k, asyncio.Lock())
                await lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in taken:
                lock.release()
            for k in ordered:
                self._users[k] -= 1
                if not self._users[k]:
                    del self._users[k], self._locks[k]


class Transactional:
    """``serialize_by``: the keys (e.g. the accounts) whose rows a batch will lock in the database.
    Batches of concurrent partitions that share a key then take turns in this process, before their
    transactions open, instead of queueing on the row lock while holding a connection and their
    other locks (PostgreSQL's lock waits, issue 12).

    ``at_once``: a way to apply a batch in one autocommitted statement, tried first. It is given the
    events the inbox has not seen (read, not claimed) and their ``inbox.Claims``, which it writes in
    that statement with the effects; it returns True when it wrote them, False when it wrote nothing
    and the batch should go through the transaction instead (``apply``). No transaction is open across
    a round trip, so no row lock it takes is held while this process is away: another member waits
    for one statement at most, however busy the box (issue 12's 50 ms bound). It rejects nothing (a
    batch with a record to reject goes through ``apply``); an event claimed meanwhile by another
    member fails its statement (a unique violation) and the batch goes through ``apply`` too, which
    sees it as a duplicate.
    """

    batched = True

    def __init__(self, pool: asyncpg.Pool, consumer: str, apply: Apply,
                 types: frozenset[str] | None = None, inbox_key: Callable[[Event], str] | None = None,
                 serialize_by: Callable[[Sequence[Event]], Iterable[tuple]] | None = None,
                 at_once: AtOnce | None = None) -> None:
        self._pool = pool
        self._consumer = consumer
        self._apply = apply
        self._at_once = at_once
        self.types = types
        self._key = inbox_key or (lambda e: e.event_id)
        self._serialize_by = serialize_by
        self._turns = KeyedLocks()

    async def process(self, events: Sequence[Event]) -> list[Rejection]:
        if self._serialize_by is None:
            return await self._process(events)
        async with self._turns.hold(self._serialize_by(events)):
            return await self._process(events)

    async def _process(self, events: Sequence[Event]) -> list[Rejection]:
        if self._at_once is not None and await self._applied_at_once(events):
            return []
        async with self._pool.acquire() as conn, conn.transaction():
            fresh = await inbox.claim_batch(conn, self._consumer, events, self._key)
            if not fresh:
                return []
            rejected = await self._apply(conn, fresh) or []
            # a rejected event is dead-lettered, not applied: a replay after the fix must apply it
            await inbox.unclaim(conn, self._consumer, [self._key(r.event) for r in rejected])
            return rejected

    async def _applied_at_once(self, events: Sequence[Event]) -> bool:
        async with self._pool.acquire() as conn:
            claims = await inbox.unapplied(conn, self._consumer, events, self._key)
            if not claims.events:
                return True
            try:
                return await self._at_once(conn, list(claims.events), claims)
            except asyncpg.UniqueViolationError:
                return False          # claimed meanwhile: the transaction tells which, and skips it


class PerRecord:
    """One record at a time through ``handle``. With ``concurrency`` > 1 the loop runs up to that many
    records at once, never two of one chain (``chain_key``, default the Kafka key) together, each chain
    in offset order: only for a handler that is idempotent per record and needs no order across chains
    (the stamping worker: one chain per stamp request, status guards against a second delivery)."""

    batched = False

    def __init__(self, handle: Callable[[Event], Awaitable[None]], types: frozenset[str] | None = None, *,
                 concurrency: int = 1, chain_key: Callable[[Event], object] | None = None) -> None:
        self._handle = handle
        self.types = types
        self.concurrency = max(1, concurrency)
        self.chain_key = chain_key

    async def process(self, events: Sequence[Event]) -> list[Rejection]:
        rejected: list[Rejection] = []
        for event in events:
            try:
                await self._handle(event)
            except errors.BubuhError as exc:
                if exc.code.retryable:
                    raise
                rejected.append(Rejection(event, exc))
        return rejected
