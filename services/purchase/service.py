"""The purchase service, top-down.

Consumes: ``purchase.submitted`` (channels' Kafka door and our HTTP door).
Publishes: ``purchase.events`` (PurchaseConfirmed, PurchaseRejected), ``channel`` (the registry),
           ``purchase.dead-letter`` (forged or malformed submissions).
Stores:    schema ``purchase``: ``channels``, ``purchases``, inbox, outbox.
HTTP:      ``POST /v1/purchases``, ``GET /v1/purchases/{id}``.
"""

from __future__ import annotations

from fastapi import APIRouter

from services.kernel import topics
from services.kernel.outbox import Relay
from services.kernel.processing.pipeline import ConsumerLoop
from services.kernel.runtime import Runtime, Task
from services.purchase import NAME, api
from services.purchase.confirmation import CHANNEL_FAULTS, CONSUMER, Confirmation
from services.purchase.http_intake import Intake
from services.purchase.registry import Registry


async def router(rt: Runtime) -> APIRouter:
    pool = await rt.pool(NAME)
    return api.router(rt.settings, rt.channels, Intake(rt.settings, rt.producer, rt.channels, pool))


async def workers(rt: Runtime) -> list[Task]:
    s = rt.settings
    pool = await rt.pool(NAME)
    loop = ConsumerLoop(s, rt.producer, name=CONSUMER, topics=[s.topic(topics.PURCHASE_SUBMITTED.name)],
                        handler=Confirmation(pool, Registry(pool, s), s).handler(), pool=pool,
                        dead_letter_topic=s.topic(topics.PURCHASE_DLQ.name),
                        # forged or foreign records are what a hostile channel sends: they must not stop
                        # crediting for every channel, so they do not count toward the dead-letter limit
                        limit_exempt=CHANNEL_FAULTS)
    relay = Relay(pool, rt.producer, s, NAME)
    return [loop.run, relay.run]
