"""The uploads of completed stamps, left behind: ``bubuh prune-uploads``.

The tracker deletes a stamp's upload once the stamp is completed (``tracker.py``; ``store.py`` says why
that is safe). Uploads it did not delete are still on the store: those of stamps completed before it
did (a store written by an older version keeps every upload) and those of a release whose delete
failed or whose process died between the commit and the delete. This deletes them, walking the
completed requests in key order, ``BATCH`` at a time (one query and one trip to the store each). Only
uploads go; stamped files, records and the uploads of requests that did not complete stay. Safe to
run while the platform runs, and again: an upload already gone is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from services.kernel.settings import Settings
from services.stamping import NAME, store

BATCH = 1000


@dataclass(frozen=True)
class Pruned:
    completed: int      # completed requests walked
    deleted: int        # uploads found and deleted


async def prune(settings: Settings, documents: store.DocumentStore, *, batch: int = BATCH,
                progress: Callable[[int, int, int], None] | None = None) -> Pruned:
    """Delete the uploads of every completed request; ``progress(walked, total, deleted)`` after each batch."""
    table = f'"{settings.schema(NAME)}".requests'
    conn = await asyncpg.connect(settings.database_url)
    try:
        total = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE status = 'completed'")
        after, walked, deleted = "", 0, 0
        while True:
            ids = [r["request_id"] for r in await conn.fetch(
                f"SELECT request_id FROM {table} WHERE status = 'completed' AND request_id > $1 "
                "ORDER BY request_id LIMIT $2", after, batch)]
            if not ids:
                return Pruned(walked, deleted)
            deleted += await documents.delete_all([store.input_key(rid) for rid in ids])
            walked, after = walked + len(ids), ids[-1]
            if progress:
                progress(walked, total, deleted)
    finally:
        await conn.close()
