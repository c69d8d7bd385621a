"""Dead-letter entries of the notification service: ``DeliveryAbandoned`` on ``notification.dead-letter``.

Written to the outbox in the transaction that marks the delivery (or email) dead, so the entry is
published at least once and with a derived id (a replay publishes the same id). Its ``code`` is
catalogued (the last attempt's, or ``DELIVERY_EXPIRED``) and also stands in the ``bubuh-dlq-reason``
header, as on every other dead-letter entry. It names no source topic: ``bubuh replay`` settles it
with ``Redelivery`` instead, which makes the webhook delivery (or e-mail) due again now, with a fresh
horizon and the same body and event id.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from services.contracts.bubuh.v1 import notification_pb2
from services.kernel import database, events, listener, logs, outbox, topics
from services.kernel.errors import ErrorCode
from services.kernel.processing.deadletter import DLQ_DETAIL, DLQ_REASON
from services.kernel.settings import Settings
from services.notification import NAME
from services.notification.event_intake import wake_channel

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


log = logs.get(__name__)


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
            for table, key, horizon in (("deliveries", "delivery_id", self._s.webhook_horizon_s),
                                        ("emails", "email_id", self._s.email_horizon_s)):
                found = await conn.fetchval(
                    f"UPDATE {table} SET status = 'pending', next_attempt_at = now(), attempts = 0, "
                    "horizon_at = now() + make_interval(secs => $2), leased_until = NULL, lease_token = NULL "
                    f"WHERE {key} = $1 AND status = 'dead' RETURNING {key}", msg.delivery_id, horizon)
                if found is not None:
                    break
            if found is None:
                return False
            if dry_run:
                raise _DryRun        # rolls the change back: a dry run only says what it would do
            await listener.notify(conn, wake_channel(self._s))
        log.info("abandoned delivery due again", delivery_id=msg.delivery_id, channel_id=msg.channel_id,
                 event_type=msg.event_type)
        return True


class _DryRun(Exception):
    pass
