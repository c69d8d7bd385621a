"""The topic catalogue: every topic, its owner, its key and its partitions, in one place.

``docs/topics.md`` is generated from this table (``bubuh topics --markdown``). Topics are created
from it at start-up (``ensure``), so a new environment needs no manual step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from services.kernel import kafka_auth
from services.kernel.settings import Settings


@dataclass(frozen=True)
class Topic:
    name: str
    owner: str            # the only service that writes it (channels may write purchase.submitted)
    key: str
    events: str
    partitions: int | None = None   # None: settings.default_partitions
    compacted: bool = False


CHANNEL = Topic("channel", "purchase", "channel id", "Channel (compacted: latest state per channel)", 1, True)
PURCHASE_SUBMITTED = Topic("purchase.submitted", "channels, purchase (HTTP intake)", "account",
                           "PurchaseSubmitted")
PURCHASE_EVENTS = Topic("purchase.events", "purchase", "account", "PurchaseConfirmed, PurchaseRejected")
PURCHASE_DLQ = Topic("purchase.dead-letter", "purchase", "as the source record",
                     "rejected records of purchase.submitted (forged, malformed) with bubuh-dlq-* headers")
STAMP_REQUESTED = Topic("stamp.requested", "stamping (intake)", "request id", "StampRequested")
QUOTA_EVENTS = Topic("quota.events", "quota", "account",
                     "QuotaCredited, QuotaReserved, QuotaRejected, QuotaCommitted, QuotaReleased, QuotaRefused")
QUOTA_DLQ = Topic("quota.dead-letter", "quota", "as the source record", "records quota could not apply")
STAMP_EVENTS = Topic("stamp.events", "stamping (worker)", "request id", "StampCompleted, StampFailed")
STAMP_RETRY = Topic("stamp.retry", "stamping (worker)", "request id",
                    "QuotaReserved re-sent at its due time after a transient failure")
STAMP_DLQ = Topic("stamp.dead-letter", "stamping", "request id", "stamp requests that exhausted their retries")
NOTIFICATION_DLQ = Topic("notification.dead-letter", "notification", "channel id", "DeliveryAbandoned")

ALL: tuple[Topic, ...] = (CHANNEL, PURCHASE_SUBMITTED, PURCHASE_EVENTS, PURCHASE_DLQ, STAMP_REQUESTED,
                          QUOTA_EVENTS, QUOTA_DLQ, STAMP_EVENTS, STAMP_RETRY, STAMP_DLQ, NOTIFICATION_DLQ)


def markdown(settings: Settings) -> str:
    rows = ["| topic | written by | key | events | partitions |", "|---|---|---|---|---|"]
    for t in ALL:
        parts = t.partitions or settings.default_partitions
        compacted = " (compacted)" if t.compacted else ""
        rows.append(f"| `{t.name}` | {t.owner} | {t.key} | {t.events} | {parts}{compacted} |")
    return "\n".join(rows) + "\n"


async def ensure(settings: Settings, topics: tuple[Topic, ...] = ALL, *, as_admin: bool = False) -> None:
    """Create missing topics (idempotent; concurrent callers are fine).

    On a secured broker only the admin principal (``as_admin=True``, as ``bubuh kafka setup`` runs it) may
    create the catalogue's topics; a service finding them all present creates nothing.
    """
    admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(settings, admin=as_admin),
                                request_timeout_ms=settings.kafka_request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = []
        for t in topics:
            name = settings.topic(t.name)
            if name in existing:
                continue
            configs = {"cleanup.policy": "compact"} if t.compacted else {}
            new.append(NewTopic(name=name, num_partitions=t.partitions or settings.default_partitions,
                                replication_factor=settings.replication_factor, topic_configs=configs))
        if new:
            try:
                response = await admin.create_topics(new)
            except TopicAlreadyExistsError:
                return
            # aiokafka hands back per-topic errors instead of raising them
            for name, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    error = for_code(code)
                    raise error(f"cannot create topic {name}: {error.__name__} (topics are created by the "
                                "admin principal: run `bubuh kafka setup`)")
            # the controller has them; a consumer started now must find them in the broker's metadata too,
            # or it waits a whole metadata_max_age for the next look
            wanted = {t.name for t in new}
            for _ in range(100):
                if wanted <= set(await admin.list_topics()):
                    break
                await asyncio.sleep(0.05)
    finally:
        await admin.close()
