"""Paid means credited, exactly once, through the database faults production meets (issue 9).

Each test runs one fault for 20 s (``tests/faults.py``) while 200 signed purchases arrive on Kafka
and 200 on HTTP, spread over the window. It asserts, in this order:
1. the fault was real, seen from outside (direct writes failed with 25006; ``pg_cancel_backend``
   hit the platform's backends; connections were refused) and the database is a writable primary again;
2. the platform saw it: its own Prometheus counters on ``/metrics`` (``bubuh_failures_total``,
   ``bubuh_consumer_outage_pauses_total``);
3. the outcome: HTTP never answered 500 (a 503 carries ``Retry-After``, and the client then retries
   the same order, as a channel would); every Kafka-acked record and every HTTP 202 is credited
   exactly once (one credit transfer per purchase, per-account sums), with nothing left in a
   dead-letter topic for an operator to replay.
Everything seen is printed before the first assertion, so a failure shows the whole picture.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.kernel import events, kafka_auth, topics
from services.kernel.producer import Producer
from tests import faults, stack
from tests.flows import Db, auth, kafka_submission, order_body, post_until_accepted, read_topic
from tests.flows import wait_for as wait_until

# each module's own PostgreSQL cluster (tests/stack.py own_postgres): the faults take the whole cluster,
# and on a cluster of their own they leave the shared one, and every other test, alone
pytestmark = [pytest.mark.slow, pytest.mark.own_database]

WINDOW_S = 20
PER_DOOR = 200
ACCOUNTS = 40
SETTLE_TIMEOUT_S = 40        # after the fault: time for the backlog to drain
DLQ_REASON = "bubuh-dlq-reason"   # the dead-letter header with the reason (README: Poison is isolated)


# --- the two doors ----------------------------------------------------------------------------------


class HttpDoor:
    """A channel posting purchases: retries the same order on 503 (after Retry-After), on other 5xx and
    on transport errors, as a channel's client would; counts every answer."""

    def __init__(self, api: httpx.AsyncClient, channel: dict) -> None:
        self.api, self.channel = api, channel
        self.accepted: dict[str, dict] = {}            # purchase id -> body
        self.answers: Counter = Counter()              # status (or transport error) -> count
        self.no_retry_after: list[str] = []            # 503s without Retry-After
        self.errors: list[str] = []                    # first 5xx bodies, for the report
        self.refused: list[tuple[int, str]] = []       # 4xx answers (a bug here: not retried)
        self.gave_up: list[str] = []

    async def submit(self, body: dict, deadline: float) -> None:
        while True:
            try:
                r = await self.api.post("/v1/purchases", json=body, headers=auth(self.channel))
            except httpx.TransportError as exc:
                self.answers[type(exc).__name__] += 1
                r = None
            if r is not None:
                self.answers[r.status_code] += 1
                if r.status_code == 202:
                    self.accepted[r.json()["purchase_id"]] = body
                    return
                if r.status_code < 500 and r.status_code != 401:
                    self.refused.append((r.status_code, r.text[:200]))
                    return
                if r.status_code >= 500 and len(self.errors) < 5:
                    self.errors.append(f"{r.status_code} {r.text[:300]}")
                if r.status_code == 503 and "retry-after" not in r.headers:
                    self.no_retry_after.append(r.text[:200])
            if time.monotonic() > deadline:
                self.gave_up.append(body["channel_order_id"])
                return
            wait = 0.5
            if r is not None and r.status_code == 503:
                try:
                    wait = min(float(r.headers.get("retry-after", "1")), 2.0)
                except ValueError:
                    wait = 1.0
            await asyncio.sleep(wait)


class KafkaDoor:
    """A channel publishing signed ``purchase.submitted`` records (acks=all); retries until acked."""

    def __init__(self, settings, channel: dict, producer: Producer) -> None:
        self.settings, self.channel, self.producer = settings, channel, producer
        self.acked: dict[str, dict] = {}
        self.failures: Counter = Counter()
        self.gave_up: list[str] = []

    async def submit(self, body: dict, deadline: float) -> None:
        record = kafka_submission(self.settings, self.channel, body)
        purchase_id = events.decode(record.value)[1].purchase_id
        while True:
            try:
                await self.producer.publish(record)
                self.acked[purchase_id] = body
                return
            except Exception as exc:  # noqa: BLE001 - counted and retried, as a channel's producer would
                self.failures[type(exc).__name__] += 1
            if time.monotonic() > deadline:
                self.gave_up.append(body["channel_order_id"])
                return
            await asyncio.sleep(0.5)


