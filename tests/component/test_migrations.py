"""Migrations run while the platform serves (kernel/migrations.py): in a rolling deploy each new member migrates
its schemas as it starts, beside the old version's members. Against real PostgreSQL, with the lock conflicts
a live table has: a transaction left open on it (a worker's batch, an operator's psql), and writers arriving
behind the migration."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from services.kernel import database, migrations

TABLE = """CREATE TABLE t (id int PRIMARY KEY, x int);
INSERT INTO t SELECT g, g FROM generate_series(1, 1000) AS g;
"""


def _files(tmp_path: Path, *sqls: str) -> list[Path]:
    paths = []
    for i, sql in enumerate(sqls, 1):
        p = tmp_path / f"{i:04d}.sql"
        p.write_text(sql)
        paths.append(p)
    return paths


@pytest.fixture
async def db(settings):
    """(pool, schema, a connection of its own on the schema): the pool migrates, the connection plays the rest
    of the platform."""
    schema = settings.schema("migrating")
    pool = await database.create_pool(settings, "migrating", min_size=1, max_size=2)
    other = await database.connect(settings, server_settings={"search_path": schema})
    try:
        yield pool, schema, other
    finally:
        await other.close()
        await pool.close()


async def _waiting_on_lock(settings, like: str, timeout_s: float = 10.0) -> None:
    """Until a backend runs a statement like ``like`` and waits on a lock: the conflict was seen. (On a
    connection of its own: inside a transaction, pg_stat_activity is the snapshot of its first read.)"""
    conn = await database.connect(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND query ILIKE $1", like):
                return
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    raise AssertionError(f"no backend waited on a lock running {like!r}")


async def _insert_within(settings, schema: str, row: int, budget_s: float) -> float:
    """A writer arriving on the table: its insert's time, failing if it does not finish within ``budget_s``."""
    conn = await database.connect(settings, server_settings={"search_path": schema})
    try:
        started = time.monotonic()
        await conn.execute("INSERT INTO t VALUES ($1, $1)", row, timeout=budget_s)
        return time.monotonic() - started
    finally:
        await conn.close()


async def _held(db, tmp_path, migration: str, holding: str):
    """The table as its first migration, ``migration`` as the next file (the files returned), and ``holding``
    run on the other connection in a transaction left open (returned): a batch or a read in progress."""
    pool, schema, other = db
    await migrations.migrate(pool, schema, _files(tmp_path, TABLE))
    files = _files(tmp_path, TABLE, migration)
    open_tx = other.transaction()
    await open_tx.start()
    await other.execute(holding)
    return files, open_tx


async def test_an_index_is_built_concurrently_while_a_transaction_holds_the_table_and_writers_go_on(db, settings,
                                                                                                     tmp_path):
    pool, schema, other = db
    index = ("-- bubuh:no-transaction\n-- an index on a table in use\n"
             "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_x ON t (x);\n")
    files, open_tx = await _held(db, tmp_path, index, "INSERT INTO t VALUES (5000, 5000)")   # a batch in progress
    migrating = asyncio.create_task(migrations.migrate(pool, schema, files))
    try:
        # the build waits for that transaction
        await _waiting_on_lock(settings, "%CREATE INDEX CONCURRENTLY IF NOT EXISTS t_x %")
        took = await _insert_within(settings, schema, 5001, budget_s=2.0)
        assert took < 1.0
        assert not migrating.done()
    finally:
        await open_tx.commit()
    assert await asyncio.wait_for(migrating, 30) == ["0002.sql"]
    assert await other.fetchval("SELECT i.indisvalid FROM pg_index AS i WHERE i.indexrelid = 't_x'::regclass")


async def test_a_plain_create_index_would_have_held_up_the_writers(db, settings, tmp_path):
    """The other half of the test above: the same build in a transaction waits for the open transaction too,
    and the writer behind it waits for it, until the build gives way (lock_timeout); so a concurrent build
    is what keeps intake going, and the lock timeout what bounds the rest."""
    pool, schema, _ = db
    files, open_tx = await _held(db, tmp_path, "CREATE INDEX t_x ON t (x);\n", "INSERT INTO t VALUES (5000, 5000)")
    migrating = asyncio.create_task(migrations.migrate(pool, schema, files, lock_timeout_s=1.5))
    try:
        await _waiting_on_lock(settings, "CREATE INDEX t_x%")
        took = await _insert_within(settings, schema, 5001, budget_s=5.0)
        assert 0.5 < took < 3.0       # held until the build gave its place up, not longer
        assert not migrating.done()
    finally:
        await open_tx.commit()
    assert await asyncio.wait_for(migrating, 30) == ["0002.sql"]


