"""What the ledger decided, reflected in each request's status: reserved, refused, or expired.

A light consumer of ``quota.events`` in its own group, apart from the workers: a request shows
``reserved`` as soon as its unit is held, even while the workers are a long queue behind.
"""

from __future__ import annotations

import asyncpg

from services.contracts.bubuh.v1 import quota_pb2
from services.kernel import errors, logs
from services.kernel.events import Event
from services.kernel.settings import Settings
from services.stamping.metrics import STAGE_SECONDS
from services.stamping.worker import finish_failed

log = logs.get(__name__)
CONSUMER = "stamping.tracker"


class StatusTracker:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool

    async def handle(self, event: Event) -> None:
        m = event.payload
        if isinstance(m, quota_pb2.QuotaReserved):
            waited = await self._pool.fetchval(
                "UPDATE requests SET status = 'reserved', reserved_at = now() WHERE request_id = $1 "
                "AND status = 'queued' RETURNING extract(epoch FROM now() - accepted_at)", m.request_id)
            if waited is not None:
                STAGE_SECONDS.labels("queued").observe(max(0.0, float(waited)))
        elif isinstance(m, quota_pb2.QuotaRejected):
            await self._fail(event, m, m.code or errors.QUOTA_INSUFFICIENT.code, m.detail or "no available unit")
        elif isinstance(m, quota_pb2.QuotaReleased) and m.code == errors.RESERVATION_EXPIRED.code:
            # only requests still waiting (queued, or dead-lettered) end here; one being signed ends in the worker
            await self._fail(event, m, m.code, "the reservation expired before the stamp was made",
                             only_waiting=True)

    async def _fail(self, event: Event, m, code: str, detail: str, only_waiting: bool = False) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO requests (request_id, channel_id, account_id, status) VALUES ($1, $2, $3, 'queued') "
                "ON CONFLICT (request_id) DO NOTHING", m.request_id, m.channel_id, m.account_id)
            status = await conn.fetchval("SELECT status FROM requests WHERE request_id = $1 FOR UPDATE", m.request_id)
            if only_waiting and status not in ("queued", "reserved", "dead_lettered"):
                return
            await finish_failed(conn, self._settings, request_id=m.request_id, channel_id=m.channel_id,
                                account_id=m.account_id, code=code, detail=detail, cause=event)
