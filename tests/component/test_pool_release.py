"""A pool connection goes back without asyncpg's reset round trip (``Connection.get_reset_query``):
what that reset would undo must never be left behind by our own code."""

from __future__ import annotations

from services.kernel import database, migrations


async def test_release_sends_no_reset_and_a_migration_leaves_no_session_state(settings):
    pool = await database.create_pool(settings, "component", min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            default_path = await conn.fetchval("SHOW search_path")
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            assert conn.get_reset_query() == ""
        # migrate sets its own search_path (another schema here) and takes an advisory lock, on the
        # pool's one connection
        await migrations.migrate(pool, settings.schema("component-other"), migrations.files_for("component"))
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == backend      # the same session
            assert await conn.fetchval("SHOW search_path") == default_path
            assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                       "AND pid = pg_backend_pid()") == 0
            # a transaction left open is still rolled back on release (asyncpg's own step)
            tx = conn.transaction()
            await tx.start()
            await conn.execute("CREATE TEMP TABLE left_open (x int)")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('left_open')") is None
    finally:
        await pool.close()
