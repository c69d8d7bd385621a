"""SQL migrations, per service schema.

A service's migrations are the kernel's files (inbox, outbox) followed by the ``.sql`` files in
``services/<service>/migrations/``, applied in name order, each once, under an advisory lock so that two
instances starting together do not race. Every process migrates its schemas as it starts, so in a rolling
deploy a migration runs while the old version's members serve; so that it never stops them:

- **A migration gives way to the platform's traffic.** Each file runs in a transaction with ``lock_timeout``
  (``BUBUH_MIGRATION_LOCK_TIMEOUT_S``, 2 s). Without it, an ``ALTER TABLE`` that waits for its lock behind
  one long transaction holds up every statement on that table queued after it (intake, the workers): the
  whole platform stalls on one migration. With it, the migration gives up its place in the lock queue after
  2 s, rolls back, and tries again after a pause, until it has waited ``BUBUH_MIGRATION_LOCK_WAIT_S`` (90 s)
  in all; then the process stops with ``MigrationBlocked``, naming the oldest open transactions.
- **An index on a table in use is built concurrently.** A file whose first line is ``-- bubuh:no-transaction``
  runs outside a transaction, one statement at a time (statements end with ``;`` at the end of a line; no
  ``$$`` bodies), for ``CREATE INDEX CONCURRENTLY IF NOT EXISTS``: a plain ``CREATE INDEX`` blocks every
  write to the table while it builds. Each statement must be safe to run again (a stop midway runs the
  file again). A concurrent build that was interrupted leaves an invalid index behind, which ``IF NOT
  EXISTS`` would then keep: the runner drops such an index (of the name the statement creates) first.
- **A migration takes as long as it takes.** Its statements run without the pool's command timeout
  (``BUBUH_DB_COMMAND_TIMEOUT_S``, 10 s, meant for the request path): an index build on a grown table
  timed out client-side, failed the start, and every restart failed the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import time
from pathlib import Path

import asyncpg

from services.kernel import errors, logs
from services.kernel.settings import Settings

log = logs.get(__name__)

_KERNEL_DIR = Path(__file__).with_name("migrations")
_SERVICES_DIR = Path(__file__).resolve().parents[1]

NO_TRANSACTION = "-- bubuh:no-transaction"
# no client-side limit on a migration's statements (asyncpg: None means the pool's command timeout)
_UNLIMITED_S = 7 * 24 * 3600.0
_PAUSE_S = (0.5, 1.0, 2.0, 5.0)          # between tries of a migration that found its lock held
_SCHEMA_LOCK_POLL_S = 0.5                 # another instance migrates the schema: looked at again this often
_SCHEMA_LOCK_LOG_S = 10.0
_CONCURRENT_INDEX = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+(\"[^\"]+\"|\w+)", re.I)
_STATEMENT_END = re.compile(r";[ \t]*$", re.M)
_OLDEST_TRANSACTIONS = """
SELECT pid, application_name, state, round(extract(epoch FROM now() - xact_start))::int AS open_s,
       left(query, 120) AS query
  FROM pg_stat_activity
 WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND datname = current_database()
 ORDER BY xact_start LIMIT 3
"""


class MigrationBlocked(errors.ConfigError):
    """A migration could not take its locks within the wait allowed: something holds the table for long.
    It stops the process with its one line (``bubuh: ...``), as a database that cannot work does."""


def files_for(service: str) -> list[Path]:
    own = sorted((_SERVICES_DIR / service / "migrations").glob("*.sql"))
    return sorted(_KERNEL_DIR.glob("*.sql")) + own


def statements(sql: str) -> list[str]:
    """A no-transaction file's statements: split where ``;`` ends a line, comment-only parts dropped."""
    parts = [p.strip() for p in _STATEMENT_END.split(sql)]
    return [p for p in parts if any(line.strip() and not line.strip().startswith("--") for line in p.splitlines())]


def schema_lock_key(schema: str) -> int:
    """The advisory lock that one instance at a time holds while it migrates ``schema``."""
    return int.from_bytes(hashlib.sha256(schema.encode()).digest()[:8], "big", signed=True)


