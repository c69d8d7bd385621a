"""Dead-letter entries of the notification service: ``DeliveryAbandoned`` on ``notification.dead-letter``.

Written to the outbox in the transaction that marks the delivery (or email) dead, so the entry is
published at least once and with a derived id (a replay publishes the same id). Its ``code`` is
catalogued (the last attempt's, or ``DELIVERY_EXPIRED``) and also stands in the ``bubuh-dlq-reason``
header, as on every other dead-letter entry. It names no source topic: ``bubuh replay`` settles it
with ``deliveries.Redelivery`` instead, which makes the webhook delivery (or e-mail) due again now,
with a fresh horizon and the same body and event id.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from services.contracts.bubuh.v1 import notification_pb2
from services.kernel import events, outbox, topics
from services.kernel.errors import ErrorCode
from services.kernel.processing.deadletter import DLQ_DETAIL, DLQ_REASON
from services.kernel.settings import Settings
from services.notification import NAME

_NS = uuid.UUID("a3c1f5e2-0d7b-4d59-8f0e-6b2c9e4d1a77")


def abandoned_event_id(delivery_id: str, horizon_at: dt.datetime) -> str:
    # one entry per delivery and horizon: a delivery redelivered through the API and abandoned
    # again gets a new entry, a crash-and-replay of the same abandonment the same one
    return str(uuid.uuid5(_NS, f"{delivery_id}\x1f{horizon_at.isoformat()}"))


async def abandon(conn: asyncpg.Connection, settings: Settings, code: ErrorCode, *, delivery_id: str, channel_id: str,
                  event_id: str, event_type: str, url: str, attempts: int, last_error: str,
                  first_attempt_at: dt.datetime | None, last_attempt_at: dt.datetime | None,
                  horizon_at: dt.datetime) -> None:
    msg = notification_pb2.DeliveryAbandoned(delivery_id=delivery_id, channel_id=channel_id, event_id=event_id,
                                             event_type=event_type, url=url, attempts=attempts,
                                             last_error=last_error or "", code=code.code)
    if first_attempt_at is not None:
        msg.first_attempt_at.FromDatetime(first_attempt_at)
    if last_attempt_at is not None:
        msg.last_attempt_at.FromDatetime(last_attempt_at)
    env = events.envelope(msg, producer=NAME, causation_id=event_id,
                          event_id=abandoned_event_id(delivery_id, horizon_at))
    reason = [(DLQ_REASON, code.code.encode()), (DLQ_DETAIL, (last_error or "")[:2000].encode())]
    await outbox.add(conn, [events.outgoing(settings.topic(topics.NOTIFICATION_DLQ.name), channel_id, env,
                                            extra_headers=reason)])

