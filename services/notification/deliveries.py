"""A channel's delivery log: its webhook deliveries with their attempts, and redelivery on request.

What ``GET /v1/deliveries`` and ``POST /v1/deliveries/{id}/redeliver`` (``api.py``) answer with; a channel
sees and redelivers only its own deliveries.
"""

from __future__ import annotations

import datetime as dt

import asyncpg

from services.kernel import errors, listener
from services.kernel.settings import Settings
from services.notification.event_intake import wake_channel
from services.notification.metrics import DELIVERIES

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
                 "status_code": a["status_code"], "error": a["error"], "outcome": a["outcome"]} for a in log],
    }


async def _with_logs(conn: asyncpg.Connection, rows) -> list[dict]:
    ids = [r["delivery_id"] for r in rows]
    attempts = await conn.fetch(
        "SELECT delivery_id, attempt, started_at, duration_ms, status_code, error, outcome FROM delivery_attempts "
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
                "UPDATE deliveries SET status = 'pending', next_attempt_at = now(), attempts = 0, "
                "horizon_at = now() + make_interval(secs => $3), leased_until = NULL, lease_token = NULL "
                f"WHERE delivery_id = $1 AND channel_id = $2 RETURNING {_COLUMNS}",
                delivery_id, channel_id, self._settings.webhook_horizon_s)
            if row is None:
                raise errors.BubuhError(errors.NOT_FOUND, f"no delivery {delivery_id} for this channel")
            await listener.notify(conn, wake_channel(self._settings))
            out = (await _with_logs(conn, [row]))[0]
        DELIVERIES.labels("redelivery_requested").inc()
        return out
