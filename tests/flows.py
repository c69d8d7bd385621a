"""Small steps the purchase and quota tests share: orders, signed Kafka submissions, waits."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time

import asyncpg
import httpx

from services.kernel.settings import Settings
from services.purchase.intake import submitted_record
from services.purchase.validation import PurchaseOrder


def order_body(quantity: int = 1, account: str = "acct-1", order_id: str | None = None, **over) -> dict:
    body = {"channel_order_id": order_id or f"o-{secrets.token_hex(6)}", "account_id": account,
            "quantity": quantity, "amount": quantity * 10_000,
            "paid_at": (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).isoformat(),
            "payment_ref": "VA-1"}
    body.update(over)
    return body


def auth(channel: dict) -> dict:
    return {"Authorization": f"Bearer {channel['api_key']}"}


def kafka_submission(settings: Settings, channel: dict, body: dict, secret: str | None = None):
    """A purchase as a channel publishes it straight to Kafka, signed with its HMAC secret."""
    order = PurchaseOrder(channel_id=channel["channel_id"], channel_order_id=body["channel_order_id"],
                          account_id=body["account_id"], quantity=body["quantity"], amount=body["amount"],
                          paid_at=dt.datetime.fromisoformat(body["paid_at"]), payment_ref=body["payment_ref"])
    return submitted_record(settings, order, (secret or channel["hmac_secret"]).encode(),
                            producer=f"channel:{channel['channel_id']}", event_id=None)


async def post_until_accepted(api: httpx.AsyncClient, channel: dict, body: dict, timeout: float = 20) -> httpx.Response:
    """POST, retrying 401 (a brand-new channel takes a moment to reach the view) and 503."""
    deadline = time.monotonic() + timeout
    while True:
        r = await api.post("/v1/purchases", json=body, headers=auth(channel))
        if r.status_code not in (401, 503) or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.2)


async def wait_for(predicate, timeout: float = 30, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class Db:
    """Direct reads of a service's schema, for assertions only."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def fetch(self, service: str, sql: str, *args):
        conn = await asyncpg.connect(self.settings.database_url,
                                     server_settings={"search_path": self.settings.schema(service)})
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def val(self, service: str, sql: str, *args):
        rows = await self.fetch(service, sql, *args)
        return rows[0][0] if rows else None
