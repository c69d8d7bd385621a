"""A channel's delivery log: its webhook deliveries with their attempts, and redelivery on request.

What ``GET /v1/deliveries`` and ``POST /v1/deliveries/{id}/redeliver`` (``api.py``) answer with; a channel
sees and redelivers only its own deliveries. ``Redelivery`` does the same for an operator replaying
``notification.dead-letter``: each abandoned webhook or e-mail due again (one statement for both:
``due_work.DUE_AGAIN``).
"""

from __future__ import annotations

import datetime as dt

import asyncpg

from services.contracts.bubuh.v1 import notification_pb2
from services.kernel import database, errors, events, logs
from services.kernel.settings import Settings
from services.notification import NAME
from services.notification.due_work import DUE_AGAIN
from services.notification.email_sender import EmailSender
from services.notification.event_intake import wake_channel
from services.notification.metrics import DELIVERIES
from services.notification.webhook_sender import WebhookSender

log = logs.get(__name__)

_COLUMNS = ("delivery_id, event_id, event_type, url, status, attempts, created_at, next_attempt_at, "
            "horizon_at, delivered_at, last_status_code, last_error")


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value else None


def _delivery(row, log: list) -> dict:
    pending = row["status"] == "pending"
    return {
        "delivery_id": row["delivery_id"], "event_id": row["event_id"], "event_type": row["event_type"],
        "url": row["url"], "status": row["status"], "attempts": row["attempts"],
        "created_at": _iso(row["created_at"]),
        "next_attempt_at": _iso(row["next_attempt_at"]) if pending else None,
        "horizon_at": _iso(row["horizon_at"]), "delivered_at": _iso(row["delivered_at"]),
        "last_status_code": row["last_status_code"], "last_error": row["last_error"],
        "log": [{"attempt": a["attempt"], "at": _iso(a["started_at"]), "duration_ms": round(a["duration_ms"], 3),
                 "status_code": a["status_code"], "error": a["error"], "outcome": a["outcome"],
                 "retry_in_ms": None if a["retry_in_ms"] is None else round(a["retry_in_ms"], 3)} for a in log],
    }


async def _with_logs(conn: asyncpg.Connection, rows) -> list[dict]:
    ids = [r["delivery_id"] for r in rows]
    attempts = await conn.fetch(
        "SELECT delivery_id, attempt, started_at, duration_ms, status_code, error, outcome, retry_in_ms "
        "FROM delivery_attempts "
        "WHERE delivery_id = ANY($1::text[]) ORDER BY id", ids) if ids else []
    by_id: dict[str, list] = {}
    for a in attempts:
        by_id.setdefault(a["delivery_id"], []).append(a)
    return [_delivery(r, by_id.get(r["delivery_id"], [])) for r in rows]


class DeliveryLog:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings, self._pool = settings, pool

    async def list(self, channel_id: str, *, event_id: str | None, since: dt.datetime | None,
                   limit: int) -> list[dict]:
        """The delivery of one event, or deliveries created at or after ``since``, oldest first."""
        if event_id is None and since is None:
            raise errors.BubuhError(errors.QUERY_INVALID, "give event_id or since")
        where, args = ["channel_id = $1"], [channel_id]
        if event_id is not None:
            args.append(event_id)
            where.append(f"event_id = ${len(args)}")
        if since is not None:
            args.append(since if since.tzinfo else since.replace(tzinfo=dt.UTC))
            where.append(f"created_at >= ${len(args)}")
        args.append(limit)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM deliveries WHERE {' AND '.join(where)} "
                                    f"ORDER BY created_at, delivery_id LIMIT ${len(args)}", *args)
            return await _with_logs(conn, rows)

    async def redeliver(self, channel_id: str, delivery_id: str) -> dict:
        """Due again now (whatever its status), with a fresh retry horizon; the body and event id stay."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                WebhookSender.table.sql(DUE_AGAIN) + f" AND channel_id = $3 RETURNING {_COLUMNS}",
                delivery_id, self._settings.webhook_horizon_s, channel_id)
            if row is None:
                raise errors.BubuhError(errors.NOT_FOUND, f"no delivery {delivery_id} for this channel")
            await database.notify(conn, wake_channel(self._settings))
            out = (await _with_logs(conn, [row]))[0]
        DELIVERIES.labels("redelivery_requested").inc()
        return out



class Redelivery:
    """``bubuh replay notification.dead-letter``: each ``DeliveryAbandoned`` entry due again.

    An async context manager around a pool on the notification schema, yielding the ``settle``
    callable of ``kernel.replay``. A row that is no longer dead (delivered or sent since, or re-armed
    by an earlier replay) is left alone and the entry counts as skipped.
    """

    def __init__(self, settings: Settings) -> None:
        self._s = settings
        self._pool: asyncpg.Pool | None = None

    async def __aenter__(self):
        self._pool = await database.create_pool(self._s, NAME, min_size=1, max_size=2)
        return self.settle

    async def __aexit__(self, *exc) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def settle(self, value: bytes, dry_run: bool) -> bool:
        try:
            _env, msg = events.decode(value)
        except Exception:  # noqa: BLE001 - not ours to settle: replay counts it as skipped
            return False
        if not isinstance(msg, notification_pb2.DeliveryAbandoned):
            return False
        assert self._pool is not None
        try:
            return await self._due_again(msg, dry_run)
        except _DryRun:
            return True

    async def _due_again(self, msg: notification_pb2.DeliveryAbandoned, dry_run: bool) -> bool:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            found = None
            for table, horizon in ((WebhookSender.table, self._s.webhook_horizon_s),
                                   (EmailSender.table, self._s.email_horizon_s)):
                found = await conn.fetchval(table.sql(DUE_AGAIN) + f" AND status = 'dead' RETURNING {table.key}",
                                            msg.delivery_id, horizon)
                if found is not None:
                    break
            if found is None:
                return False
            if dry_run:
                raise _DryRun        # rolls the change back: a dry run only says what it would do
            await database.notify(conn, wake_channel(self._s))
        log.info("abandoned delivery due again", delivery_id=msg.delivery_id, channel_id=msg.channel_id,
                 event_type=msg.event_type)
        return True


class _DryRun(Exception):
    pass
