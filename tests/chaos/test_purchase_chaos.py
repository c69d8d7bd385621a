"""Paid means credited, exactly once, while processes die and the database disappears.

Each test keeps its own list of every purchase that got a 202 and checks the ledger against it.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from services.contracts.bubuh.v1 import quota_pb2
from services.kernel import events, topics
from tests import faults
from tests.flows import Db, auth, order_body, post_until_accepted, read_topic, wait_for
from tests.platform import PlatformProcess, add_channel, free_port

pytestmark = pytest.mark.slow


class Load:
    """Posts purchases with bounded concurrency and records every 202."""

    def __init__(self, api: httpx.AsyncClient, channel: dict, accounts: int = 50) -> None:
        self.api, self.channel, self.accounts = api, channel, accounts
        self.accepted: list[dict] = []
        self.other: list[tuple[int, str]] = []
        self.latencies: list[float] = []

    async def post(self, body: dict) -> None:
        started = time.perf_counter()
        r = await self.api.post("/v1/purchases", json=body, headers=auth(self.channel))
        self.latencies.append(time.perf_counter() - started)
        if r.status_code == 202:
            self.accepted.append(body)
        else:
            self.other.append((r.status_code, r.text[:200]))

    async def run(self, n: int, concurrency: int = 16, rate_per_s: float | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Post ``n`` purchases (fewer if ``stop`` is set first)."""
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(order_body(quantity=1 + i % 5, account=f"acct-{i % self.accounts}"))
        interval = concurrency / rate_per_s if rate_per_s else 0

        async def worker():
            while not queue.empty() and not (stop and stop.is_set()):
                await self.post(queue.get_nowait())
                if interval:
                    await asyncio.sleep(interval)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    def expected_per_account(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.accepted:
            out[b["account_id"]] = out.get(b["account_id"], 0) + b["quantity"]
        return out


async def assert_credited_exactly_once(db: Db, load: Load, timeout: float = 240) -> None:
    expected = sum(b["quantity"] for b in load.accepted)

    async def drained():
        return (await db.val("quota", "SELECT coalesce(sum(credited), 0) FROM accounts")) == expected
    await wait_for(drained, timeout=timeout, interval=1, what=f"{expected} units credited")
    rows = await db.fetch("quota", "SELECT account_id, credited, pending, committed FROM accounts")
    assert {r["account_id"]: r["credited"] for r in rows} == load.expected_per_account()
    assert all(r["credited"] - r["committed"] - r["pending"] >= 0 and r["pending"] >= 0 for r in rows)
    # each accepted purchase is exactly one credit transfer, and no credit exists without one
    credits = await db.val("quota", "SELECT count(*) FROM transfers WHERE kind = 'credit'")
    assert credits == len(load.accepted)
    confirmed = await db.val("purchase", "SELECT count(*) FROM purchases WHERE status = 'confirmed'")
    assert confirmed == len(load.accepted)


async def test_quota_service_killed_three_times_while_purchases_flow(settings):
    front = await PlatformProcess(settings, api="all", workers="purchase", name="front").start()
    quota = await PlatformProcess(settings, api="none", workers="quota", name="quota").start()
    channel = add_channel(settings)
    db = Db(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30,
                                     limits=httpx.Limits(max_connections=32)) as api:
            await post_until_accepted(api, channel, order_body(quantity=1, account="warmup"))
            load = Load(api, channel)
            load.accepted.append(order_body(quantity=1, account="warmup"))  # replaced below by the real one
            load.accepted.pop()
            enough = asyncio.Event()
            flow = asyncio.create_task(load.run(5000, concurrency=16, stop=enough))
            rng = random.Random()
            accepted_at_kills = []
            for _ in range(3):
                # each kill lands while purchases flow: after 20 more were accepted (on a box busy with the
                # parallel suite the first 1-4 s once saw none), then at a random moment
                seen = accepted_at_kills[-1] if accepted_at_kills else 0
                while len(load.accepted) < seen + 20 and not flow.done():
                    await asyncio.sleep(0.05)
                await asyncio.sleep(rng.uniform(0.2, 2.0))
                quota.kill()
                accepted_at_kills.append(len(load.accepted))
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                await quota.start()
            # the kills landed while purchases flowed: the flow was still running at each, and goes on after
            assert not flow.done(), "the purchases were all in before the last kill"
            await asyncio.sleep(3)
            enough.set()
            await flow
            assert load.other == [], load.other[:5]
            assert 0 < accepted_at_kills[0] < accepted_at_kills[1] < accepted_at_kills[2] < len(load.accepted), (
                accepted_at_kills, len(load.accepted))
            load.accepted.append({"account_id": "warmup", "quantity": 1})
            await assert_credited_exactly_once(db, load)
    finally:
        await quota.stop()
        await front.stop()


async def test_the_quota_member_leading_its_outbox_sigkilled_the_other_takes_over_in_order(settings):
    """Two quota members: one leads the quota outbox's relay (kernel/leadership.py), the other stands by.
    The leader is SIGKILLed while purchases flow; the other takes the lead (its log says so) and publishes
    what follows and what the dead one left. Every purchase is credited once, and each account's
    QuotaCredited events on quota.events come in the order the ledger wrote them (their balances rise)."""
    lock = f"outbox relay {settings.schema('quota')}"
    front = await PlatformProcess(settings, api="all", workers="purchase", name="front").start()
    members = [await PlatformProcess(settings, api="none", workers="quota", name=f"quota-{n}",
                                     BUBUH_METRICS_PORT=free_port()).start() for n in ("a", "b")]
    channel = add_channel(settings)
    db = Db(settings)

    def leading(p: PlatformProcess) -> list[dict]:
        return [r for r in p.log_records() if r.get("event") == "leading" and r.get("lock") == lock]

    try:
        async def one_leads():
            return [p for p in members if leading(p)]
        (leader,) = await wait_for(one_leads, timeout=30, what="a quota member leading the outbox relay")
        (survivor,) = [p for p in members if p is not leader]
        assert any(r.get("event") == "standing by: another member leads" and r.get("lock") == lock
                   for r in survivor.log_records())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30,
                                     limits=httpx.Limits(max_connections=32)) as api:
            await post_until_accepted(api, channel, order_body(quantity=1, account="warmup"))
            load = Load(api, channel, accounts=20)
            enough = asyncio.Event()
            flow = asyncio.create_task(load.run(5000, concurrency=16, stop=enough))
            while len(load.accepted) < 60 and not flow.done():
                await asyncio.sleep(0.05)
            leader.kill()
            assert leader.proc.returncode == -9                        # the fault: SIGKILLed
            killed_at = len(load.accepted)

            async def took_over():
                return [r for r in leading(survivor) if r.get("took_over")]
            await wait_for(took_over, timeout=15, interval=0.1, what="the standby taking the lead")
            while len(load.accepted) < killed_at + 60 and not flow.done():
                await asyncio.sleep(0.05)
            assert not flow.done(), "the purchases were all in before the standby took over"
            enough.set()
            await flow
            assert load.other == [], load.other[:5]
            load.accepted.append({"account_id": "warmup", "quantity": 1})
            await assert_credited_exactly_once(db, load)

        async def outbox_drained():
            return await db.val("quota", "SELECT count(*) FROM outbox") == 0
        await wait_for(outbox_drained, timeout=30, what="the quota outbox drained by the new leader")
        records = await read_topic(settings, topics.QUOTA_EVENTS.name, at_least=len(load.accepted))
        credited: dict[str, list[int]] = {}
        seen: set[str] = set()
        for record in records:        # a partition's records in order; an account is on one partition
            env, payload = events.decode(record.value)
            if isinstance(payload, quota_pb2.QuotaCredited) and env.event_id not in seen:
                seen.add(env.event_id)     # at least once: a copy sent again by the new leader comes later
                credited.setdefault(payload.account_id, []).append(payload.balance.credited)
        assert sum(len(v) for v in credited.values()) == len(load.accepted)
        for account, balances in credited.items():
            assert balances == sorted(balances) and len(set(balances)) == len(balances), (account, balances)
    finally:
        for p in members:
            await p.stop()
        await front.stop()


