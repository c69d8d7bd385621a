"""The inbox: "have I applied this event?" answered in the same transaction as the effect.

Each claim also records where the event was read (topic, partition, offset), so an event's path
through the platform can be traced afterwards.

A claim is kept for ``BUBUH_INBOX_RETENTION_S`` (30 days), then deleted (``Pruner``): no record can
come back after that, since the topics keep records for less (Kafka's default, 7 days), a replay
sends only dead-lettered records (which were never claimed), and a channel's resent purchase is
recognised by its order, not by the inbox. Without pruning every service's inbox grew by a row per
event for ever: several rows per stamp.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from services.kernel import logs
from services.kernel.events import Event
from services.kernel.metrics import INBOX_PRUNED
from services.kernel.waiting import every

log = logs.get(__name__)


async def claim(conn: asyncpg.Connection, consumer: str, event_id: str) -> bool:
    """Record ``event_id`` as applied by ``consumer``; False when it already was (skip the effect).

    Must run inside the transaction that applies the effect: if that transaction rolls back, so
    does the claim, and the redelivered event is applied then.
    """
    row = await conn.fetchval(
        "INSERT INTO inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING 1",
        consumer, event_id,
    )
    return row is not None


async def claim_batch(conn: asyncpg.Connection, consumer: str, events: Sequence[Event],
                      key: Callable[[Event], str] | None = None) -> list[Event]:
    """Claim a batch in one statement; returns the events not applied before, in order, each key once.

    The key is the event id, unless the consumer reads records written by outsiders: there an
    event id is only a claim, and ``key`` must include what an outsider cannot reproduce for
    another's record (``by_content``), or one party's record could pre-empt another's.
    """
    if not events:
        return []
    keys = [key(e) if key else e.event_id for e in events]
    rows = await conn.fetch(
        'INSERT INTO inbox (consumer, event_id, topic, "partition", "offset") '
        "SELECT $1, e, t, p, o FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[]) AS u(e, t, p, o) "
        "ON CONFLICT DO NOTHING RETURNING event_id",
        consumer, keys, [e.topic for e in events], [e.partition for e in events], [e.offset for e in events])
    fresh = {r["event_id"] for r in rows}
    return [e for e, _ in _first_copies(events, keys, lambda k: k in fresh)]


def _first_copies(events: Sequence[Event], keys: Sequence[str], new: Callable[[str], bool]) -> list[tuple[Event, str]]:
    """Each event whose key is ``new``, in order, once: a second copy in the same batch is a duplicate too."""
    seen: set[str] = set()
    out = []
    for e, k in zip(events, keys, strict=True):
        if k not in seen and new(k):
            seen.add(k)
            out.append((e, k))
    return out


async def unapplied(conn: asyncpg.Connection, consumer: str, events: Sequence[Event],
                    key: Callable[[Event], str] | None = None) -> Claims:
    """The claims of the events of a batch not applied before, in order, each key once, read without
    writing them: for a handler that writes them with its effects in one statement (``Claims``). They
    are applied at the database's time of this read: as a transaction's claim records its start, an
    event is applied at a time before the events it causes occurred, and ``bubuh trace`` shows them in
    that order."""
    keys = [key(e) if key else e.event_id for e in events]
    row = await conn.fetchrow("SELECT now() AS at, ARRAY(SELECT event_id FROM inbox WHERE consumer = $1 "
                              "AND event_id = ANY($2::text[])) AS done", consumer, keys)
    done = set(row["done"])
    fresh = _first_copies(events, keys, lambda k: k not in done)
    return Claims(consumer, [e for e, _ in fresh], [k for _, k in fresh], row["at"])


@dataclass(frozen=True)
class Claims:
    """A batch's inbox rows, written by the statement that applies the batch (``Transactional``'s
    ``at_once``), with no transaction around it. Without ``ON CONFLICT``: an event claimed since it
    was read as unapplied (another member applied it) fails that statement with a unique violation,
    so nothing of it is written, rather than being applied twice."""

    consumer: str
    events: Sequence[Event]
    keys: Sequence[str]
    at: dt.datetime               # applied at: when they were read as unapplied (``unapplied``)

    def cte(self, first: int, when: str = "") -> tuple[str, list]:
        """``claimed AS (INSERT INTO inbox ...)`` with parameters from ``$first``, writing only where
        the SQL condition ``when`` holds; and its arguments."""
        c, e, t, p, o, at = (f"${first + i}" for i in range(6))
        where = f" WHERE {when}" if when else ""
        return ('claimed AS (INSERT INTO inbox (consumer, event_id, topic, "partition", "offset", applied_at) '
                f"SELECT {c}::text, e, t, p, o, {at}::timestamptz "
                f"FROM unnest({e}::text[], {t}::text[], {p}::int[], {o}::bigint[]) AS c(e, t, p, o){where})",
                [self.consumer, list(self.keys), [ev.topic for ev in self.events],
                 [ev.partition for ev in self.events], [ev.offset for ev in self.events], self.at])


def by_content(event: Event) -> str:
    """An inbox key for records from outside: the event id and a digest of the exact bytes. The same
    record delivered again is a duplicate; another record under the same id is not."""
    return f"{event.event_id}#{hashlib.sha256(event.raw).hexdigest()[:32]}"


async def unclaim(conn: asyncpg.Connection, consumer: str, event_ids: Sequence[str]) -> None:
    """Forget claims inside the same transaction (events the handler rejected: they are dead-lettered,
    and a replay after the fix must apply them)."""
    if event_ids:
        await conn.execute("DELETE FROM inbox WHERE consumer = $1 AND event_id = ANY($2::text[])",
                           consumer, list(event_ids))


# a batch per statement: short transactions, and members of one tier skip each other's rows
_PRUNE = """
DELETE FROM inbox WHERE ctid = ANY(ARRAY(
  SELECT ctid FROM inbox WHERE applied_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED))
"""


async def prune(pool: asyncpg.Pool, older_than_s: float, batch: int = 5000) -> int:
    """Delete the claims older than ``older_than_s``, a batch a statement; returns how many."""
    total = 0
    while True:
        status = await pool.execute(_PRUNE, older_than_s, batch)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch:
            return total


class Pruner:
    """Every ``interval_s`` (an hour), the claims past their retention leave the service's inbox."""

    def __init__(self, pool: asyncpg.Pool, service: str, retention_s: float, interval_s: float = 3600.0) -> None:
        self._pool, self._service = pool, service
        self._retention_s, self._interval_s = retention_s, interval_s

    async def step(self) -> None:
        deleted = await prune(self._pool, self._retention_s)
        INBOX_PRUNED.labels(self._service).inc(deleted)
        if deleted:
            log.info("inbox pruned", service=self._service, rows=deleted, older_than_s=self._retention_s)

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self._interval_s, self.step, f"{self._service} inbox pruning")
