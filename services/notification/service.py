"""The notification service, top-down.

Consumes: ``quota.events`` (QuotaCredited, QuotaRejected), ``purchase.events`` (PurchaseRejected),
          ``stamp.events`` (StampCompleted, StampFailed), in one consumer ``notification.intake``.
Publishes: ``notification.dead-letter`` (DeliveryAbandoned), through its outbox.
Stores:    schema ``notification``: ``deliveries`` + ``delivery_attempts`` (webhooks), ``emails``,
           inbox, outbox. The tables are the durable schedule: a row is due at ``next_attempt_at``.
Workers:   the intake consumer (events -> rows, never HTTP), the due-time table worker twice (one
           with the webhook sender, one with the email sender), a LISTEN connection that wakes
           both, the outbox relay, the gauges.
HTTP:      ``GET /v1/deliveries``, ``POST /v1/deliveries/{id}/redeliver``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from services.kernel import topics
from services.kernel.listener import Listener
from services.kernel.outbox import Relay
from services.kernel.processing.handler import Transactional
from services.kernel.processing.pipeline import ConsumerLoop
from services.kernel.runtime import ConfigError, Runtime, Task
from services.kernel.settings import Settings
from services.kernel.waiting import wait_or_stop
from services.notification import NAME, api, payloads, templates
from services.notification.deliveries import DeliveryLog
from services.notification.due_work import DueWorker
from services.notification.email_sender import EmailSender
from services.notification.event_intake import CONSUMER, Intake, wake_channel
from services.notification.housekeeping import Housekeeping
from services.notification.webhook_sender import WebhookSender


def check(s: Settings, *, worker: bool) -> None:
    """The settings this service refuses, said before the process connects to anything."""
    if worker:
        if s.email_locale not in templates.LOCALES:
            raise ConfigError(f"BUBUH_EMAIL_LOCALE={s.email_locale!r}: choose from {', '.join(templates.LOCALES)}")
        EmailSender.check(s)
        WebhookSender.check(s)


async def router(rt: Runtime) -> APIRouter:
    return api.router(rt.channels, DeliveryLog(rt.settings, await rt.pool(NAME)))


async def workers(rt: Runtime) -> list[Task]:
    s = rt.settings
    check(s, worker=True)
    pool = await rt.pool(NAME)
    wakeup = Listener(s, wake_channel(s))      # new work committed: wakes both workers at once
    webhooks = DueWorker(pool, s, WebhookSender(rt.channels, s), wakeup.subscribe())
    emails = DueWorker(pool, s, EmailSender(s), wakeup.subscribe())
    intake = Intake(pool, rt.channels, s)
    loop = ConsumerLoop(s, rt.producer, name=CONSUMER,
                        topics=[s.topic(t.name) for t in (topics.QUOTA_EVENTS, topics.PURCHASE_EVENTS,
                                                          topics.STAMP_EVENTS)],
                        handler=Transactional(pool, CONSUMER, intake.apply, payloads.TYPES), pool=pool,
                        dead_letter_topic=s.topic(topics.NOTIFICATION_DLQ.name))

    async def consume(stop: asyncio.Event) -> None:
        # the webhook URL comes from the channel view: read it whole before the first event
        if await wait_or_stop(rt.channels.loaded, stop):
            await loop.run(stop)

    async def dispatch(stop: asyncio.Event) -> None:
        # signing needs the channel secrets from the view
        if await wait_or_stop(rt.channels.loaded, stop):
            await webhooks.run(stop)

    relay = Relay(pool, rt.producer, s, NAME)
    return [consume, dispatch, emails.run, wakeup.run, relay.run, Housekeeping(pool, s, channels=rt.channels).run]
