"""The quota service, top-down.

Consumes: ``purchase.events`` (PurchaseConfirmed -> credit), ``stamp.requested`` (reserve),
          ``stamp.events`` (StampSigned -> commit, StampFailed -> release; StampCompleted follows a
          commit and changes nothing).
Publishes: ``quota.events`` (QuotaCredited, QuotaReserved, QuotaRejected, QuotaCommitted,
           QuotaReleased, QuotaRefused), ``quota.dead-letter``.
Stores:   schema ``quota``: ``accounts``, ``transfers``, ``open_reservations``, inbox, outbox.
Timers:   the expiry sweep voids reservations past their deadline (in one member of the tier at a time:
          kernel/leadership.py); the pending-units gauge.
HTTP:     ``GET /v1/accounts/{account_id}/quota``.
"""

from __future__ import annotations

import functools

from fastapi import APIRouter

from services.kernel import topics
from services.kernel.leadership import Leadership
from services.kernel.outbox import Relay
from services.kernel.processing.pipeline import ConsumerLoop
from services.kernel.runtime import Runtime, Task
from services.quota import NAME, api, ledger
from services.quota.ledger_consumer import CONSUMER, QuotaHandlers
from services.quota.reservations import ReservationGauges


async def router(rt: Runtime) -> APIRouter:
    return api.router(rt.channels, ledger.Accounts(await rt.pool(NAME)))


async def workers(rt: Runtime) -> list[Task]:
    s = rt.settings
    pool = await rt.pool(NAME)
    handlers = QuotaHandlers(pool, s)
    loop = ConsumerLoop(s, rt.producer, name=CONSUMER,
                        # a poll is one batch, in this order: credits and stamp outcomes (which free
                        # units) before the new reservations that may need them
                        topics=[s.topic(t.name) for t in (topics.PURCHASE_EVENTS, topics.STAMP_EVENTS,
                                                          topics.STAMP_REQUESTED)],
                        handler=handlers.handler(), pool=pool,
                        dead_letter_topic=s.topic(topics.QUOTA_DLQ.name))
    relay = Relay(pool, rt.producer, s, NAME)
    # one sweeper per tier: two members' sweeps found the same due reservations and locked the same
    # accounts, one waiting for the other's transaction to find them voided
    sweep = Leadership(s, f"quota expiry sweep {s.schema(NAME)}")
    return [loop.run, relay.run, functools.partial(sweep.lead, work=handlers.run_expiry),
            ReservationGauges(pool).run]
