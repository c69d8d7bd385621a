"""Events in, scheduled notifications out: the ``notification.intake`` consumer.

For each event a channel or buyer hears about, the batch's transaction (opened by the pipeline,
whose inbox claims the event ids) writes a ``deliveries`` row (the webhook, due now) and, when the
request carried an address, an ``emails`` row. A NOTIFY at commit wakes the senders. No HTTP
and no SMTP here: a slow endpoint can never hold up a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from urllib.parse import urlsplit

import asyncpg

from services.kernel import database, derived_ids, logs
from services.kernel.channels import ChannelView
from services.kernel.events import Event
from services.kernel.settings import Settings
from services.notification import payloads, templates
from services.notification.metrics import NOTIFICATIONS_RECORDED

log = logs.get(__name__)
CONSUMER = "notification.intake"
_NS = uuid.UUID("5f0c1d0e-6a51-4f4b-9d5e-3a7d8f1e2b90").bytes
UNKNOWN_CHANNEL_WAIT_S = 2.0


def delivery_id(event_id: str) -> str:
    return derived_ids.uuid5(_NS, f"{event_id}\x1fwebhook")


def email_id(event_id: str) -> str:
    return derived_ids.uuid5(_NS, f"{event_id}\x1femail")


def endpoint_of(url: str) -> str:
    """The isolation unit of a URL: ``scheme://host:port`` (no credentials, path or query)."""
    if not url:
        return ""
    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return f"{u.scheme}://{(u.hostname or '').lower()}:{port}"


class Intake:
    def __init__(self, pool: asyncpg.Pool, channels: ChannelView, settings: Settings) -> None:
        self._pool = pool
        self._channels = channels
        self._settings = settings
        self._wake_channel = wake_channel(settings)

    async def apply(self, conn: asyncpg.Connection, batch: list[Event]) -> None:
        """One poll's batch (each partition's records in order), in the pipeline's transaction (the inbox
        has claimed it already)."""
        now = dt.datetime.now(dt.UTC)
        webhook_horizon = now + dt.timedelta(seconds=self._settings.webhook_horizon_s)
        email_horizon = now + dt.timedelta(seconds=self._settings.email_horizon_s)
        deliveries: list[tuple] = []
        emails: list[tuple] = []
        no_webhook = 0
        # one look-up per channel, not per event: an unknown channel waits once per batch, not per record
        urls = {ch: await self._webhook_url(ch) for ch in {e.payload.channel_id for e in batch
                                                             if payloads.kind_of(e.payload) is not None}}
        for event in batch:
            msg = event.payload
            kind = payloads.kind_of(msg)
            if kind is None:
                continue          # other events on these topics are not news for channels or buyers
            channel_id = msg.channel_id
            url, has_webhook = urls[channel_id]
            if has_webhook:
                deliveries.append((delivery_id(event.event_id), channel_id, event.event_id, kind, url,
                                   endpoint_of(url), payloads.webhook_body(event).decode(), now, webhook_horizon))
            else:
                no_webhook += 1
            address = payloads.email_of(msg)
            if address:
                email = templates.render(kind, payloads.data_of(msg), self._settings.email_locale)
                emails.append((email_id(event.event_id), event.event_id, kind, channel_id, address,
                               self._settings.email_locale, email.subject, email.body, now, email_horizon))
        if deliveries:
            await conn.executemany(
                "INSERT INTO deliveries (delivery_id, channel_id, event_id, event_type, url, endpoint, body, "
                "next_attempt_at, horizon_at, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$8) "
                "ON CONFLICT (event_id) DO NOTHING", deliveries)
        if emails:
            await conn.executemany(
                "INSERT INTO emails (email_id, event_id, event_type, channel_id, recipient, locale, subject, "
                "body, next_attempt_at, horizon_at, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$9) "
                "ON CONFLICT (event_id) DO NOTHING", emails)
        if deliveries or emails:
            await database.notify(conn, self._wake_channel)
        for what, n in (("webhook", len(deliveries)), ("no_webhook", no_webhook), ("email", len(emails))):
            if n:
                NOTIFICATIONS_RECORDED.labels(what).inc(n)

    async def _webhook_url(self, channel_id: str) -> tuple[str, bool]:
        """(url, whether to schedule a webhook). An unknown channel gets a row with no URL yet: the
        webhook sender resolves it at each attempt (the channel view may simply be behind)."""
        info = self._channels.get(channel_id)
        if info is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await self._channels.wait_for(channel_id, 1, timeout=UNKNOWN_CHANNEL_WAIT_S)
            info = self._channels.get(channel_id)
        if info is None:
            log.warning("event for a channel this service does not know yet", channel_id=channel_id)
            return "", True
        return info.webhook_url, bool(info.webhook_url)


def wake_channel(settings: Settings) -> str:
    """The NOTIFY channel that wakes the senders when new work is committed."""
    return f"{settings.schema('notification')}_work"
