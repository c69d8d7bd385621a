"""The inbox: "have I applied this event?" answered in the same transaction as the effect.

Each claim also records where the event was read (topic, partition, offset), so an event's path
through the platform can be traced afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import asyncpg

from services.kernel.events import Event


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
    out: list[Event] = []
    for e, k in zip(events, keys, strict=True):
        if k in fresh:
            fresh.discard(k)              # a second copy in the same batch is a duplicate too
            out.append(e)
    return out


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
