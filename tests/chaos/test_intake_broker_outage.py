"""The front doors while the broker restarts: a quick coded 503, then one stamp for one key.

Found by the deadline-day report (``loadtests/deadline_day.py``): with the broker restarting, stamp
intake held every request until Kafka's own timeout (30 s), the client's budget ran out first and
the requests in flight piled up behind it. Intake now waits ``BUBUH_INTAKE_PUBLISH_TIMEOUT_S`` for
the acknowledgement and answers ``503 UNAVAILABLE`` with ``Retry-After``; a channel that sends the
same ``Idempotency-Key`` again (docs/channels.md) gets one request, one stamp, one charge.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import httpx
import pytest

from loadtests import corpus
from tests import stack
from tests.flows import (
    Db,
    auth,
    buy,
    order_body,
    post_stamp,
    post_until_accepted,
    stamp_finished,
    stamp_meta,
    wait_for,
)
from tests.platform import PlatformProcess, add_channel

BUDGET_S = 2.0


@pytest.mark.slow
async def test_a_broker_restart_costs_intake_a_quick_503_and_a_retry_with_the_same_key_is_one_stamp(
        settings, tmp_path):
    if not stack.managed_kafka():
        pytest.skip("needs the local stack's Kafka scripts and jars")
    broker = stack.OwnKafka(tmp_path)          # a broker of its own: stopping it stops no other test
    await asyncio.to_thread(broker.start)
    own = broker.settings(settings, as_admin=True)
    platform = PlatformProcess(own, BUBUH_INTAKE_PUBLISH_TIMEOUT_S=str(BUDGET_S))
    try:
        await platform.start(timeout=120)
        channel = add_channel(own)
        db = Db(own)
        pdf, meta = corpus.a4_text(3), stamp_meta("outage")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{own.http_port}", timeout=60) as api:
            await buy(api, channel, "outage", 2)
            first = await post_stamp(api, channel, pdf, meta, idempotency_key="before-the-outage")
            assert first.status_code == 202, first.text
            assert (await stamp_finished(api, channel, first.json()["request_id"]))["status"] == "completed"

            before = broker.pid()
            await asyncio.to_thread(broker.stop)
            assert not stack.port_open(broker.port), "the broker still listens: the fault did not happen"

            started = time.perf_counter()
            refused = await post_stamp(api, channel, pdf, meta, idempotency_key="during-the-outage")
            took = time.perf_counter() - started
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "UNAVAILABLE"
            assert int(refused.headers["Retry-After"]) >= 1
            # the budget, plus the upload's own checks on a shared box; not Kafka's 30 s
            assert took < BUDGET_S + 4, f"intake held the request {took:.1f} s with the broker away"
            # not accepted, so not shown as queued either (a row left 'queued' stayed in the queue depth,
            # the oldest-open-request age and every position behind it, forever)
            assert await db.val("stamping", "SELECT count(*) FROM requests WHERE idempotency_key = $1",
                                "during-the-outage") == 0

            # Kafka is known away now: the next requests are turned away at once, before anything is
            # stored (one a second still tries, and waits the budget), each told when to come back
            quick = []
            for i in range(5):
                started = time.perf_counter()
                r = await post_stamp(api, channel, pdf, meta, idempotency_key=f"while-away-{i}")
                quick.append((r.status_code, round(time.perf_counter() - started, 2), r.headers.get("Retry-After")))
            assert {s for s, _, _ in quick} == {503}, quick
            assert all(wait and 1 <= int(wait) <= 30 for _, _, wait in quick), quick
            assert sum(took < 1.0 for _, took, _ in quick) >= 4, f"intake still waited for Kafka each time: {quick}"
            assert await db.val("stamping", "SELECT count(*) FROM requests WHERE idempotency_key LIKE $1",
                                "while-away-%") == 0

            started = time.perf_counter()
            order = order_body(1, "outage")
            purchase = await api.post("/v1/purchases", json=order, headers=auth(channel))
            took = time.perf_counter() - started
            assert purchase.status_code == 503 and purchase.json()["code"] == "UNAVAILABLE", purchase.text
            assert took < BUDGET_S + 4, f"purchase intake held the request {took:.1f} s with the broker away"

            await asyncio.to_thread(broker.start)
            assert broker.pid() != before, "the broker was not restarted"
            deadline = time.monotonic() + 120
            while True:                            # the channel's retry: same key, after Retry-After
                again = await post_stamp(api, channel, pdf, meta, idempotency_key="during-the-outage")
                if again.status_code == 202 or time.monotonic() > deadline:
                    break
                assert again.status_code == 503, again.text
                await asyncio.sleep(int(again.headers.get("Retry-After", "1")))
            assert again.status_code == 202, again.text
            done = await stamp_finished(api, channel, again.json()["request_id"], timeout=120)
            assert done["status"] == "completed", done

            # the purchase sent again, as docs/channels.md says after a 503: the same order, one credit
            assert (await post_until_accepted(api, channel, order, timeout=60)).status_code == 202

            replay = await post_stamp(api, channel, pdf, meta, idempotency_key="during-the-outage")
            assert replay.status_code == 202 and replay.json()["request_id"] == done["request_id"]

            async def charged() -> dict:
                return (await api.get("/v1/accounts/outage/quota", headers=auth(channel))).json()
            async def settled() -> dict | None:
                q = await charged()
                return q if q["credited"] >= 3 and q["committed"] >= 2 and q["pending"] == 0 else None
            quota = await wait_for(settled, timeout=60, what="the credit and both charges")
            await asyncio.sleep(3)                 # a second copy of the event would be charged by now
            assert await charged() == quota
            # two units bought before, one during the outage (credited once whatever became of its 503);
            # two stamps charged: the one before and the one sent twice with the same key
            assert (quota["credited"], quota["committed"], quota["available"]) == (3, 2, 1), quota
    finally:
        await platform.stop()
        await asyncio.to_thread(broker.stop)


@pytest.mark.shared_platform       # this and the next: one platform, a channel each
async def test_a_retry_after_a_503_whose_event_reached_the_broker_anyway_is_the_same_request(
        platform, api, channel, settings):
    """The 503 removed the request's row, but the event got out of the producer's buffer after all and
    the stamping tier wrote the row again, without the intake's fingerprint (found by the deadline day:
    one retry in 13,152 was refused IDEMPOTENCY_MISMATCH, and 62 sent again afterwards). The retry with
    the same key and the same document is that request, not a mismatch."""
    from services.contracts.bubuh.v1 import stamp_pb2
    from services.kernel import events, topics
    from services.kernel.producer import Producer
    from services.stamping.http_intake import _NS

    key, pdf = "late-event", corpus.a4_text(3)
    request_id = str(uuid.uuid5(_NS, f"{channel['channel_id']}\x1f{key}"))
    msg = stamp_pb2.StampRequested(request_id=request_id, channel_id=channel["channel_id"], account_id="late",
                                   document_sha256=hashlib.sha256(pdf).hexdigest())
    producer = Producer(settings, client_id="late-event")
    await producer.start()
    try:          # the event as intake published it; no quota was bought, so the request ends refused
        await producer.publish(events.outgoing(settings.topic(topics.STAMP_REQUESTED.name), request_id,
                                               events.envelope(msg, producer="stamping")))
    finally:
        await producer.stop()
    db = Db(settings)

    async def written() -> str | None:
        return await db.val("stamping", "SELECT status FROM requests WHERE request_id = $1 "
                                        "AND idempotency_fingerprint IS NULL", request_id)
    status = await wait_for(written, timeout=60, what="the stamping tier's row")
    r = await post_stamp(api, channel, pdf, stamp_meta("late"), idempotency_key=key)
    assert r.status_code == 202, r.text
    assert (r.json()["request_id"], r.json()["status"]) == (request_id, status)


@pytest.mark.shared_platform
async def test_a_row_without_fingerprint_still_tells_another_document_from_the_same(platform, api, channel,
                                                                                    settings):
    """When the row the pipeline wrote has no fingerprint and no document hash (a request refused at the
    quota tier is written from the quota's event), the key's first attempt is still on record: the
    ``StampRequested`` intake stored beside the document before publishing. A retry is the same request
    only when it asks what that record says; another document under the key is IDEMPOTENCY_MISMATCH."""
    key, pdf = "refused-then-retried", corpus.a4_text(4)
    first = await post_stamp(api, channel, pdf, stamp_meta("no-quota"), idempotency_key=key)
    assert first.status_code == 202, first.text
    request_id = first.json()["request_id"]
    db = Db(settings)
    await wait_for(lambda: db.val("stamping", "SELECT status FROM requests WHERE request_id = $1 AND "
                                              "status = 'failed'", request_id), timeout=60, what="refused at quota")
    # the row as the pipeline writes it after the intake's 503 removed the intake's own
    assert await db.val("stamping", "UPDATE requests SET idempotency_fingerprint = NULL, document_sha256 = '' "
                                    "WHERE request_id = $1 RETURNING request_id", request_id) == request_id
    same = await post_stamp(api, channel, pdf, stamp_meta("no-quota"), idempotency_key=key)
    assert same.status_code == 202, same.text
    assert (same.json()["request_id"], same.json()["status"]) == (request_id, "failed")
    other = await post_stamp(api, channel, corpus.a4_text(5), stamp_meta("no-quota"), idempotency_key=key)
    assert other.status_code == 409 and other.json()["code"] == "IDEMPOTENCY_MISMATCH", other.text
    moved = await post_stamp(api, channel, pdf, stamp_meta("no-quota", page=1, llx=10), idempotency_key=key)
    assert moved.status_code == 409 and moved.json()["code"] == "IDEMPOTENCY_MISMATCH", moved.text
