"""The notification service against a real HTTP receiver and a real SMTP server (issue 5's acceptance).

Events are real: published to Kafka as the other services publish them, or caused by a purchase
through the platform. The service runs as a subprocess, as in production.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import httpx

from services.kernel import events, topics
from tests.flows import Db, auth, decoded, order_body, post_until_accepted, read_topic, wait_for
from tests.integration.test_notification_support import (
    Receiver,
    SmtpSink,
    hang_forever,
    openssl_hmac_hex,
    publish,
    purchase_rejected,
    quota_rejected,
    stamp_completed,
    stamp_failed,
)
from tests.platform import PlatformProcess, add_channel, cli


def _client(settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30)


async def _deliveries(api: httpx.AsyncClient, channel: dict, **params) -> list[dict]:
    r = await api.get("/v1/deliveries", params=params, headers=auth(channel))
    assert r.status_code == 200, r.text
    return r.json()["deliveries"]


def _at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_three_failures_then_success_is_one_delivery_with_growing_gaps(settings):
    receiver = await Receiver(lambda hit: 500 if hit.index < 3 else 200).start()
    channel = add_channel(settings, "flaky", webhook=receiver.url)
    other = add_channel(settings, "other")
    proc = await PlatformProcess(settings, api="notification", workers="notification",
                                 BUBUH_WEBHOOK_BACKOFF_BASE_S=0.2).start()
    try:
        record = stamp_completed(settings, channel["channel_id"])
        await publish(settings, [record])
        async with _client(settings) as api:
            async def delivered():
                found = await _deliveries(api, channel, event_id=record.event_id)
                return found and found[0]["status"] == "delivered" and found[0]
            delivery = await wait_for(delivered, timeout=20, what="the delivery after three failures")
            await asyncio.sleep(1.0)                  # nothing more may arrive after the success

            assert [h.status for h in receiver.hits] == [500, 500, 500, 200]
            assert len(receiver.ok()) == 1
            assert {h.event_id for h in receiver.hits} == {record.event_id}
            assert {h.json["id"] for h in receiver.hits} == {record.event_id}
            assert [h.headers["bubuh-attempt"] for h in receiver.hits] == ["1", "2", "3", "4"]

            log = delivery["log"]
            assert [a["status_code"] for a in log] == [500, 500, 500, 200]
            assert [a["outcome"] for a in log] == ["failed", "failed", "failed", "delivered"]
            assert delivery["attempts"] == 4 and log[0]["error"].startswith("WEBHOOK_REJECTED: HTTP 500")
            times = [_at(a["at"]) for a in log]
            ends = [t + dt.timedelta(milliseconds=a["duration_ms"]) for t, a in zip(times, log, strict=True)]
            # the wait between the end of one attempt and the start of the next
            gaps = [(start - end).total_seconds() for end, start in zip(ends, times[1:], strict=False)]
            # the backoff each failure scheduled: base 0.2 s, factor 2, equal jitter ([half, whole])
            delays = [a["retry_in_ms"] / 1000 for a in log[:3]]
            assert log[3]["retry_in_ms"] is None
            for n, delay in enumerate(delays):
                assert 0.2 * 2 ** n / 2 <= delay <= 0.2 * 2 ** n, delays
            assert delays[0] < delays[2], delays           # exponential: the jitter ranges do not overlap
            # the next attempt never comes early; it may come late when the box stalls, not by seconds
            for gap, delay in zip(gaps, delays, strict=True):
                assert delay - 0.02 <= gap < delay + 3.0, (gaps, delays)

            # a channel sees only its own deliveries, and cannot redeliver someone else's
            assert await _deliveries(api, other, event_id=record.event_id) == []
            r = await api.post(f"/v1/deliveries/{delivery['delivery_id']}/redeliver", headers=auth(other))
            assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
            r = await api.get("/v1/deliveries", headers=auth(channel))
            assert r.status_code == 422 and r.json()["code"] == "QUERY_INVALID"
            assert (await api.get("/v1/deliveries", params={"event_id": record.event_id})).status_code == 401

            # redeliver: the same event (same id and body) once more, due at once
            r = await api.post(f"/v1/deliveries/{delivery['delivery_id']}/redeliver", headers=auth(channel))
            assert r.status_code == 202 and r.json()["status"] == "pending"
            await wait_for(lambda: _async(len(receiver.hits) == 5), timeout=10, what="the redelivery")
            assert receiver.hits[4].body == receiver.hits[3].body and receiver.hits[4].status == 200
            since = (times[0] - dt.timedelta(seconds=1)).isoformat()
            listed = await _deliveries(api, channel, since=since)
            assert [d["event_id"] for d in listed] == [record.event_id]
    finally:
        await proc.stop()
        await receiver.stop()


async def _async(value):
    return value


async def test_a_hanging_endpoint_never_delays_a_healthy_one(settings):
    """More events for a hanging endpoint than the whole pool has slots; 100 for a healthy endpoint
    are all delivered, each within 5 s of being published."""
    hanging = await Receiver(hang_forever).start()
    healthy = await Receiver().start()
    stuck = add_channel(settings, "stuck", webhook=hanging.url)
    fine = add_channel(settings, "fine", webhook=healthy.url)
    pool, per_endpoint = 8, 4
    # a 20 s request timeout: no hanging request is given up (and its slot reused) while the test runs
    proc = await PlatformProcess(settings, api="none", workers="notification", BUBUH_WEBHOOK_CONCURRENCY=pool,
                                 BUBUH_WEBHOOK_PER_ENDPOINT=per_endpoint, BUBUH_WEBHOOK_TIMEOUT_S=20,
                                 BUBUH_WEBHOOK_LEASE_S=30).start()
    try:
        await publish(settings, [stamp_completed(settings, stuck["channel_id"]) for _ in range(3 * pool)])
        await wait_for(lambda: _async(hanging.open_now == per_endpoint), timeout=15,
                       what="the hanging endpoint holding its slots")
        records = [stamp_completed(settings, fine["channel_id"]) for _ in range(100)]
        sent = await publish(settings, records)
        await wait_for(lambda: _async(len({h.event_id for h in healthy.ok()}) == 100), timeout=15,
                       what="100 deliveries to the healthy endpoint")
        first_arrival: dict[str, float] = {}
        for h in healthy.ok():
            first_arrival.setdefault(h.event_id, h.at)
        assert set(first_arrival) == set(sent)
        latencies = sorted(first_arrival[e] - sent[e] for e in sent)
        assert latencies[-1] < 5.0, latencies[-5:]
        # the hanging endpoint got no more than its share, however many of its events were due
        assert hanging.max_open == per_endpoint
        assert len(hanging.hits) == per_endpoint
    finally:
        await proc.stop()
        await hanging.stop()
        await healthy.stop()


async def test_signature_verifies_with_openssl_and_every_outcome_is_delivered(settings):
    receiver = await Receiver().start()
    channel = add_channel(settings, "signed", webhook=receiver.url)
    proc = await PlatformProcess(settings, api="none", workers="notification").start()
    try:
        cid = channel["channel_id"]
        records = [stamp_completed(settings, cid), stamp_failed(settings, cid), quota_rejected(settings, cid),
                   purchase_rejected(settings, cid)]
        await publish(settings, records)
        await wait_for(lambda: _async(len(receiver.ok()) == 4), timeout=15, what="four deliveries")
        by_id = {h.event_id: h for h in receiver.hits}
        assert set(by_id) == {r.event_id for r in records}
        for hit in receiver.hits:
            t, _, v1 = hit.headers["bubuh-signature"].partition(",v1=")
            assert t.startswith("t=") and abs(time.time() - int(t[2:])) < 30
            assert v1 == openssl_hmac_hex(channel["hmac_secret"], t[2:].encode() + b"." + hit.body)
            assert hit.headers["content-type"] == "application/json"
            assert hit.json["id"] == hit.event_id and hit.headers["bubuh-event-type"] == hit.json["type"]
        types = {by_id[r.event_id].json["type"] for r in records}
        assert types == {"stamp.completed", "stamp.failed", "quota.rejected", "purchase.rejected"}
        done = by_id[records[0].event_id].json
        env = events.decode(records[0].value)[1]
        assert done["data"] == {"channel_id": cid, "account_id": "acct-1", "request_id": env.request_id,
                                "sn": env.sn, "output_sha256": "ab" * 32}
        assert by_id[records[2].event_id].json["data"]["balance"] == {"credited": 1, "pending": 0, "committed": 1,
                                                                      "available": 0}
        assert _at(done["created_at"]) <= dt.datetime.now(dt.UTC)
    finally:
        await proc.stop()
        await receiver.stop()


async def test_emails_reach_the_buyer_in_indonesian_also_after_the_mail_server_was_down(settings):
    receiver = await Receiver().start()
    channel = add_channel(settings, "shop", webhook=receiver.url)
    smtp = SmtpSink()                      # its port is known; the server itself starts later
    proc = await PlatformProcess(settings, api="purchase,notification", workers="purchase,quota,notification",
                                 BUBUH_SMTP_PORT=smtp.port, BUBUH_EMAIL_BACKOFF_BASE_S=0.2,
                                 BUBUH_EMAIL_SENDER="Bubuh <meterai@bubuh.test>").start()
    db = Db(settings)
    try:
        async with _client(settings) as api:
            body = order_body(quantity=3, account="buyer-1", buyer_email="siti@contoh.co.id")
            assert (await post_until_accepted(api, channel, body)).status_code == 202
        cid = channel["channel_id"]
        done = stamp_completed(settings, cid, email="budi@contoh.co.id", sn="SNTEST000000000000042")
        failed = stamp_failed(settings, cid, email="ani@contoh.co.id")
        silent = stamp_completed(settings, cid)                     # no address: webhook only
        await publish(settings, [done, failed, silent])

        async def retried():
            rows = await db.fetch("notification", "SELECT attempts FROM emails WHERE status = 'pending'")
            return len(rows) == 3 and all(r["attempts"] >= 1 for r in rows)
        await wait_for(retried, timeout=20, what="three emails tried while the mail server is down")
        await asyncio.to_thread(smtp.start)
        await wait_for(lambda: _async(len(smtp.mails) >= 3), timeout=15, what="three emails")
        await asyncio.sleep(0.5)
        assert len(smtp.mails) == 3
        by_rcpt = {m.rcpt_tos[0]: m for m in smtp.mails}
        assert set(by_rcpt) == {"siti@contoh.co.id", "budi@contoh.co.id", "ani@contoh.co.id"}
        for rcpt, m in by_rcpt.items():
            assert m.rcpt_tos == [rcpt] and m.message["To"] == rcpt
            assert m.mail_from == "meterai@bubuh.test" and m.message["Message-ID"]

        credited = by_rcpt["siti@contoh.co.id"]
        assert credited.message["Subject"] == "Kuota e-Meterai Anda telah ditambahkan"
        assert "3 e-Meterai telah ditambahkan ke akun buyer-1" in credited.text
        assert "Saldo tersedia sekarang: 3 e-Meterai" in credited.text
        stamped = by_rcpt["budi@contoh.co.id"]
        assert stamped.message["Subject"] == "Dokumen Anda telah dibubuhi e-Meterai"
        assert "SNTEST000000000000042" in stamped.text
        assert stamped.message["X-Bubuh-Event-Id"] == done.event_id
        refused = by_rcpt["ani@contoh.co.id"]
        assert refused.message["Subject"] == "Pembubuhan e-Meterai gagal"
        assert "PDF_ENCRYPTED" in refused.text and "Kuota Anda tidak terpakai" in refused.text

        sent = await db.fetch("notification", "SELECT status, attempts FROM emails")
        assert [r["status"] for r in sent] == ["sent"] * 3 and all(r["attempts"] >= 2 for r in sent)
        # the channel heard of all four outcomes too (credited + three stamp events)
        await wait_for(lambda: _async(len(receiver.ok()) == 4), timeout=10, what="four webhooks")
    finally:
        await proc.stop()
        await asyncio.to_thread(smtp.stop)
        await receiver.stop()


async def test_after_the_horizon_a_delivery_is_dead_lettered(settings):
    receiver = await Receiver(lambda hit: 503).start()
    channel = add_channel(settings, "down", webhook=receiver.url)
    # a short circuit cool-down: the replayed delivery goes out once the endpoint's circuit half-opens
    proc = await PlatformProcess(settings, api="none", workers="notification", BUBUH_WEBHOOK_BACKOFF_BASE_S=0.1,
                                 BUBUH_WEBHOOK_HORIZON_S=1.5, BUBUH_WEBHOOK_BREAKER_COOLDOWN_S=1.0).start()
    db = Db(settings)
    try:
        record = stamp_completed(settings, channel["channel_id"])
        await publish(settings, [record])
        dead = await read_topic(settings, topics.NOTIFICATION_DLQ.name, at_least=1, timeout=20)
        abandoned = decoded(dead)
        assert len(abandoned) == 1
        entry = abandoned[0]
        assert (entry.event_id, entry.channel_id, entry.url) == (record.event_id, channel["channel_id"], receiver.url)
        assert entry.event_type == "stamp.completed" and entry.last_error.startswith("WEBHOOK_REJECTED: HTTP 503")
        assert entry.code == "WEBHOOK_REJECTED"
        assert entry.attempts == len(receiver.hits) >= 3
        assert entry.first_attempt_at.ToDatetime() < entry.last_attempt_at.ToDatetime()
        row = (await db.fetch("notification", "SELECT status, attempts FROM deliveries"))[0]
        assert (row["status"], row["attempts"]) == ("dead", entry.attempts)
        attempts_logged = await db.val("notification", "SELECT count(*) FROM delivery_attempts")
        assert attempts_logged == entry.attempts
        await asyncio.sleep(1.0)
        assert len(receiver.hits) == entry.attempts            # nothing after the horizon

        # the endpoint is fixed: `bubuh replay` makes the abandoned delivery due again (a dry run first
        # changes nothing), and the same body and event id arrive
        receiver.respond = lambda hit: 200
        # (in a thread: the receiver answers in this loop meanwhile)
        dry = await asyncio.to_thread(cli, settings, "replay", topics.NOTIFICATION_DLQ.name, "--dry-run")
        assert "1 replayed" in dry.stdout, dry.stdout + dry.stderr
        row = (await db.fetch("notification", "SELECT status FROM deliveries"))[0]
        assert row["status"] == "dead"
        done = await asyncio.to_thread(cli, settings, "replay", topics.NOTIFICATION_DLQ.name)
        assert "1 replayed, 0 skipped" in done.stdout, done.stdout + done.stderr
        await wait_for(lambda: _status_is(db, "delivered"), what="the replayed delivery delivered", timeout=20)
        assert receiver.hits[-1].body == receiver.hits[0].body
        again = await asyncio.to_thread(cli, settings, "replay", topics.NOTIFICATION_DLQ.name, "--from-start",
                                        check=False)
        # delivered now: nothing to redo, and replay says so with its exit code
        assert "0 replayed, 1 skipped" in again.stdout and again.returncode == 1, again.stdout
    finally:
        await proc.stop()
        await receiver.stop()


async def _status_is(db: Db, status: str) -> bool:
    rows = await db.fetch("notification", "SELECT status FROM deliveries")
    return bool(rows) and rows[0]["status"] == status


async def test_a_dead_endpoint_opens_its_circuit_and_stops_getting_requests(settings):
    refused = f"http://127.0.0.1:{_closed_port()}/hook"
    channel = add_channel(settings, "gone", webhook=refused)
    proc = await PlatformProcess(settings, api="notification", workers="notification",
                                 BUBUH_WEBHOOK_BACKOFF_BASE_S=0.05, BUBUH_WEBHOOK_BACKOFF_MAX_S=0.1,
                                 BUBUH_WEBHOOK_BREAKER_FAILURES=3, BUBUH_WEBHOOK_BREAKER_COOLDOWN_S=30).start()
    db = Db(settings)
    try:
        await publish(settings, [stamp_completed(settings, channel["channel_id"]) for _ in range(10)])
        async with _client(settings) as api:
            async def circuit_open():
                text = (await api.get("/metrics")).text
                return 'bubuh_webhook_circuit_state{endpoint="http://127.0.0.1:' in text and any(
                    line.startswith("bubuh_webhook_circuit_state") and line.endswith(" 2.0")
                    for line in text.splitlines())
            await wait_for(circuit_open, timeout=15, what="the circuit to open")

            async def settled():        # requests in flight when it opened are logged after it opened
                return "bubuh_webhook_in_flight_requests 0.0" in (await api.get("/metrics")).text
            await wait_for(settled, timeout=15, what="the in-flight requests to finish")
            attempts = await db.val("notification", "SELECT count(*) FROM delivery_attempts")
            await asyncio.sleep(1.5)        # backoff is 0.1 s at most: without the breaker, dozens more
            assert await db.val("notification", "SELECT count(*) FROM delivery_attempts") == attempts
            assert attempts <= 3 + 4        # the threshold, plus what was in flight when it opened
            errors_ = await db.fetch("notification", "SELECT DISTINCT split_part(error, ':', 1) AS e "
                                                     "FROM delivery_attempts")
            assert [r["e"] for r in errors_] == ["WEBHOOK_UNREACHABLE"]
            assert await db.val("notification", "SELECT count(*) FROM deliveries WHERE status = 'pending'") == 10
    finally:
        await proc.stop()


def _closed_port() -> int:
    from tests.platform import free_port
    return free_port()      # bound and released: nothing listens there
