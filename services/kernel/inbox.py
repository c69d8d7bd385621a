"""The inbox: "have I applied this event?" answered in the same transaction as the effect."""

from __future__ import annotations

import asyncpg


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