async def test_a_migration_that_cannot_take_its_lock_gives_way_then_applies_once_the_table_is_free(db, settings,
                                                                                                  tmp_path):
    pool, schema, other = db
    # a long read: AccessShare until it ends
    files, open_tx = await _held(db, tmp_path, "ALTER TABLE t ADD COLUMN y int;\n", "SELECT count(*) FROM t")
    migrating = asyncio.create_task(migrations.migrate(pool, schema, files, lock_timeout_s=0.2))
    try:
        await _waiting_on_lock(settings, "ALTER TABLE t ADD COLUMN y%")
        for row in range(6000, 6010):                             # writers keep coming, none held long
            assert await _insert_within(settings, schema, row, budget_s=1.0) < 0.5
            await asyncio.sleep(0.1)
        assert not migrating.done()
    finally:
        await open_tx.commit()
    assert await asyncio.wait_for(migrating, 30) == ["0002.sql"]
    assert await other.fetchval("SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 "
                                "AND table_name = 't' AND column_name = 'y'", schema) == 1


async def test_a_migration_blocked_past_its_wait_stops_with_the_transaction_that_holds_it(db, tmp_path):
    pool, schema, other = db
    files, open_tx = await _held(db, tmp_path, "ALTER TABLE t ADD COLUMN y int;\n", "SELECT count(*) FROM t")
    holder = await other.fetchval("SELECT pg_backend_pid()")
    try:
        with pytest.raises(migrations.MigrationBlocked) as blocked:
            await migrations.migrate(pool, schema, files, lock_timeout_s=0.2, lock_wait_s=1.0)
    finally:
        await open_tx.rollback()
    assert "0002.sql" in str(blocked.value)
    assert f"'pid': {holder}" in str(blocked.value)
    assert await other.fetchval("SELECT count(*) FROM schema_migrations WHERE name = '0002.sql'") == 0
    assert await migrations.migrate(pool, schema, files) == ["0002.sql"]      # the next start applies it


async def test_an_interrupted_concurrent_build_is_dropped_and_built_again(db, tmp_path):
    """A unique index built concurrently over duplicates fails and leaves an invalid index (as a build stopped
    midway does); ``IF NOT EXISTS`` alone would then keep it, unused for reads and never unique-checked."""
    pool, schema, other = db
    index = "-- bubuh:no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_x_unique ON t (x);\n"
    files = _files(tmp_path, TABLE + "INSERT INTO t VALUES (2000, 1);\n", index)
    with pytest.raises(asyncpg.UniqueViolationError):
        await migrations.migrate(pool, schema, files)
    assert await other.fetchval("SELECT i.indisvalid FROM pg_index AS i "
                                "WHERE i.indexrelid = 't_x_unique'::regclass") is False      # left behind
    await other.execute("DELETE FROM t WHERE id = 2000")
    assert await migrations.migrate(pool, schema, files) == ["0002.sql"]
    assert await other.fetchval("SELECT i.indisvalid FROM pg_index AS i "
                                "WHERE i.indexrelid = 't_x_unique'::regclass") is True
    with pytest.raises(asyncpg.UniqueViolationError):
        await other.execute("INSERT INTO t VALUES (2001, 1)")


async def test_a_migration_longer_than_the_pools_command_timeout_completes(settings, tmp_path):
    schema = settings.schema("migrating")
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1, command_timeout=0.3)
    try:
        files = _files(tmp_path, "SELECT pg_sleep(0.8);\nCREATE TABLE done (x int);\n",
                       "-- bubuh:no-transaction\nSELECT pg_sleep(0.8);\n")
        assert await migrations.migrate(pool, schema, files) == ["0001.sql", "0002.sql"]
    finally:
        await pool.close()


async def test_a_second_instance_waits_for_the_first_ones_migrations_past_its_command_timeout(settings, tmp_path):
    """Two members starting together: the second waits for the schema's migration lock as long as the first's
    migrations take, instead of failing after the pool's command timeout (10 s in production)."""
    schema = settings.schema("migrating")
    lock = migrations.schema_lock_key(schema)
    first = await database.connect(settings)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1, command_timeout=0.3)
    try:
        await first.execute("SELECT pg_advisory_lock($1)", lock)       # the first instance, migrating
        second = asyncio.create_task(migrations.migrate(pool, schema, _files(tmp_path, TABLE)))
        await asyncio.sleep(1.0)
        assert not second.done()                                      # waiting, past its 0.3 s
        await first.execute("SELECT pg_advisory_unlock($1)", lock)
        assert await asyncio.wait_for(second, 10) == ["0001.sql"]
    finally:
        await first.close()
        await pool.close()


def test_a_no_transaction_file_is_split_where_a_line_ends_with_a_semicolon():
    sql = ("-- bubuh:no-transaction\n-- a comment; with a semicolon\n"
           "CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x)\n  WHERE x > 0;\n"
           "-- between\nCREATE INDEX CONCURRENTLY IF NOT EXISTS b ON t (id);  \n-- trailing\n")
    assert migrations.statements(sql) == [
        "-- bubuh:no-transaction\n-- a comment; with a semicolon\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x)\n  WHERE x > 0",
        "-- between\nCREATE INDEX CONCURRENTLY IF NOT EXISTS b ON t (id)"]
