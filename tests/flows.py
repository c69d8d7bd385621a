"""Small steps the purchase and quota tests share: orders, signed Kafka submissions, waits."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time

import asyncpg
import httpx

from services.kernel import kafka_auth
from services.kernel.settings import Settings
from services.purchase.http_intake import submitted_record
from services.purchase.validation import PurchaseOrder


def order_body(quantity: int = 1, account: str = "acct-1", order_id: str | None = None, **over) -> dict:
    body = {"channel_order_id": order_id or f"o-{secrets.token_hex(6)}", "account_id": account,
            "quantity": quantity, "amount": quantity * 10_000,
            "paid_at": (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat(),
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


async def read_topic(settings: Settings, name: str, *, at_least: int = 0, timeout: float = 30,
                     settle: float = 0.5) -> list:
    """Every record of a topic (from the beginning, no consumer group), waiting for ``at_least``."""
    from aiokafka import AIOKafkaConsumer
    consumer = AIOKafkaConsumer(settings.topic(name), **kafka_auth.aiokafka_options(settings),
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    records = []
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got = [r for rs in batch.values() for r in rs]
            records += got
            if got:
                quiet_since = time.monotonic()
            if len(records) >= at_least and time.monotonic() - quiet_since >= settle:
                break
    finally:
        await consumer.stop()
    return records


async def consumers_caught_up(settings: Settings) -> bool:
    """Whether every consumer group of this test has committed every record published so far: a test
    that re-delivers events waits for this instead of sleeping."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(settings))
    probe = AIOKafkaConsumer(**kafka_auth.aiokafka_options(settings), group_id=None)
    await admin.start()
    await probe.start()
    try:
        groups = [g[0] for g in await admin.list_consumer_groups()
                  if settings.topic_prefix and g[0].startswith(settings.topic_prefix)]
        for group in groups:
            committed = {tp: meta.offset for tp, meta in (await admin.list_consumer_group_offsets(group)).items()}
            if not committed:
                return False
            # the broker's own answer: a fresh client's partitions_for_topic() can stay empty for minutes
            described = await admin.describe_topics(sorted({tp.topic for tp in committed}))
            partitions = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
            if not partitions:
                return False
            ends = await probe.end_offsets(partitions)
            if any(committed.get(tp, 0) < end for tp, end in ends.items()):
                return False
        return bool(groups)
    finally:
        await probe.stop()
        await admin.close()


def decoded(records) -> list:
    from services.kernel import events
    out = []
    for r in records:
        try:
            out.append(events.decode(r.value)[1])
        except Exception:  # noqa: BLE001 - poison in a topic under test
            pass
    return out


def stamp_requested(settings: Settings, channel_id: str, account_id: str, request_id: str | None = None):
    """A stamp request as the stamping intake publishes it (the quota tests drive reservations with it)."""
    import uuid

    from services.contracts.bubuh.v1 import stamp_pb2
    from services.kernel import events, topics
    rid = request_id or str(uuid.uuid4())
    msg = stamp_pb2.StampRequested(request_id=rid, channel_id=channel_id, account_id=account_id)
    env = events.envelope(msg, producer="stamping")
    return events.outgoing(settings.topic(topics.STAMP_REQUESTED.name), events.account_key(channel_id, account_id), env)


def stamp_outcome(settings: Settings, channel_id: str, account_id: str, request_id: str, *, completed: bool):
    from services.contracts.bubuh.v1 import stamp_pb2
    from services.kernel import events, topics
    if completed:
        # what a worker publishes once the document is signed: the ledger posts the unit on it
        msg = stamp_pb2.StampSigned(request_id=request_id, channel_id=channel_id, account_id=account_id, sn="X")
    else:
        msg = stamp_pb2.StampFailed(request_id=request_id, channel_id=channel_id, account_id=account_id,
                                    code="PDF_MALFORMED", permanent=True)
    env = events.envelope(msg, producer="stamping")
    return events.outgoing(settings.topic(topics.STAMP_EVENTS.name), request_id, env)


def stamp_meta(account: str = "acct-1", **over) -> dict:
    meta = {"account_id": account, "page": 1, "llx": 400, "lly": 50, "urx": 560, "ury": 210,
            "doc_type": "3", "doc_number": "SP-1", "doc_date": "2024-09-05", "reason": "Surat Pernyataan",
            "location": "Jakarta"}
    meta.update(over)
    return meta


async def post_stamp(api: httpx.AsyncClient, channel: dict, pdf: bytes, meta: dict,
                     idempotency_key: str | None = None) -> httpx.Response:
    import json
    headers = auth(channel) | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})
    return await api.post("/v1/stamps", headers=headers, files={"file": ("doc.pdf", pdf, "application/pdf")},
                          data={"meta": json.dumps(meta)})


async def stamp_finished(api: httpx.AsyncClient, channel: dict, request_id: str, timeout: float = 60) -> dict:
    async def done():
        r = await api.get(f"/v1/stamps/{request_id}", headers=auth(channel))
        return r.json() if r.status_code == 200 and r.json()["status"] in ("completed", "failed") else None
    return await wait_for(done, timeout=timeout, what=f"stamp {request_id} finished")


async def account_quota(api: httpx.AsyncClient, channel: dict, account: str) -> dict | None:
    """The account's quota as its channel reads it, or None while the ledger does not know the account."""
    r = await api.get(f"/v1/accounts/{account}/quota", headers=auth(channel))
    return r.json() if r.status_code == 200 else None


async def credited_quota(api: httpx.AsyncClient, channel: dict, account: str, at_least: int = 1) -> dict | None:
    """The account's quota once at least ``at_least`` units are credited, else None: a new account reads
    empty for a moment before its first credit (docs/channels.md)."""
    q = await account_quota(api, channel, account)
    return q if q and q["credited"] >= at_least else None


async def buy(api: httpx.AsyncClient, channel: dict, account: str, quantity: int) -> None:
    """Credit ``quantity`` units to ``account`` and wait until the ledger shows them."""
    await post_until_accepted(api, channel, order_body(quantity=quantity, account=account))
    await wait_for(lambda: credited_quota(api, channel, account, quantity), what="credit")