@pytest.mark.own_database
async def test_postgres_down_30s_intake_keeps_answering_and_backlog_drains(settings):
    reason = faults.unavailable(settings.database_url)
    if reason:
        pytest.skip(reason)
    proc = await PlatformProcess(settings).start()
    channel = add_channel(settings)
    db = Db(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as api:
            await post_until_accepted(api, channel, order_body(quantity=1, account="warmup"))
            before = Load(api, channel)
            await before.run(200, concurrency=8)
            during = Load(api, channel)
            async with faults.postgres_stopped(30, dsn=settings.database_url) as fault:
                while time.monotonic() - fault.began < 30:
                    await during.run(40, concurrency=4)
            # the database really was gone for the window (no direct write got through), and is back
            assert fault.probes and fault.held, fault.summary()
            assert fault.after == "ok", fault.summary()
            after = Load(api, channel)
            await after.run(200, concurrency=8)
            assert during.other == [] and before.other == [] and after.other == [], during.other[:5]
            assert len(during.accepted) > 100
            during.latencies.sort()
            assert during.latencies[int(len(during.latencies) * 0.99)] < 2.0
            everything = Load(api, channel)
            everything.accepted = before.accepted + during.accepted + after.accepted + [
                {"account_id": "warmup", "quantity": 1}]
            await assert_credited_exactly_once(db, everything)
    finally:
        await proc.stop()
