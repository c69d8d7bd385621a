"""HTTP routes of the notification service: a channel's delivery log, and redelivery on request.

``GET  /v1/deliveries?event_id=...``      the delivery of one event, with every attempt
``GET  /v1/deliveries?since=...&limit=``  deliveries created at or after ``since``, oldest first
``POST /v1/deliveries/{id}/redeliver``    due again now, with a fresh horizon (202)

A channel sees and redelivers only its own deliveries; someone else's id answers 404. What they read
and change is ``deliveries.py``'s ``DeliveryLog``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse

from services.kernel.channels import ChannelView
from services.notification.deliveries import DeliveryLog

MAX_LIMIT = 500


def router(channels: ChannelView, log: DeliveryLog) -> APIRouter:
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
        out = await log.list(channel.channel_id, event_id=event_id, since=since, limit=limit)
        next_since = out[-1]["created_at"] if len(out) == limit else None
        return {"deliveries": out, "next_since": next_since}

    @r.post("/v1/deliveries/{delivery_id}/redeliver", status_code=202)
    async def redeliver(delivery_id: str, authorization: str | None = Header(None)):
        """Send this delivery again now (whatever its status), with a fresh retry horizon. The body and
        event id are the same as before: receivers de-duplicate on the event id."""
        channel = channels.authenticate(authorization)
        return JSONResponse(status_code=202, content=await log.redeliver(channel.channel_id, delivery_id))

    return r