async def migrate_service(pool: asyncpg.Pool, settings: Settings, service: str) -> list[str]:
    """A service's migrations on its schema, with the waits ``settings`` gives."""
    return await migrate(pool, settings.schema(service), files_for(service),
                         lock_timeout_s=settings.migration_lock_timeout_s, lock_wait_s=settings.migration_lock_wait_s)


async def migrate(pool: asyncpg.Pool, schema: str, files: list[Path], *, lock_timeout_s: float = 2.0,
                  lock_wait_s: float = 90.0) -> list[str]:
    """Apply what is missing; returns the names applied now."""
    applied_now: list[str] = []
    lock = schema_lock_key(schema)
    async with pool.acquire() as conn:
        await _lock_schema(conn, lock, schema)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET search_path TO "{schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for path in files:
                if path.name in done:
                    continue
                sql = path.read_text()
                if sql.startswith(NO_TRANSACTION):
                    await _apply_outside_transaction(conn, schema, path.name, sql)
                else:
                    await _apply_in_transaction(conn, path.name, sql, lock_timeout_s, lock_wait_s)
                applied_now.append(path.name)
                log.info("migration applied", schema=schema, migration=path.name)
        finally:
            await conn.execute("RESET search_path")     # the pool does not reset a connection on release
            await conn.execute("SELECT pg_advisory_unlock($1)", lock)
    return applied_now


async def _lock_schema(conn: asyncpg.Connection, lock: int, schema: str) -> None:
    """The schema's migration lock, waited for as long as another instance's migrations take (an index
    build can take minutes), saying so every ``_SCHEMA_LOCK_LOG_S``."""
    started = logged = time.monotonic()
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
        if time.monotonic() - logged >= _SCHEMA_LOCK_LOG_S:
            logged = time.monotonic()
            log.info("waiting for another instance's migrations", schema=schema,
                     waited_s=round(logged - started))
        await asyncio.sleep(_SCHEMA_LOCK_POLL_S)


async def _apply_in_transaction(conn: asyncpg.Connection, name: str, sql: str, lock_timeout_s: float,
                                lock_wait_s: float) -> None:
    started = time.monotonic()
    for attempt in itertools.count():
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{max(1, round(lock_timeout_s * 1000))}ms'")
                await conn.execute(sql, timeout=_UNLIMITED_S)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            return
        except asyncpg.LockNotAvailableError:
            holders = [dict(r) for r in await conn.fetch(_OLDEST_TRANSACTIONS)]
            waited = time.monotonic() - started
            if waited >= lock_wait_s:
                raise MigrationBlocked(
                    f"migration {name} could not take its locks in {waited:.0f} s ({attempt + 1} tries of "
                    f"{lock_timeout_s:g} s); the oldest open transactions: {holders}") from None
            pause = _PAUSE_S[min(attempt, len(_PAUSE_S) - 1)]
            log.warning("migration gave way: a lock it needs is held; trying again", migration=name,
                        attempt=attempt + 1, waited_s=round(waited, 1), pause_s=pause, oldest_transactions=holders)
            await asyncio.sleep(pause)


async def _apply_outside_transaction(conn: asyncpg.Connection, schema: str, name: str, sql: str) -> None:
    for statement in statements(sql.removeprefix(NO_TRANSACTION)):
        if match := _CONCURRENT_INDEX.match(statement):
            await _drop_if_invalid(conn, schema, match.group(1).strip('"'))
        await conn.execute(statement, timeout=_UNLIMITED_S)
    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)


async def _drop_if_invalid(conn: asyncpg.Connection, schema: str, index: str) -> None:
    """What an interrupted ``CREATE INDEX CONCURRENTLY`` left: an index marked invalid, never used for reads
    but kept up to date by every write. Dropped, so the statement builds it again."""
    invalid = await conn.fetchval(
        "SELECT NOT i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
        "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
        schema, index)
    if invalid:
        log.warning("dropping an invalid index an interrupted build left; building it again", schema=schema,
                    index=index)
        await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{schema}"."{index}"', timeout=_UNLIMITED_S)
