"""Every accepted stamp ends completed or refunded, while its worker is killed mid-signing, and a
transient failure is retried, dead-lettered with its history, and finished after a replay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import httpx
import pytest

from loadtests import corpus
from services.kernel import topics
from tests.flows import Db, auth, buy, decoded, post_stamp, read_topic, stamp_finished, stamp_meta, wait_for
from tests.platform import PlatformProcess, add_channel, cli, free_port


@pytest.mark.slow
async def test_worker_killed_mid_signing_ends_completed_with_one_sn_and_one_charge(settings):
    front = await PlatformProcess(settings, api="all", workers="purchase,quota", name="front").start()
    worker = PlatformProcess(settings, api="none", workers="stamping", name="worker",
                             BUBUH_STAMP_MAX_DELIVERIES=20)
    channel = add_channel(settings)
    db = Db(settings)
    n = 60
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=60) as api:
            await buy(api, channel, "k", n)
            scan = corpus.scan_800k(2)
            ids = []
            for i in range(n):   # a backlog first, so the worker is busy signing whenever it is killed
                r = await post_stamp(api, channel, scan if i % 3 else corpus.a4_text(i), stamp_meta("k"))
                assert r.status_code == 202, r.text
                ids.append(r.json()["request_id"])
            rng = random.Random()
            kills = 0
            while kills < 15:
                since = await db.val("stamping", "SELECT now()")
                await worker.start()
                # a request this worker started: the one the last kill interrupted still says 'stamping'
                # a worker that starts on a short backlog can sign all of it between two reads (CI, 3 December:
                # 23 stamps in 0.4 s, none seen 'stamping'), or find none left: nothing to stop it in
                if await wait_for(lambda since=since: _signing_or_drained(db, since, ids), timeout=30,
                                  interval=0.02, what="this worker signing") == "drained":
                    break
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                worker.kill()
                kills += 1
                if kills >= 3 and await db.val("stamping", "SELECT count(*) FROM requests WHERE deliveries >= 2"):
                    break
            if worker.proc.poll() is not None:
                await worker.start()
            finals = [await stamp_finished(api, channel, rid, timeout=120) for rid in ids]
        assert [f["status"] for f in finals] == ["completed"] * n, [f for f in finals if f["status"] != "completed"]
        sns = [f["sn"] for f in finals]
        assert len(set(sns)) == n
        # a kill landed between "SN issued, signing started" and "completed": the redelivery reused the SN
        assert await db.val("stamping", "SELECT count(*) FROM requests WHERE deliveries >= 2") >= 1
        async def ledger_settled():     # the ledger commits when it consumes the outcome, just after the status
            rows = await db.fetch("quota", "SELECT credited, pending, committed FROM accounts WHERE account_id = 'k'")
            return rows[0]["pending"] == 0 and dict(rows[0])
        assert await wait_for(ledger_settled, what="no unit pending") == {"credited": n, "pending": 0, "committed": n}
        completions = [m for m in decoded(await read_topic(settings, topics.STAMP_EVENTS.name, at_least=n))
                       if type(m).__name__ == "StampCompleted"]
        by_request: dict[str, set] = {}
        for m in completions:
            by_request.setdefault(m.request_id, set()).add(m.sn)
        assert all(len(v) == 1 for v in by_request.values()) and len(by_request) == n
    finally:
        await worker.stop()
        await front.stop()


@pytest.mark.slow
async def test_a_graceful_stop_of_the_whole_worker_group_mid_signing_fails_no_stamp(settings):
    """`bubuh down` and systemd stop a service with SIGTERM to its whole process group: the worker, its
    fork server and its signing children at once. The children died mid-stamp, the worker read their end
    as "the document crashed the reader", and each stamp being signed failed for good as PDF_MALFORMED
    (seen in benchmark runs: 2 per stop). Now they finish, or are tried again; every one completes."""
    front = await PlatformProcess(settings, api="all", workers="purchase,quota", name="front").start()
    worker = PlatformProcess(settings, api="none", workers="stamping", name="worker", own_group=True,
                             BUBUH_SIGNING_PROCESSES="2")
    channel = add_channel(settings)
    db = Db(settings)
    n = 40
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=60) as api:
            await buy(api, channel, "g", n)
            scan = corpus.scan_800k(4)
            ids = []
            for i in range(n):   # a backlog first, so the worker is signing whenever it is stopped
                r = await post_stamp(api, channel, scan if i % 2 else corpus.a4_text(i), stamp_meta("g"))
                assert r.status_code == 202, r.text
                ids.append(r.json()["request_id"])
            stops = 0
            while stops < 3:
                since = await db.val("stamping", "SELECT now()")
                await worker.start()
                # a worker that starts on a short backlog can sign all of it between two reads (CI, 3 December:
                # 23 stamps in 0.4 s, none seen 'stamping'), or find none left: nothing to stop it in
                if await wait_for(lambda since=since: _signing_or_drained(db, since, ids), timeout=30,
                                  interval=0.02, what="this worker signing") == "drained":
                    break
                group = worker.group()
                assert len(group) >= 4, group       # the fault reaches the fork server and the signing children
                await worker.stop_group()
                stops += 1
                assert worker.proc.returncode is not None
                left = await _group_gone(worker)
                assert not left, left                                  # all of them stopped, none orphaned
            assert stops >= 1
            if worker.proc.poll() is not None:
                await worker.start()
            finals = [await stamp_finished(api, channel, rid, timeout=120) for rid in ids]
        failed = [(f["request_id"], f.get("code"), f.get("detail")) for f in finals if f["status"] != "completed"]
        assert not failed, failed
        assert len({f["sn"] for f in finals}) == n
        # a stop is the worker's, not the request's: no attempt of any request was spent on it
        spent = await db.val("stamping", "SELECT count(*) FROM attempts WHERE request_id = any($1) "
                                         "AND code = 'UNAVAILABLE'", ids)
        assert spent == 0, f"{spent} attempts spent on the worker's own stops"
    finally:
        await worker.stop()
        await front.stop()


async def _group_gone(process: PlatformProcess, within_s: float = 10.0) -> dict[int, str]:
    """The group's processes still alive ``within_s`` after its leader ended (pid -> command line)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while (left := process.group()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    out = {}
    for pid in left:
        with contextlib.suppress(OSError):
            out[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")[:200]
    return out


async def _signing(db: Db, since) -> bool:
    return bool(await db.val("stamping", "SELECT count(*) FROM requests WHERE status = 'stamping' "
                                         "AND started_at > $1", since))


async def _signing_or_drained(db: Db, since, ids: list[str]) -> str | None:
    """'signing' while a request this start took is being signed; 'drained' once none of ``ids`` is left."""
    if await _signing(db, since):
        return "signing"
    if not await db.val("stamping", "SELECT count(*) FROM requests WHERE status NOT IN ('completed', 'failed') "
                                    "AND request_id = any($1)", ids):
        return "drained"
    return None


async def test_unreachable_tsa_is_retried_then_dead_lettered_and_replay_finishes_it(settings):
    closed = free_port()
    front = await PlatformProcess(settings, api="all", workers="purchase,quota", name="front").start()
    worker = await PlatformProcess(settings, api="none", workers="stamping", name="worker",
                                   BUBUH_PADES_LEVEL="b-t", BUBUH_SIGNING_TSA_URL=f"http://127.0.0.1:{closed}/tsa",
                                   BUBUH_STAMP_MAX_ATTEMPTS=4, BUBUH_STAMP_RETRY_BASE_S=1.0).start()
    channel = add_channel(settings)
    db = Db(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=60) as api:
            await buy(api, channel, "tsa", 1)
            r = await post_stamp(api, channel, corpus.a4_text(3), stamp_meta("tsa"))
            rid = r.json()["request_id"]
            dlq = await read_topic(settings, topics.STAMP_DLQ.name, at_least=1, timeout=60)
            assert [rec.key.decode() for rec in dlq] == [rid]
            headers = dict(dlq[0].headers)
            assert headers["bubuh-dlq-reason"] == b"TSA_UNAVAILABLE"
            history = json.loads(headers["bubuh-dlq-attempts"])
            assert [h["attempt"] for h in history] == [1, 2, 3, 4]
            assert {h["code"] for h in history} == {"TSA_UNAVAILABLE"}
            times = [h["at"] for h in await db.fetch("stamping", "SELECT at FROM attempts WHERE request_id = $1 "
                                                                 "ORDER BY attempt", rid)]
            gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
            # exponential backoff with equal jitter: retry n waits at least half its ceiling, 1 s x 2^(n-1).
            # The floors, not gap against gap: the relay and the retry topic add a latency that varies by
            # more than a jittered gap does on a busy box (1.22 s, 0.82 s, 1.06 s for base 0.4 once).
            floors = [0.5 * 1.0 * 2 ** n for n in range(3)]
            assert all(g >= f for g, f in zip(gaps, floors, strict=True)), (gaps, floors)
            status = (await api.get(f"/v1/stamps/{rid}", headers=auth(channel))).json()
            assert status["status"] == "reserved" and status["code"] == "TSA_UNAVAILABLE"
            quota = (await api.get("/v1/accounts/tsa/quota", headers=auth(channel))).json()
            assert quota["pending"] == 1        # the unit stays reserved while dead-lettered

            await worker.stop()               # the TSA is "fixed": a worker without it
            worker = await PlatformProcess(settings, api="none", workers="stamping", name="worker2").start()
            out = await asyncio.to_thread(cli, settings, "replay", "stamp.dead-letter")
            assert "1 replayed" in out.stdout
            done = await stamp_finished(api, channel, rid)
            assert done["status"] == "completed"
            quota = await wait_for(lambda: _settled(api, channel), what="commit")
            assert (quota["committed"], quota["pending"]) == (1, 0)
            again = await asyncio.to_thread(cli, settings, "replay", "stamp.dead-letter")
            assert "0 replayed" in again.stdout   # an entry is replayed once
    finally:
        await worker.stop()
        await front.stop()


async def _settled(api, channel):
    q = (await api.get("/v1/accounts/tsa/quota", headers=auth(channel))).json()
    return q if q["pending"] == 0 else None
