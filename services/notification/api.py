"""HTTP routes of the notification service: a channel's delivery log, and redelivery on request.

``GET  /v1/deliveries?event_id=...``      the delivery of one event, with every attempt
``GET  /v1/deliveries?since=...&limit=``  deliveries created at or after ``since``, oldest first
``POST /v1/deliveries/{id}/redeliver``    due again now, with a fresh horizon (202)

A channel sees and redelivers only its own deliveries; someone else's id answers 404.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse

from services.kernel import errors
from services.kernel.channels import ChannelView
from services.kernel.settings import Settings
from services.notification.intake import wake_channel
from services.notification.metrics import DELIVERIES

MAX_LIMIT = 500

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


def router(settings: Settings, channels: ChannelView, pool: asyncpg.Pool) -> APIRouter:
    r = APIRouter(tags=["notifications"])

    @r.get("/v1/deliveries")
    async def list_deliveries(
            authorization: str | None = Header(None),
            event_id: Annotated[str | None, Query(description="The event's id (the webhook's `id`).")] = None,
            since: Annotated[dt.datetime | None, Query(
                description="RFC 3339 time: deliveries created at or after it, oldest first.")] = None,
            limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100):
        """The calling channel's webhook deliveries, each with its attempt log (times, status codes, errors).
        Page through with `since` = the previous page's `next_since`."""
        channel = channels.authenticate(authorization)
        if event_id is None and since is None:
            raise errors.BubuhError(errors.QUERY_INVALID, "give event_id or since")
        where, args = ["channel_id = $1"], [channel.channel_id]
        if event_id is not None:
            args.append(event_id)
            where.append(f"event_id = ${len(args)}")
        if since is not None:
            args.append(since if since.tzinfo else since.replace(tzinfo=dt.UTC))
            where.append(f"created_at >= ${len(args)}")
        args.append(limit)
        async with pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS} FROM deliveries WHERE {' AND '.join(where)} "
                                    f"ORDER BY created_at, delivery_id LIMIT ${len(args)}", *args)
            out = await _with_logs(conn, rows)
        next_since = out[-1]["created_at"] if len(out) == limit else None
        return {"deliveries": out, "next_since": next_since}

    @r.post("/v1/deliveries/{delivery_id}/redeliver", status_code=202)
    async def redeliver(delivery_id: str, authorization: str | None = Header(None)):
        """Send this delivery again now (whatever its status), with a fresh retry horizon. The body and
        event id are the same as before: receivers de-duplicate on the event id."""
        channel = channels.authenticate(authorization)
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = now(), attempts = 0, "
                "horizon_at = now() + make_interval(secs => $3), leased_until = NULL, lease_token = NULL "
                f"WHERE delivery_id = $1 AND channel_id = $2 RETURNING {_COLUMNS}",
                delivery_id, channel.channel_id, settings.webhook_horizon_s)
            if row is None:
                raise errors.BubuhError(errors.NOT_FOUND, f"no delivery {delivery_id} for this channel")
            await conn.execute("SELECT pg_notify($1, '')", wake_channel(settings))
            out = (await _with_logs(conn, [row]))[0]
        DELIVERIES.labels("redelivery_requested").inc()
        return JSONResponse(status_code=202, content=out)

    return r
