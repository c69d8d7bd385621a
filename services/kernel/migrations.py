"""SQL migrations, per service schema.

A service's migrations are the kernel's files (inbox, outbox) followed by the ``.sql`` files in
``services/<service>/migrations/``, applied in name order, each once, each in a transaction, under
an advisory lock so that two instances starting together do not race.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg

_KERNEL_DIR = Path(__file__).with_name("migrations")
_SERVICES_DIR = Path(__file__).resolve().parents[1]


def files_for(service: str) -> list[Path]:
    own = sorted((_SERVICES_DIR / service / "migrations").glob("*.sql"))
    return sorted(_KERNEL_DIR.glob("*.sql")) + own


async def migrate(pool: asyncpg.Pool, schema: str, files: list[Path]) -> list[str]:
    """Apply what is missing; returns the names applied now."""
    applied_now: list[str] = []
    lock = int.from_bytes(hashlib.sha256(schema.encode()).digest()[:8], "big", signed=True)
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", lock)
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
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
                applied_now.append(path.name)
        finally:
            await conn.execute("RESET search_path")     # the pool does not reset a connection on release
            await conn.execute("SELECT pg_advisory_unlock($1)", lock)
    return applied_now
