"""Every panel shows what it claims: the platform runs as ``BUBUH_LOCAL_LAYOUT=shared bubuh up`` runs it
(the api process with the light workers, the stamping worker in a process of its own), deploy/local/ops.sh
starts Prometheus on free ports in a directory of the test's own, scraping both processes every second with
deploy/prometheus/rules.yml (its groups evaluated every second here), and a small surge with faults
goes through: purchases over HTTP and Kafka, a forged Kafka record (purchase dead letter), stamps over
HTTP, an upload that is no PDF (refused at intake), a stamp without quota, a stamp request over Kafka
whose stored request is missing (SIGNING_FAILED), one whose store cannot be read (retried, then
dead-lettered), a channel whose webhook endpoint refuses (failed attempts, its circuit opens), and at
the end two malformed records in a row on stamp.requested: the first is dead-lettered, the second stops
the ledger's consumer at its dead-letter limit (1 in a row here; a channel's forgeries never count).

Then every PromQL query of every panel of deploy/grafana/dashboards/*.json goes to Prometheus's
/api/v1/query with Grafana's time variables set to a window that covers the run: every bubuh_* metric
a panel names is in /api/v1/metadata and has series, every recording rule a panel reads has series,
and every query returns at least one series (tests/unit/test_dashboard_queries.py checks statically
that none is masked with ``or vector(0)``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from loadtests import corpus
from services.kernel import events
from services.kernel.producer import Producer
from services.stamping import store
from tests.flows import (
    Db,
    buy,
    kafka_submission,
    order_body,
    post_stamp,
    stamp_finished,
    stamp_meta,
    stamp_requested,
    wait_for,
)
from tests.platform import PlatformProcess, add_channel
from tests.stack import free_port
from tests.unit.test_dashboard_queries import expand, panel_queries
from tests.unit.test_deploy_manifests import METRIC_RE, RECORDED_RE, ROOT

OPS = ROOT / "deploy" / "local" / "ops.sh"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
WINDOW = "3m"        # Grafana's $__rate_interval and friends: the whole run is inside it
# short retries, so the faults reach their end (dead letter, open circuit) within the test
FAST_FAULTS = {"BUBUH_STAMP_MAX_ATTEMPTS": 2, "BUBUH_STAMP_RETRY_BASE_S": 0.2, "BUBUH_STAMP_RETRY_MAX_S": 0.5,
               "BUBUH_WEBHOOK_BREAKER_FAILURES": 2, "BUBUH_WEBHOOK_BACKOFF_BASE_S": 0.4,
               "BUBUH_WEBHOOK_BACKOFF_MAX_S": 1, "BUBUH_WEBHOOK_BREAKER_COOLDOWN_S": 600}


class Endpoint:
    """A channel's webhook receiver on 127.0.0.1 answering ``status`` to every POST."""

    def __init__(self, status: int) -> None:
        self.hits = 0
        endpoint = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                endpoint.hits += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def prometheus_get(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query(port: int, expr: str) -> list[dict]:
    return prometheus_get(port, "/api/v1/query", query=expr)["result"]


def fast_rules(tmp_path) -> str:
    """deploy/prometheus/rules.yml with every group evaluated each second (the deployed groups run each 30 s)."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return str(path)


async def surge(settings, api: httpx.AsyncClient, good: dict, refusing: dict, db: Db) -> None:
    # purchases over HTTP (credited before stamping), and over Kafka: one signed, one forged, one garbage
    await asyncio.gather(buy(api, good, "g1", 6), buy(api, refusing, "r1", 3))
    producer = Producer(settings)
    await producer.start()
    try:
        await producer.publish(kafka_submission(settings, good, order_body(quantity=2, account="g2")))
        await producer.publish(kafka_submission(settings, good, order_body(quantity=9, account="g2"),
                                                secret="0" * 64))
        # stamp requests over Kafka, as the intake publishes them: one whose stored request is missing
        # (SIGNING_FAILED), one whose store cannot be read (STORAGE_UNAVAILABLE, retried, dead-lettered)
        missing_id = str(uuid.uuid4())
        missing = stamp_requested(settings, good["channel_id"], "g1", request_id=missing_id)
        unreadable_id = str(uuid.uuid4())
        unreadable_path = settings.documents_root / store.meta_key(unreadable_id)
        unreadable_path.mkdir(parents=True)         # a directory where the request should be: EISDIR
        unreadable = stamp_requested(settings, good["channel_id"], "g1", request_id=unreadable_id)
        await producer.publish(missing)
        await producer.publish(unreadable)
    finally:
        await producer.stop()
    try:
        # stamps over HTTP: both channels; one upload that is no PDF; one account without quota
        accepted = []
        for i, (ch, account) in enumerate([(good, "g1"), (good, "g1"), (refusing, "r1"), (good, "g1"),
                                           (refusing, "r1"), (good, "nobody")]):
            r = await post_stamp(api, ch, corpus.a4_text(i), stamp_meta(account))
            assert r.status_code == 202, r.text
            accepted.append((ch, r.json()["request_id"]))
        r = await post_stamp(api, good, b"this is not a pdf", stamp_meta("g1"))
        assert r.status_code == 422 and r.json()["code"] == "PDF_INVALID", r.text
        finished = [await stamp_finished(api, ch, rid, timeout=90) for ch, rid in accepted]
        assert [f["status"] for f in finished] == ["completed"] * 5 + ["failed"], finished
        assert finished[-1]["code"] == "QUOTA_INSUFFICIENT", finished[-1]

        async def status_of(rid: str):
            return await db.val("stamping", "SELECT status FROM requests WHERE request_id = $1", rid)
        await wait_for(lambda: _is(status_of(unreadable_id), "dead_lettered"), timeout=60,
                       what="the unreadable request dead-lettered")
        await wait_for(lambda: _is(status_of(missing_id), "failed"), timeout=30,
                       what="the request without its stored request failed")
        # last, as it stops the ledger's consumer: two malformed records in a row, in one partition
        producer = Producer(settings)
        await producer.start()
        try:
            for _ in range(2):
                await producer.publish(events.Outgoing(missing.topic, b"poison", b"\x08\x96\x01not-an-envelope", []))
        finally:
            await producer.stop()
    finally:
        shutil.rmtree(unreadable_path.parent, ignore_errors=True)


async def _is(coro, value) -> bool:
    return (await coro) == value


async def test_every_panel_returns_series_from_a_real_prometheus(settings, tmp_path):
    if not (shutil.which("prometheus") and shutil.which("prometheus-alertmanager")):
        if os.geteuid() != 0:
            pytest.skip("Prometheus is not installed and cannot be installed here (not root): "
                        "`sudo deploy/local/ops.sh install`")
        await asyncio.to_thread(subprocess.run, [str(OPS), "install"], check=True, timeout=600)
    metrics_port, prom = free_port(), free_port()
    ok, refusing_hook = Endpoint(200), Endpoint(500)
    good, refusing = await asyncio.gather(asyncio.to_thread(add_channel, settings, "panels-good", ok.url),
                                          asyncio.to_thread(add_channel, settings, "panels-refusing",
                                                            refusing_hook.url))
    # as `bubuh up` runs them in the shared layout (services/local_processes.py): two processes rather than
    # a process per tier, so `bubuh scrape-targets` (told the layout below) names both
    api_proc = PlatformProcess(settings, api="all", workers="purchase,quota,notification", name="bubuh",
                               BUBUH_CONSUMER_DLQ_MAX_CONSECUTIVE=1, **FAST_FAULTS)     # the ledger stops last
    stamping = PlatformProcess(settings, api="none", workers="stamping", name="stamping-1",
                               BUBUH_METRICS_PORT=metrics_port, **FAST_FAULTS)
    ops_env = {**os.environ, "BUBUH_OPS_DIR": str(tmp_path / "ops"), "BUBUH_OPS_RULES": fast_rules(tmp_path),
               "BUBUH_OPS_PROMETHEUS_PORT": str(prom), "BUBUH_OPS_ALERTMANAGER_PORT": str(free_port()),
               "BUBUH_OPS_SCRAPE_INTERVAL": "1s", "BUBUH_PYTHON": sys.executable,
               "BUBUH_HTTP_PORT": str(settings.http_port), "BUBUH_METRICS_PORT": str(metrics_port),
               "BUBUH_LOCAL_LAYOUT": "shared"}
    started_at = time.monotonic()
    try:
        await asyncio.gather(api_proc.start(), stamping.start())
        started = await asyncio.to_thread(subprocess.run, [str(OPS), "start"], env=ops_env, capture_output=True,
                                          text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        # Prometheus applies new targets on a 5 s tick: the surge starts once both processes are scraped,
        # so its counters are seen from before their first increment

        up: dict[str, str] = {}

        async def both_scraped() -> bool:
            up.clear()
            up.update({r["metric"]["job"]: r["value"][1]
                       for r in await asyncio.to_thread(query, prom, 'up{job=~"bubuh-.*"}')})
            return up == {"bubuh-api": "1", "bubuh-stamping": "1"}
        try:
            await wait_for(both_scraped, timeout=45, interval=0.5, what="Prometheus scraping both processes")
        except AssertionError:
            targets = await asyncio.to_thread(prometheus_get, prom, "/api/v1/targets")
            seen = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets["activeTargets"]]
            pytest.fail(f"up: {up}; targets: {seen}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as api:
            await surge(settings, api, good, refusing, Db(settings))
        await wait_for(_async(lambda: refusing_hook.hits >= 2 and ok.hits >= 1), timeout=30,
                       what="webhooks to both endpoints")
        assert await both_scraped()
        window = f"{max(180, int(time.monotonic() - started_at) + 60)}s"

        # a scrape or a rule evaluation may lag the surge by a second or two: wait until every panel
        # has series, and report the ones that never got any
        empty: list[str] = []

        async def all_panels_answer() -> bool:
            empty[:] = [f"{d} {title!r} {ref}: {expand(expr, window)}" for d, title, ref, expr in panel_queries()
                        if not await asyncio.to_thread(query, prom, expand(expr, window))]
            return not empty
        try:
            await wait_for(all_panels_answer, timeout=30, interval=1, what="every panel")
        except AssertionError:
            pytest.fail("panels that return no series:\n" + "\n".join(empty))

        metadata = await asyncio.to_thread(prometheus_get, prom, "/api/v1/metadata")
        problems = []
        for d, title, _ref, expr in panel_queries():
            for name, _star in METRIC_RE.findall(expr):
                family = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                if name not in metadata and family not in metadata:
                    problems.append(f"{d} {title!r}: {name} has no metadata in Prometheus")
                if not query(prom, f'count({{__name__="{name}"}})'):
                    problems.append(f"{d} {title!r}: {name} has no series")
            for recorded in RECORDED_RE.findall(expr):
                if not query(prom, f'count({{__name__="{recorded}"}})'):
                    problems.append(f"{d} {title!r}: recording rule {recorded} has no series")
        assert not problems, "\n".join(problems)

        # the faults show where they should: not only series, values
        def value(expr: str) -> float:
            return max(float(r["value"][1]) for r in query(prom, expand(expr, window)))
        assert value('sum(bubuh_dead_letter_records_total{reason="SIGNATURE_INVALID"})') >= 1
        assert value('sum(bubuh_stamp_outcomes_total{outcome="dead_lettered", code="STORAGE_UNAVAILABLE"})') >= 1
        assert value('sum(bubuh_stamp_outcomes_total{outcome="failed", code="SIGNING_FAILED"})') >= 1
        assert value('sum(bubuh_webhook_attempts_total{result="rejected"})') >= 2
        assert value(f'sum(bubuh_stamp_channel_completed_total{{channel="{good["channel_id"]}"}})') == 3
        assert value(f'sum(bubuh_stamp_channel_completed_total{{channel="{refusing["channel_id"]}"}})') == 2
        assert value("sum(max by (endpoint) (bubuh_webhook_circuit_state) == bool 2)") == 1
        assert value('max(bubuh_consumer_stopped{consumer="purchase.confirmation"})') == 0

        async def ledger_consumer_stopped() -> bool:
            return value('max(bubuh_consumer_stopped{consumer="quota.ledger"})') == 1
        await wait_for(ledger_consumer_stopped, timeout=20, interval=1, what="quota.ledger stopped by its limit")
        assert value(f'max(bubuh_webhook_channel_pending_deliveries{{channel="{refusing["channel_id"]}"}})') >= 1
        # the dead-lettered request keeps its unit reserved until replay or expiry
        assert value("max(bubuh_ledger_pending_units)") >= 1

        async def dead_letters_held() -> bool:     # read from Kafka every 10 s
            held = {r["metric"]["topic"]: float(r["value"][1])
                    for r in await asyncio.to_thread(query, prom, "max by (topic) (bubuh_dead_letter_topic_records)")}
            return held.get("purchase.dead-letter", 0) >= 1 and held.get("stamp.dead-letter", 0) >= 1
        await wait_for(dead_letters_held, timeout=30, interval=1, what="dead-letter topic sizes")
    finally:
        stopped = await asyncio.to_thread(subprocess.run, [str(OPS), "stop"], env=ops_env, capture_output=True,
                                          text=True, timeout=60)
        await asyncio.gather(api_proc.stop(), stamping.stop())
        ok.close()
        refusing_hook.close()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _async(predicate):
    async def check():
        return predicate()
    return check