async def spread(n: int, seconds: float, make_body, submit, deadline: float) -> None:
    """``n`` submissions arriving evenly over ``seconds`` (each in its own task: a slow answer does not
    hold back the next arrival)."""
    async def one(i: int) -> None:
        await asyncio.sleep(i * seconds / n)
        await submit(make_body(i), deadline)
    await asyncio.gather(*(one(i) for i in range(n)))


# --- what the platform says about itself ------------------------------------------------------------


async def scrape(api: httpx.AsyncClient) -> list | None:
    """Every sample of the platform's ``/metrics`` (None when it does not answer)."""
    try:
        r = await api.get("/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def metric(samples: list | None, name: str, **labels: str) -> float:
    return sum(s.value for s in samples or () if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


def metric_rows(samples: list | None, name: str) -> list[tuple[dict, float]]:
    return [(s.labels, s.value) for s in samples or () if s.name == name and s.value]


# --- the ledger --------------------------------------------------------------------------------------


async def _credited_units(db: Db) -> int:
    return await db.val("quota", "SELECT coalesce(sum(credited), 0) FROM accounts") or 0


async def _outbox_rows(db: Db) -> int:
    total = 0
    for service in ("purchase", "quota"):
        total += await db.val(service, "SELECT count(*) FROM outbox") or 0
    return total


async def purchase_backlog(settings) -> int | None:
    """Records of ``purchase.submitted`` and ``purchase.events`` not yet committed by the groups that
    consume them (None: some topic with records has no consumer commit at all yet). Groups that never
    read these topics (stamping, notification) do not count, unlike ``flows.consumers_caught_up``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    names = [settings.topic(t.name) for t in (topics.PURCHASE_SUBMITTED, topics.PURCHASE_EVENTS)]
    admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(settings))
    probe = AIOKafkaConsumer(**kafka_auth.aiokafka_options(settings), group_id=None)
    await admin.start()
    await probe.start()
    try:
        await probe.topics()
        ends = await probe.end_offsets([TopicPartition(t, p) for t in names
                                        for p in probe.partitions_for_topic(t) or ()])
        committed: dict[str, dict] = {}          # topic -> group -> {tp: offset}
        for group, *_ in await admin.list_consumer_groups():
            if not group.startswith(settings.topic_prefix):
                continue
            for tp, meta in (await admin.list_consumer_group_offsets(group)).items():
                if tp.topic in names:
                    committed.setdefault(tp.topic, {}).setdefault(group, {})[tp] = meta.offset
        lag = 0
        for topic in names:
            published = sum(end for tp, end in ends.items() if tp.topic == topic)
            if published and topic not in committed:
                return None
            for offsets in committed.get(topic, {}).values():
                lag += sum(max(0, end - offsets.get(tp, 0)) for tp, end in ends.items() if tp.topic == topic)
        return lag
    finally:
        await probe.stop()
        await admin.close()


async def settle(db: Db, settings, expected_units: int, timeout: float = SETTLE_TIMEOUT_S) -> dict:
    """Wait until every expected unit is credited and the purchase topics are consumed, or until nothing
    moves any more (credits unchanged for 6 s, no backlog, outboxes empty), or ``timeout``."""
    started = time.monotonic()
    last, changed_at = None, time.monotonic()
    while True:
        units = await _credited_units(db)
        if units != last:
            last, changed_at = units, time.monotonic()
        backlog = await purchase_backlog(settings)
        out = {"after_s": round(time.monotonic() - started, 1), "units": units, "backlog": backlog}
        if units >= expected_units and backlog == 0:
            return {"how": "drained", **out}
        if time.monotonic() - changed_at > 6 and backlog == 0 and await _outbox_rows(db) == 0:
            return {"how": "settled short", **out}
        if time.monotonic() - started > timeout:
            return {"how": "timed out", **out, "outbox_rows": await _outbox_rows(db)}
        await asyncio.sleep(1)


async def ledger_report(db: Db, expected: dict[str, tuple[str, int]], doors: dict[str, set[str]]) -> dict:
    """The ledger against every accepted purchase (purchase id -> (account, quantity))."""
    credits = await db.fetch("quota", "SELECT id, account_id, amount FROM transfers WHERE kind = 'credit'")
    accounts = await db.fetch("quota", "SELECT account_id, credited, pending, committed FROM accounts")
    confirmed = {r["purchase_id"] for r in await db.fetch(
        "purchase", "SELECT purchase_id FROM purchases WHERE status = 'confirmed'")}
    credited = {r["id"]: (r["account_id"], r["amount"]) for r in credits}
    want_per_account: Counter = Counter()
    for account, quantity in expected.values():
        want_per_account[account] += quantity
    got_per_account = {r["account_id"]: r["credited"] for r in accounts}
    return {
        "expected_purchases": len(expected),
        "credit_transfers": len(credits),
        "credited_by_door": {door: f"{len(ids & credited.keys())}/{len(ids)}" for door, ids in doors.items()},
        "missing": len(expected.keys() - credited.keys()),
        "unexpected": len(credited.keys() - expected.keys()),
        "wrong_amount": sum(1 for pid, (acct, q) in expected.items() if pid in credited and credited[pid] != (acct, q)),
        "units": {"expected": sum(q for _, q in expected.values()), "credited": sum(got_per_account.values())},
        "accounts_off": sum(1 for a in want_per_account.keys() | got_per_account.keys()
                            if want_per_account.get(a, 0) != got_per_account.get(a, 0)),
        "balance_violations": sum(1 for r in accounts if r["pending"] < 0
                                  or r["credited"] - r["committed"] - r["pending"] < 0),
        "confirmed": {"expected": len(expected), "confirmed": len(confirmed & expected.keys()),
                      "unexpected": len(confirmed - expected.keys())},
        "_per_account_ok": dict(want_per_account) == got_per_account,
    }


async def dead_letters(settings) -> dict[str, dict[str, int]]:
    out = {}
    for topic in (topics.PURCHASE_DLQ, topics.QUOTA_DLQ):
        records = await read_topic(settings, topic.name, timeout=3, settle=0.5)
        out[topic.name] = dict(Counter(dict(r.headers or ()).get(DLQ_REASON, b"?").decode() for r in records))
    return out


# --- the scenario --------------------------------------------------------------------------------------


def _skip_unless_local(settings) -> None:
    if not stack.managed_postgres():
        pytest.skip("needs the local PostgreSQL cluster to put faults into it")
    reason = faults.unavailable(settings.database_url)
    if reason:
        pytest.skip(reason)


async def run_under_fault(settings, platform, api: httpx.AsyncClient, channel: dict, fault_cm) -> dict:
    """Warm up, run 200 + 200 purchases through ``fault_cm``'s window, let the backlog settle, and
    return everything seen (also printed)."""
    db = Db(settings)
    warm = await post_until_accepted(api, channel, order_body(quantity=1, account="warmup"))
    assert warm.status_code == 202, warm.text
    warm_id = warm.json()["purchase_id"]

    async def warm_credited():
        return await _credited_units(db) >= 1
    await wait_until(warm_credited, timeout=30, what="the warm-up purchase credited before the fault")
    before = await scrape(api)

    http = HttpDoor(api, channel)
    producer = Producer(settings, client_id="test-channel")
    await producer.start()
    kafka = KafkaDoor(settings, channel, producer)
    started = time.monotonic()
    try:
        async with fault_cm as fault:
            deadline = time.monotonic() + WINDOW_S + 25    # a client gives up on an order after this
            await asyncio.gather(
                spread(PER_DOOR, WINDOW_S, lambda i: order_body(quantity=1 + i % 5, account=f"h-{i % ACCOUNTS}"),
                       http.submit, deadline),
                spread(PER_DOOR, WINDOW_S, lambda i: order_body(quantity=1 + i % 5, account=f"k-{i % ACCOUNTS}"),
                       kafka.submit, deadline))
            load_s = round(time.monotonic() - started, 1)
    finally:
        await producer.stop()

    expected = {pid: (b["account_id"], b["quantity"]) for pid, b in (http.accepted | kafka.acked).items()}
    expected[warm_id] = ("warmup", 1)
    settled = await settle(db, settings, sum(q for _, q in expected.values()))
    after = await scrape(api)
    seen = {
        "fault": fault.summary(),
        "fault_obj": fault,
        "platform_alive": platform.proc.poll() is None,
        "load_s": load_s,
        "http": {"accepted": len(http.accepted), "answers": {str(k): v for k, v in http.answers.items()},
                 "503_without_retry_after": len(http.no_retry_after), "refused": http.refused[:3],
                 "gave_up": len(http.gave_up), "first_errors": http.errors},
        "kafka": {"acked": len(kafka.acked), "publish_failures": dict(kafka.failures), "gave_up": len(kafka.gave_up)},
        "metrics": {
            "failures": [(labels, v - metric(before, "bubuh_failures_total", **labels))
                         for labels, v in metric_rows(after, "bubuh_failures_total")],
            "outage_pauses": metric(after, "bubuh_consumer_outage_pauses_total")
            - metric(before, "bubuh_consumer_outage_pauses_total"),
            "scraped": after is not None,
        },
        "settled": settled,
        "ledger": await ledger_report(db, expected, {"http": set(http.accepted), "kafka": set(kafka.acked)}),
        "dead_letters": await dead_letters(settings),
        "_before": before, "_after": after,
    }
    if not seen["platform_alive"]:
        seen["platform_tail"] = platform.tail(20)
    for key, value in seen.items():
        if not key.startswith("_") and key != "fault_obj":
            print(f"{key}: {json.dumps(value, default=str)}")
    return seen


def failures_delta(seen: dict, **labels: str) -> float:
    return (metric(seen["_after"], "bubuh_failures_total", **labels)
            - metric(seen["_before"], "bubuh_failures_total", **labels))


def brief(seen: dict) -> str:
    """The outcome in one line, for assertion messages."""
    ledger = seen["ledger"]
    return (f"http answers {seen['http']['answers']}, kafka acked {seen['kafka']['acked']}/{PER_DOOR}, "
            f"credited by door {ledger['credited_by_door']}, missing {ledger['missing']}, "
            f"units {ledger['units']}, dead letters {seen['dead_letters']}, platform alive {seen['platform_alive']}, "
            f"failures metric {seen['metrics']['failures']}, outage pauses {seen['metrics']['outage_pauses']}")


def assert_outcome(seen: dict) -> None:
    """HTTP never 500; every accepted purchase credited exactly once; nothing waiting for a replay."""
    http, kafka, ledger = seen["http"], seen["kafka"], seen["ledger"]
    assert seen["platform_alive"], f"the platform process died: {seen.get('platform_tail')}"
    server_errors = {k: v for k, v in http["answers"].items() if k.isdigit() and int(k) >= 500 and k != "503"}
    assert not server_errors, f"HTTP answered {server_errors}: {http['first_errors'][:2]} | {brief(seen)}"
    assert http["503_without_retry_after"] == 0, f"503 without Retry-After | {brief(seen)}"
    assert not http["refused"], f"HTTP refused valid orders: {http['refused']}"
    assert http["accepted"] == PER_DOOR and http["gave_up"] == 0, f"HTTP orders never accepted | {brief(seen)}"
    assert kafka["acked"] == PER_DOOR, f"Kafka records never acked | {brief(seen)}"
    assert ledger["missing"] == 0 and ledger["unexpected"] == 0 and ledger["wrong_amount"] == 0, (
        f"accepted purchases not credited exactly once ({seen['settled']}) | {brief(seen)}")
    assert ledger["credit_transfers"] == ledger["expected_purchases"], brief(seen)
    assert ledger["_per_account_ok"] and ledger["accounts_off"] == 0, f"per-account sums differ | {brief(seen)}"
    assert ledger["units"]["credited"] == ledger["units"]["expected"], brief(seen)
    assert ledger["balance_violations"] == 0, brief(seen)
    confirmed = ledger["confirmed"]
    assert confirmed["confirmed"] == ledger["expected_purchases"] and confirmed["unexpected"] == 0, (
        f"purchases table: {confirmed}")
    assert all(not reasons for reasons in seen["dead_letters"].values()), (
        f"records dead-lettered (would need a replay): {seen['dead_letters']}")


def assert_held_and_restored(fault: faults.Fault) -> None:
    assert fault.held, (f"the fault did not hold for its window (another session restarted the cluster?): "
                        f"{fault.summary()}")
    assert fault.after == "ok", f"the database is not writable after the fault: {fault.summary()}"


# --- the tests -----------------------------------------------------------------------------------------


async def test_read_only_failover_20s_every_accepted_purchase_credited_once(settings, platform, api, channel):
    """A failover: the primary restarts as a hot standby (writes fail with 25006) for 20 s, then is promoted."""
    _skip_unless_local(settings)
    seen = await run_under_fault(settings, platform, api, channel,
                                 faults.read_only_failover(WINDOW_S, dsn=settings.database_url))
    fault: faults.Fault = seen["fault_obj"]
    # 1. the fault was real: a direct write during the window failed with 25006; writable again after
    assert fault.seen("25006") > 0, f"no direct write failed with 25006: {fault.summary()}"
    assert fault.duration is not None and fault.duration >= WINDOW_S
    assert_held_and_restored(fault)
    # 2. the platform saw it
    assert failures_delta(seen, sqlstate="25006") > 0, (
        f"the platform never counted a 25006 in bubuh_failures_total | {brief(seen)}")
    # 3. the outcome
    assert_outcome(seen)


async def test_cancel_storm_20s_every_accepted_purchase_credited_once(settings, platform, api, channel):
    """``pg_cancel_backend`` on every platform backend every 200 ms for 20 s. Each round fires once,
    within 150 ms of its start, at a moment when one of them runs a statement other than COMMIT:
    fired blindly, most cancels reach idle or committing backends, which ignore them, and a batching
    platform saw one statement cancelled in 20 s (aimed: 7-11), too few to tell a storm from luck."""
    _skip_unless_local(settings)
    seen = await run_under_fault(settings, platform, api, channel,
                                 faults.cancel_storm(settings.database_url, WINDOW_S, 0.2,
                                                     pids=[platform.proc.pid], aim=0.15))
    fault: faults.Fault = seen["fault_obj"]
    # 1. the fault was real: pg_cancel_backend returned true for the platform's backends, and the
    #    server logged statements of theirs as cancelled
    assert fault.rounds >= WINDOW_S / 0.2 * 0.8, f"the storm ran {fault.rounds} rounds"
    assert fault.cancelled, f"pg_cancel_backend never hit a platform backend: {fault.summary()}"
    assert all(app.startswith("bubuh-") for _, _, app, _ in fault.cancelled)
    if fault.statements_cancelled is not None:
        assert fault.statements_cancelled > 0, f"no platform statement was cancelled: {fault.summary()}"
    assert_held_and_restored(fault)
    # 2. the platform saw it
    assert failures_delta(seen, sqlstate="57014") > 0, (
        f"the platform never counted a 57014 in bubuh_failures_total | {brief(seen)}")
    # 3. the outcome
    assert_outcome(seen)


async def test_postgres_stopped_20s_every_accepted_purchase_credited_once(settings, platform, api, channel):
    """PostgreSQL stopped (fast shutdown) for 20 s, then started."""
    _skip_unless_local(settings)
    seen = await run_under_fault(settings, platform, api, channel,
                                 faults.postgres_stopped(WINDOW_S, dsn=settings.database_url))
    fault: faults.Fault = seen["fault_obj"]
    # 1. the fault was real: connections were refused during the window
    assert fault.seen("refused") > 0, f"no direct connection was refused: {fault.summary()}"
    assert_held_and_restored(fault)
    # 2. the platform saw it
    assert seen["metrics"]["outage_pauses"] > 0 or failures_delta(seen, kind="outage") > 0, (
        f"the platform counted no outage | {brief(seen)}")
    # 3. the outcome
    assert_outcome(seen)


async def test_a_stamp_accepted_while_the_database_is_read_only_reads_as_queued_then_completes(
        settings, platform, api, channel):
    """A failover at intake: the request's row cannot be written (25006), its event is on Kafka, the
    channel got 202. Its status read then says queued, not NOT_FOUND (the deadline day counted some
    2,500 such 404s per run), and once the database is writable again it completes."""
    from loadtests import corpus
    from tests.flows import buy, post_stamp, stamp_finished, stamp_meta
    from tests.platform import add_channel

    _skip_unless_local(settings)
    await buy(api, channel, "ro-stamp", 1)
    db = Db(settings)
    async with faults.read_only_failover(10, dsn=settings.database_url) as fault:
        r = await post_stamp(api, channel, corpus.a4_text(6), stamp_meta("ro-stamp"), idempotency_key="ro-1")
        assert r.status_code == 202, r.text
        rid = r.json()["request_id"]
        rows_in_window = await db.val("stamping", "SELECT count(*) FROM requests WHERE request_id = $1", rid)
        read = await api.get(f"/v1/stamps/{rid}", headers=auth(channel))
        unknown = await api.get("/v1/stamps/00000000-0000-4000-8000-000000000000", headers=auth(channel))
    # the fault was real: direct writes failed with 25006 and the intake could not write the row
    assert fault.seen("25006") > 0, f"no direct write failed with 25006: {fault.summary()}"
    assert_held_and_restored(fault)
    assert rows_in_window == 0, "the row was written: the fault did not reach the intake"
    assert read.status_code == 200, read.text
    assert (read.json()["status"], read.json()["account_id"]) == ("queued", "ro-stamp"), read.json()
    assert unknown.status_code == 404 and unknown.json()["code"] == "NOT_FOUND"
    other = add_channel(settings)
    assert (await api.get(f"/v1/stamps/{rid}", headers=auth(other))).status_code == 404   # only its channel's
    done = await stamp_finished(api, channel, rid, timeout=90)
    assert done["status"] == "completed", done
