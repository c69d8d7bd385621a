"""Inbox claims past their retention leave every service's inbox (``inbox.Pruner``); younger ones,
which a redelivery could still need, stay."""

from __future__ import annotations

from services.kernel import inbox, metrics


async def test_claims_past_retention_are_deleted_in_batches_and_younger_ones_stay(pool):
    await pool.execute("INSERT INTO inbox (consumer, event_id, applied_at) "
                       "SELECT 'c', 'old-' || i, now() - interval '40 days' FROM generate_series(1, 1203) AS i")
    await pool.execute("INSERT INTO inbox (consumer, event_id, applied_at) "
                       "SELECT 'c', 'young-' || i, now() - interval '2 days' FROM generate_series(1, 50) AS i")
    assert await inbox.prune(pool, 30 * 24 * 3600, batch=500) == 1203        # three batches, the last short
    left = await pool.fetch("SELECT event_id FROM inbox WHERE consumer = 'c'")
    assert len(left) == 50 and all(r["event_id"].startswith("young-") for r in left)
    # a claim that stays still says "applied": the same event again is skipped
    async with pool.acquire() as conn, conn.transaction():
        assert await inbox.claim(conn, "c", "young-7") is False
        assert await inbox.claim(conn, "c", "old-7") is True      # past retention: no longer known

    before = metrics.INBOX_PRUNED.labels("component")._value.get()
    await pool.execute("UPDATE inbox SET applied_at = now() - interval '31 days' WHERE event_id LIKE 'young-%'")
    await inbox.Pruner(pool, "component", 30 * 24 * 3600).step()
    assert await pool.fetchval("SELECT count(*) FROM inbox WHERE consumer = 'c'") == 1      # old-7, just claimed
    assert metrics.INBOX_PRUNED.labels("component")._value.get() == before + 50
    index = await pool.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = 'inbox_applied_at' "
                                "AND schemaname = current_schema()")
    assert index is not None and "brin" in index
