"""The deadline day as a report (issue 12, point 5): a compressed CPNS peak, with faults, beside a baseline.

September 2024, compressed: arrivals ramp up, hold a plateau, and a late spike comes before the
deadline; channels of unequal size (one national channel with over half the applicants, down to a
small one); applicants' purchases flow beside their stamp requests. Mid-plateau, three faults hit the
platform the way production produces them:

1. a stamping worker is SIGKILLed (its whole process group, signing children too) and started again
   5 s later by ``bubuh up``, as an orchestrator restarts a pod;
2. PostgreSQL goes read-only for 10 s (``tests/faults.py``'s ``read_only_failover``: the cluster
   comes back as a hot standby and is then promoted, what a failover looks like from a client);
3. the Kafka broker is restarted (``deploy/local/kafka.sh stop`` then ``start``).

Each fault records what was seen from outside (the killed pid gone and a new one serving, write probes
refused during the read-only window, the broker's port closed and a new broker pid) before any outcome
is read. Then the same arrivals (same seed, same times) are sent to the synchronous baseline
(``loadtests/sync_baseline.py``: the same engine stamping inside the request, one process per core,
no queue, no database) with the same 30 s client timeout: what a central issuer gets from the day.

After the closed loop that measures the sustainable rate, the engine alone stamps the same letter at the
platform's PAdES level (its key, TSA and revocation sources) in two processes for a few seconds, so each
round states the platform's end-to-end rate as a share of its engine's, measured in the same run (issue
12, point 1 asks >= 30%).

``--rounds N`` plays the whole day N times (each with its sustainable rate measured first, faults
and baseline included): the report gives every round's headline figures and their medians, the
details and plots of the median round (by requests left unanswered), and a check holds only if it
held in every round. ``make surge-deadline`` plays 3.

Arrivals are open loop (each has its time fixed in advance: a Poisson process, thinned for the ramp)
and latencies run from that time. Accepted requests are read again when their ETA says, as a channel
planning by it would. The platform's own metrics are scraped every 5 s for the throughput of each
tier. Written: ``--out`` (JSON) and five PNG plots beside it; ``--readme`` puts the summary between
the ``surge:deadline-day`` markers.

    make up && python -m loadtests.deadline_day --out loadtests/results/surge.json --readme README.md

Absolute figures move with the machine (two shared cores here: Kafka, PostgreSQL, the test PKI, the
platform, the baseline and this load generator): read the platform next to the baseline of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import heapq
import json
import math
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import corpus  # noqa: E402
from loadtests.bench_engine import measure_processes  # noqa: E402
from loadtests.load_client import TICKET_HEADER, TRANSPORT_ERRORS, Answer, LoadClient, bearer  # noqa: E402
from loadtests.open_loop import rate_arguments, sustainable_rate  # noqa: E402
from loadtests.readme import measure_and_publish  # noqa: E402
from loadtests.surge import _bubuh, add_channels, log  # noqa: E402

SHARES = (0.55, 0.25, 0.12, 0.08)    # channels of unequal size: a national one down to a small one
RAMP_FROM, PLATEAU_SHARE, SPIKE_FACTOR = 0.1, 0.8, 3.0   # of the sustainable rate
TIMEOUT_S = 30.0                     # the client's timeout, the same for the platform and the baseline
SENDERS = 256                        # requests in flight at most (each on its own connection) ...
READERS = 16                         # status reads in flight at most
SCRAPE_EVERY_S = 5.0
SCRAPE_TIMEOUT_S = 4.0                # below SCRAPE_EVERY_S: a round never runs into the next
BUCKET_S = 10.0                      # the plots' and the tables' time resolution
PURCHASE_UNITS = 10                  # an applicant group's purchase: 10 stamps' worth
PURCHASE_LEAD_S = 40.0               # bought this long before the stamps that use it arrive
CREDIT_WAIT_S = 60.0                 # a stamp short of credit waits this long past its channel's last purchase
ETA_WITHIN = 0.25
ENGINE_PROCESSES = 2                 # the engine's rate that point 1 compares with: one process a core ...
OF_ENGINE = 0.30                     # ... of which the platform's end-to-end stamps/s should reach this share
# what is injected, when (a fraction of the plateau), for how long the fault itself lasts
FAULTS = (("worker_killed", 1 / 8, 5.0), ("postgres_read_only", 3 / 8, 10.0), ("broker_restarted", 5 / 8, 0.0))
FAULT_NAMES = {"worker_killed": "stamping worker SIGKILLed", "postgres_read_only": "PostgreSQL read-only 10 s",
               "broker_restarted": "Kafka broker restarted"}
# the throughput of each tier, from the platform's own counters: (metric, labels that must match)
TIERS = {
    "intake (202s)": ("bubuh_http_requests_total", {"route": "/v1/stamps", "status": "202"}),
    "purchase (confirmed)": ("bubuh_purchases_total", {"outcome": "confirmed"}),
    "quota (reservations)": ("bubuh_ledger_operations_total", {"operation": "reserve"}),
    "stamping (completed)": ("bubuh_stamp_outcomes_total", {"outcome": "completed"}),
    "notification (recorded)": ("bubuh_notifications_recorded_total", {}),
}
PLOTS = ("throughput", "intake-latency", "queue-eta", "channels", "baseline")
README_BEGIN = "<!-- surge:deadline-day:begin (make surge writes this report) -->"
README_END = "<!-- surge:deadline-day:end -->"
META = json.dumps({"account_id": "applicants", "page": 1, "llx": 400, "lly": 60, "urx": 540, "ury": 200})


# --- the day's shape ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    start: float          # multiple of the sustainable rate at the phase's start ...
    end: float            # ... and at its end (linear in between)


def phases(ramp_s: float, plateau_s: float, spike_s: float) -> list[Phase]:
    return [Phase("ramp", ramp_s, RAMP_FROM, PLATEAU_SHARE), Phase("plateau", plateau_s, PLATEAU_SHARE, PLATEAU_SHARE),
            Phase("spike", spike_s, SPIKE_FACTOR, SPIKE_FACTOR)]


def rate_at(shape: list[Phase], rate: float, t: float) -> tuple[float, str]:
    """Arrivals/s at ``t`` seconds into the day, and the phase's name ("drain" after the last)."""
    start = 0.0
    for p in shape:
        if t < start + p.seconds:
            return rate * (p.start + (p.end - p.start) * (t - start) / p.seconds), p.name
        start += p.seconds
    return 0.0, "drain"


@dataclass(frozen=True)
class Arrival:
    t: float              # seconds after the start
    phase: str
    channel: int


def schedule(shape: list[Phase], rate: float, shares: tuple[float, ...], seed: int) -> list[Arrival]:
    """Every stamp request's time and channel: a Poisson process of rate ``rate_at`` (thinning, so the
    ramp rises smoothly), each arrival's channel drawn by ``shares``."""
    rng = random.Random(seed)
    top = rate * max(max(p.start, p.end) for p in shape)
    total = sum(p.seconds for p in shape)
    out, t = [], 0.0
    channels = range(len(shares))
    while True:
        t += rng.expovariate(top)
        if t >= total:
            return out
        here, name = rate_at(shape, rate, t)
        if rng.random() * top < here:
            out.append(Arrival(t, name, rng.choices(channels, weights=shares)[0]))


def purchases(arrivals: list[Arrival], channels: int, units: int = PURCHASE_UNITS,
              lead_s: float = PURCHASE_LEAD_S) -> list[tuple[float, int, int]]:
    """(time, channel, quantity) of the purchases that pay for the day: ``units`` at a time, each bought
    ``lead_s`` before the first stamp it pays for; everything due before the start is one purchase at
    time 0 per channel (bought before the clock starts)."""
    out: list[tuple[float, int, int]] = []
    upfront = [0] * channels
    count = [0] * channels
    for a in arrivals:
        if count[a.channel] % units == 0:
            when = a.t - lead_s
            if when <= 0:
                upfront[a.channel] += units
            else:
                out.append((when, a.channel, units))
        count[a.channel] += 1
    return sorted([(0.0, c, n) for c, n in enumerate(upfront) if n] + out)


def units_needed(arrivals: list[Arrival], channels: int) -> list[int]:
    """Per arrival, the units its channel must have credited before it is sent: one more than the
    channel's stamps before it (each takes one unit)."""
    count = [0] * channels
    out = []
    for a in arrivals:
        count[a.channel] += 1
        out.append(count[a.channel])
    return out


class Credits:
    """What a channel does before it sends a stamp: it waits until the account holds the unit the stamp
    will take (``GET /v1/accounts/{id}/quota``, docs/channels.md). A purchase is accepted (202) before it
    is credited, and when the broker was down its retries ran for minutes; sent at its time regardless,
    a stamp whose purchase had not landed was refused ``QUOTA_INSUFFICIENT`` (846 of round 1's stamps,
    3 December). The quota is read only while a stamp is short, once at a time per channel; a stamp
    waits at most ``give_up_s`` past the end of the day's purchases of its channel, then goes anyway
    (and is refused, which the report shows)."""

    def __init__(self, client: LoadClient, headers: list[dict], give_up_s: float = CREDIT_WAIT_S,
                 every_s: float = 0.5) -> None:
        self._client = client
        self._headers = headers
        self._credited = [0] * len(headers)
        self._reading = [asyncio.Lock() for _ in headers]
        self._buying = [0] * len(headers)          # purchases of the channel not yet ended
        self._bought_at: list[float | None] = [None] * len(headers)
        self._give_up_s = give_up_s
        self._every_s = every_s

    def buying(self, c: int) -> None:
        self._buying[c] += 1

    def bought(self, c: int) -> None:
        self._buying[c] -= 1
        self._bought_at[c] = time.monotonic()

    def _given_up(self, c: int) -> bool:
        done = self._bought_at[c]
        return self._buying[c] == 0 and done is not None and time.monotonic() - done > self._give_up_s

    async def _read(self, c: int) -> None:
        try:
            r = await self._client.get("/v1/accounts/applicants/quota", headers=self._headers[c])
        except TRANSPORT_ERRORS:
            return
        if r.status_code == 200:
            self._credited[c] = max(self._credited[c], int(r.json().get("credited") or 0))

    async def wait(self, c: int, need: int) -> float:
        """Until channel ``c`` has ``need`` units credited (or gives up); the seconds waited."""
        started = time.monotonic()
        while self._credited[c] < need and not self._given_up(c):
            async with self._reading[c]:
                if self._credited[c] < need:
                    await self._read(c)
                    if self._credited[c] < need:
                        await asyncio.sleep(self._every_s)
        return time.monotonic() - started


# --- the platform's metrics, scraped --------------------------------------------------------------


@dataclass
class Scrapes:
    """Every ``SCRAPE_EVERY_S``, each platform process's /metrics: the series ``TIERS`` and the queue depth."""

    targets: dict[str, int]                                     # process -> metrics port
    samples: list[tuple[float, str, str, float]] = field(default_factory=list)   # (t, process, tier, value)
    depths: dict[float, float] = field(default_factory=dict)     # scrape round's t -> queue depth (the largest)
    failed: int = 0

    def take(self, t: float, process: str, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "bubuh_stamp_queue_depth_requests":
                    self.depths[t] = max(self.depths.get(t, 0.0), s.value)   # one process keeps it, others 0
                for tier, (metric, labels) in TIERS.items():
                    if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                        totals[tier] = totals.get(tier, 0.0) + s.value
        for tier, value in totals.items():
            self.samples.append((t, process, tier, value))

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        """A round every ``SCRAPE_EVERY_S`` on the clock, each process scraped at once (not one after the
        other: in the spike an API process's /metrics took seconds, and in turn seven of them spaced the
        samples 25 s apart on 6 December); a process that does not answer within ``SCRAPE_TIMEOUT_S`` is
        a failure of that round, and its rate is read across the gap from its next sample."""
        async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S) as client:
            due = time.perf_counter()
            while not stop.is_set():
                t = time.perf_counter() - t0
                await asyncio.gather(*(self._scrape(client, t, process, port)
                                       for process, port in self.targets.items()))
                due = max(due + SCRAPE_EVERY_S, time.perf_counter())    # a round over its time: the next at once
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), due - time.perf_counter())

    async def _scrape(self, client: httpx.AsyncClient, t: float, process: str, port: int) -> None:
        try:
            r = await client.get(f"http://127.0.0.1:{port}/metrics")
            self.take(t, process, r.text)
        except httpx.HTTPError:
            self.failed += 1          # slow, killed or restarting: its counters are read again next round

    @property
    def depth(self) -> list[tuple[float, float]]:
        return sorted(self.depths.items())

    def rates(self) -> dict[str, list[tuple[float, float]]]:
        return tier_rates(self.samples)


def tier_rates(samples: list[tuple[float, str, str, float]]) -> dict[str, list[tuple[float, float]]]:
    """Per tier, (time, events/s) between consecutive scrapes, summed over processes; a counter that
    went down (its process restarted) counts from zero, as Prometheus's ``rate()`` does."""
    last: dict[tuple[str, str], tuple[float, float]] = {}
    per: dict[str, dict[float, float]] = {}
    for t, process, tier, value in sorted(samples):
        prev = last.get((process, tier))
        last[(process, tier)] = (t, value)
        if prev is None or t <= prev[0]:
            continue
        grew = value - prev[1] if value >= prev[1] else value
        slot = round(t / SCRAPE_EVERY_S) * SCRAPE_EVERY_S
        per.setdefault(tier, {}).setdefault(slot, 0.0)
        per[tier][slot] += grew / (t - prev[0])
    return {tier: sorted(v.items()) for tier, v in per.items()}


# --- faults -----------------------------------------------------------------------------------------


async def kill_worker(env: dict, settings, t0: float) -> dict:
    from services.operator import local_processes

    name = next(n for n in local_processes.processes(settings) if n.startswith("stamping"))
    before = local_processes.pids(settings)[name]
    if not before:
        return {"seen": False, "evidence": f"{name} was not running"}
    os.killpg(before, signal.SIGKILL)
    gone_after = None
    for i in range(50):
        if local_processes.pids(settings)[name] is None:
            gone_after = round(i * 0.1, 1)
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(5)                    # an orchestrator's restart delay
    await asyncio.to_thread(_bubuh, env, "up")
    after = local_processes.pids(settings)[name]
    return {"seen": gone_after is not None and bool(after) and after != before,
            "evidence": f"{name} pid {before} SIGKILLed (process group), gone after {gone_after} s; "
                        f"`bubuh up` 5 s later started pid {after}, ready at {time.perf_counter() - t0:.1f} s"}


async def read_only(settings, seconds: float) -> dict:
    from tests import faults

    async with faults.read_only_failover(seconds, dsn=settings.database_url) as fault:
        pass
    s = fault.summary()
    refused = sum(n for outcome, n in s["probes"].items() if outcome != "ok")
    return {"seen": refused > 0 and fault.held,
            "evidence": f"write probes during the window: {s['probes']}; after: {s['after']}; "
                        f"steps: {'; '.join(w for _, w in s['steps'])}"}


async def restart_broker(port: int) -> dict:
    from tests import stack

    before = await asyncio.to_thread(stack.sh, "kafka.sh", "status")
    await asyncio.to_thread(stack.kafka_stop)
    closed = not await asyncio.to_thread(stack.port_open, port)
    started = time.perf_counter()
    await asyncio.to_thread(stack.kafka_start)
    after = await asyncio.to_thread(stack.sh, "kafka.sh", "status")
    return {"seen": closed and before != after,
            "evidence": f"before: {before}; port {port} closed after stop: {closed}; "
                        f"after ({time.perf_counter() - started:.1f} s to start): {after}"}


async def inject(env: dict, settings, shape: list[Phase], t0: float, record: list[dict]) -> None:
    plateau_at = shape[0].seconds
    kafka_port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    for kind, at, seconds in FAULTS:
        when = plateau_at + at * shape[1].seconds
        await asyncio.sleep(max(0.0, t0 + when - time.perf_counter()))
        began = time.perf_counter() - t0
        log(f"fault: {FAULT_NAMES[kind]} at {began:.0f} s")
        try:
            if kind == "worker_killed":
                seen = await kill_worker(env, settings, t0)
            elif kind == "postgres_read_only":
                seen = await read_only(settings, seconds)
            else:
                seen = await restart_broker(kafka_port)
        except (OSError, RuntimeError, subprocess.SubprocessError, SystemExit) as exc:
            # the run goes on, and the report says the fault was not produced
            seen = {"seen": False, "evidence": f"could not produce it: {exc!r}"}
        record.append({"kind": kind, "name": FAULT_NAMES[kind], "began_s": round(began, 1),
                       "ended_s": round(time.perf_counter() - t0, 1), **seen})
        log(f"fault over: {FAULT_NAMES[kind]}: seen={seen['seen']}: {seen['evidence']}")


# --- the load ---------------------------------------------------------------------------------------


@dataclass
class Sent:
    """One stamp request as the channel saw it."""

    t: float                   # scheduled, seconds after the start
    phase: str
    channel: int
    status: int | None = None  # the last answer's HTTP status; None: no answer within TIMEOUT_S
    latency_s: float | None = None
    attempts: int = 0
    error: str = ""
    request_id: str | None = None
    first_eta_s: float | None = None
    position: int | None = None
    accepted_s: float | None = None   # when the 202 came, seconds after the start
    ended_s: float | None = None      # when a read first saw it ended
    outcome: str | None = None        # completed / failed:<code>
    took_s: float | None = None       # the server's finished_at - accepted_at
    key: str = ""                     # its Idempotency-Key
    late: str | None = None           # no answer in time: the status the channel's later retry was answered with
    held_s: float = 0.0               # how long the channel held it past its time, until its units were credited
    ticket: str = ""                  # the last Bubuh-Queue-Ticket a 503 gave it, sent back with each retry


async def _send(gate: asyncio.Semaphore, t0: float, sent: Sent, request) -> Answer | None:
    """One arrival, sent at its time and retried on 429/503 as the answer's Retry-After says, within
    TIMEOUT_S of the arrival (the client's total budget), with the ``Bubuh-Queue-Ticket`` of the last 503
    that gave one (docs/channels.md: it keeps the request's place in line); the latency runs from the
    scheduled time.

    ``request(timeout_s, headers)`` sends once within ``timeout_s``, with ``headers`` beside its own
    (``load_client.py``: its timeout cancels the request cleanly; with httpx a request cancelled while it
    waited for a pool connection could keep that connection's slot for good, encode/httpcore#1093, and
    the fourth deadline-day run had 131 resends waiting minutes for slots that were never freed)."""
    scheduled = t0 + sent.t + sent.held_s
    deadline = scheduled + TIMEOUT_S
    await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
    r = None
    try:
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError
            sent.attempts += 1
            async with asyncio.timeout(remaining):      # only the wait for a sender: a semaphore, safe to cancel
                await gate.acquire()
            try:
                r = await request(max(0.1, deadline - time.perf_counter()),
                                  {TICKET_HEADER: sent.ticket} if sent.ticket else {})
            finally:
                gate.release()
            if time.perf_counter() > deadline:           # answered, but after the client had given up
                raise TimeoutError
            if r.status_code not in (429, 503):
                break
            sent.ticket = r.header(TICKET_HEADER) or sent.ticket
            pause = float(r.headers.get("Retry-After") or 1)     # as docs/channels.md says, within the budget
            await asyncio.sleep(min(pause, max(0.0, deadline - time.perf_counter())))
    except TimeoutError:
        sent.status, sent.error = None, f"no answer within {TIMEOUT_S:g} s"
        return None
    except TRANSPORT_ERRORS as exc:
        sent.error = repr(exc)[:200]
        return None
    finally:
        sent.latency_s = time.perf_counter() - scheduled
    sent.status = r.status_code
    return r


async def play_platform(base_url: str, env: dict, settings, arrivals: list[Arrival], buys: list[tuple[float, int, int]],
                        shape: list[Phase], channels: int, faults_on: bool, drain_s: float) -> dict:
    drain_by = sum(p.seconds for p in shape) + drain_s     # readers give up on what has not ended by then
    creds = await add_channels(env, "deadline", channels)
    letter = corpus.a4_text(7)
    sent = [Sent(a.t, a.phase, a.channel) for a in arrivals]
    bought: list[dict] = []
    by_id: dict[str, Sent] = {}
    due: list[tuple[float, str]] = []
    fault_log: list[dict] = []
    gate = asyncio.Semaphore(SENDERS)
    from services.operator import local_processes

    scrapes = Scrapes({name: port for name, (_, port) in local_processes.metrics_targets(settings).items()})
    async with LoadClient(base_url, max_connections=SENDERS, timeout_s=TIMEOUT_S) as client, \
            LoadClient(base_url, max_connections=READERS, timeout_s=TIMEOUT_S) as reading:

        def auth(c: int) -> dict:
            return bearer(creds[c]["api_key"])

        async def buy(when: float, c: int, n: int, t0: float) -> None:
            try:
                await _buy(when, c, n, t0)
            finally:
                credits.bought(c)

        async def _buy(when: float, c: int, n: int, t0: float) -> None:
            b = Sent(when, rate_at(shape, 0, when)[1], c)
            body = {"channel_order_id": f"deadline-{secrets.token_hex(8)}", "account_id": "applicants",
                    "quantity": n, "amount": n * 10_000,
                    "paid_at": dt.datetime.fromtimestamp(time.time() + max(0.0, t0 + when - time.perf_counter()),
                                                         dt.UTC).isoformat()}
            start = t0
            for _ in range(10):    # not accepted (no answer, the database away): the same order sent again
                r = await _send(gate, start, b, lambda timeout_s, more: client.post(
                    "/v1/purchases", json=body, headers=auth(c) | more, timeout_s=timeout_s))
                if r is not None and r.status_code == 202:
                    break
                start = time.perf_counter() - b.t
            bought.append({"t": round(when, 2), "channel": c, "channel_id": creds[c]["channel_id"],
                           "channel_order_id": body["channel_order_id"], "account_id": body["account_id"],
                           "quantity": n, "amount": body["amount"], "status": b.status,
                           "latency_s": round(b.latency_s or 0, 3), "attempts": b.attempts, "error": b.error})

        credits = Credits(reading, [auth(c) for c in range(channels)])
        for _, c, _ in buys:
            credits.buying(c)
        # what is due before the clock starts, then a few seconds for the credits to land
        await asyncio.gather(*(buy(0.0, c, n, time.perf_counter()) for when, c, n in buys if when == 0.0))
        await asyncio.sleep(3)
        t0 = time.perf_counter()
        t0_wall = time.time()

        run_id = secrets.token_hex(4)
        for i, s in enumerate(sent):   # each request a key of its own: a retry is the same request (docs/channels.md)
            s.key = f"deadline-{run_id}-{i}"

        def stamp(s: Sent):
            return lambda timeout_s, more: client.post(
                "/v1/stamps", headers=auth(s.channel) | {"Idempotency-Key": s.key} | more, form={"meta": META},
                file=("letter.pdf", letter, "application/pdf"), timeout_s=timeout_s)

        async def arrive(s: Sent, need: int) -> None:
            await asyncio.sleep(max(0.0, t0 + s.t - time.perf_counter()))
            s.held_s = await credits.wait(s.channel, need)     # a channel sends only what is paid for
            r = await _send(gate, t0, s, stamp(s))
            if r is not None and r.status_code == 202:
                body = r.json()
                s.request_id, s.first_eta_s = body["request_id"], body.get("eta_seconds")
                s.position = body.get("position")
                s.accepted_s = time.perf_counter() - t0
                by_id[s.request_id] = s
                heapq.heappush(due, (time.perf_counter() + max(1.0, s.first_eta_s or 1.0), s.request_id))
            elif r is not None:
                with contextlib.suppress(ValueError):
                    s.error = r.json().get("code", "")

        reads: dict[str, int] = {}

        async def reader() -> None:
            while time.perf_counter() < t0 + drain_by:
                if not due:
                    if sending.done():
                        return
                    await asyncio.sleep(0.1)
                    continue
                when, rid = heapq.heappop(due)
                await asyncio.sleep(max(0.0, when - time.perf_counter()))
                s = by_id[rid]
                try:
                    r = await reading.get(f"/v1/stamps/{rid}", headers=auth(s.channel))
                except TRANSPORT_ERRORS:
                    reads["error"] = reads.get("error", 0) + 1
                    heapq.heappush(due, (time.perf_counter() + 1.0, rid))
                    continue
                reads[str(r.status_code)] = reads.get(str(r.status_code), 0) + 1
                body = r.json() if r.status_code == 200 else {}
                if not seen_ended(s, body, time.perf_counter() - t0):
                    heapq.heappush(due, (time.perf_counter() + max(1.0, body.get("eta_seconds") or 1.0), rid))

        async def progress() -> None:
            while True:
                await asyncio.sleep(30)
                t = time.perf_counter() - t0
                log(f"{t:5.0f} s {rate_at(shape, 1, t)[1]:7s} accepted {len(by_id)}/{len(sent)}, "
                    f"ended {sum(s.outcome is not None for s in sent)}, purchases {len(bought)}/{len(buys)}")

        stop = asyncio.Event()
        scraping = asyncio.ensure_future(scrapes.run(t0, stop))
        watcher = asyncio.ensure_future(progress())
        injecting = asyncio.ensure_future(inject(env, settings, shape, t0, fault_log)) if faults_on else None
        sending = asyncio.ensure_future(asyncio.gather(
            *(arrive(s, need) for s, need in zip(sent, units_needed(arrivals, channels), strict=True)),
            *(buy(when, c, n, t0) for when, c, n in buys if when > 0)))
        await asyncio.gather(sending, *(reader() for _ in range(READERS)))
        if injecting is not None:
            await injecting
        drained = time.perf_counter() - t0

        async def resend(s: Sent) -> None:
            """What a channel does with a request that got no answer: send it again with its key, until
            answered. A 202 saying other than ``queued`` means the platform had accepted it all along."""
            again = Sent(time.perf_counter() - t0, "drain", s.channel, ticket=s.ticket)
            for _ in range(20):
                r = await _send(gate, t0, again, stamp(s))
                if r is not None:
                    break
                again.t = time.perf_counter() - t0
            if r is not None and r.status_code == 202:
                body = r.json()
                s.late, s.request_id = body["status"], body["request_id"]
                by_id[s.request_id] = s
                heapq.heappush(due, (time.perf_counter() + 1.0, s.request_id))

        unanswered = [s for s in sent if s.status is None]
        if unanswered:
            log(f"the channels send the {len(unanswered)} unanswered requests again, with their keys")
            sending = asyncio.ensure_future(asyncio.gather(*(resend(s) for s in unanswered)))
            await asyncio.gather(sending, *(reader() for _ in range(READERS)))
        ledgers = [await settled(reading, creds[c], auth(c)) for c in range(channels)]
        await asyncio.sleep(SCRAPE_EVERY_S)
        stop.set()
        await scraping
        watcher.cancel()
    return {"sent": sent, "purchases": bought, "faults": fault_log, "scrapes": scrapes, "reads": reads,
            "ledgers": ledgers, "channels": creds,
            "drained_s": drained, "t0_wall": t0_wall}


def seen_ended(s: Sent, body: dict, at_s: float) -> bool:
    """Records what a status read (``body``, ``at_s`` seconds into the day) says if the request has ended:
    its outcome, and how long it took by the platform's own ``accepted_at`` and ``finished_at``."""
    if body.get("status") not in ("completed", "failed"):
        return False
    s.ended_s = at_s
    s.outcome = body["status"] if body["status"] == "completed" else f"failed:{body.get('code')}"
    if body.get("finished_at") and body.get("accepted_at"):
        s.took_s = (dt.datetime.fromisoformat(body["finished_at"])
                    - dt.datetime.fromisoformat(body["accepted_at"])).total_seconds()
    return True


async def settled(client: LoadClient, channel: dict, headers: dict, timeout: float = 60) -> dict:
    """The channel's account as the quota ledger shows it once nothing is pending (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.get("/v1/accounts/applicants/quota", headers=headers)
        body = r.json() if r.status_code == 200 else {}
        if body.get("pending") == 0 or time.monotonic() > deadline:
            return {"channel_id": channel["channel_id"], **body}
        await asyncio.sleep(1)


async def play_baseline(url: str, arrivals: list[Arrival]) -> list[Sent]:
    letter = corpus.a4_text(7)
    sent = [Sent(a.t, a.phase, a.channel) for a in arrivals]
    gate = asyncio.Semaphore(SENDERS)
    async with LoadClient(url, max_connections=SENDERS, timeout_s=TIMEOUT_S) as client:
        t0 = time.perf_counter()

        async def arrive(s: Sent) -> None:
            r = await _send(gate, t0, s, lambda timeout_s, _: client.post(
                "/stamp", form={"meta": META}, file=("letter.pdf", letter, "application/pdf"), timeout_s=timeout_s))
            if r is not None and r.status_code == 200:
                s.outcome, s.ended_s = "completed", time.perf_counter() - t0

        async def progress() -> None:
            while True:
                await asyncio.sleep(30)
                log(f"baseline {time.perf_counter() - t0:5.0f} s: answered {sum(s.status is not None for s in sent)}, "
                    f"timed out {sum(s.error.startswith('no answer') for s in sent)} of {len(sent)}")

        watcher = asyncio.ensure_future(progress())
        await asyncio.gather(*(arrive(s) for s in sent))
        watcher.cancel()
    return sent


@contextlib.contextmanager
def baseline_server(port: int, env: dict):
    """``loadtests/sync_baseline.py`` on ``port``, one process per core, for the length of the block."""
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.sync_baseline", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                why = proc.stderr.read().decode()[-2000:] if proc.stderr and proc.poll() is not None else "no answer"
                raise SystemExit(f"the baseline did not start: {why}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)


# --- what the day says ------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def in_fault(s: Sent, windows: list[tuple[float, float]]) -> bool:
    """Whether the request was in the platform between a fault's start and its end (plus 30 s to recover):
    issue 12's ETA check counts requests outside fault windows."""
    start = s.accepted_s if s.accepted_s is not None else s.t
    end = s.ended_s if s.ended_s is not None else start
    return any(start <= b + 30 and end >= a for a, b in windows)


def eta_check(sent: list[Sent], windows: list[tuple[float, float]], biggest: int) -> dict:
    """Issue 12, point 4 on the day: completed requests outside fault windows (the biggest channel
    excluded, as a flood is from its own check); how many completed within 25% of their first ETA."""
    pairs = [(s.first_eta_s, s.took_s) for s in sent
             if s.outcome == "completed" and s.first_eta_s and s.took_s is not None
             and s.channel != biggest and not in_fault(s, windows)]
    if not pairs:
        return {"requests": 0}
    ratios = [took / eta for eta, took in pairs]
    return {"requests": len(pairs), "median_first_eta_s": round(statistics.median(e for e, _ in pairs), 1),
            "within_25_percent": round(sum(abs(r - 1) <= ETA_WITHIN for r in ratios) / len(ratios), 3),
            "took_over_eta": {q: round(_pct(ratios, v), 2) for q, v in (("p10", 0.1), ("median", 0.5), ("p90", 0.9))}}


def buckets(sent: list[Sent], horizon: float) -> list[dict]:
    """Per BUCKET_S of scheduled time: arrivals, answers by kind, latency p50 / p99 (answered ones)."""
    out = []
    for i in range(int(horizon // BUCKET_S) + 1):
        lo, hi = i * BUCKET_S, (i + 1) * BUCKET_S
        here = [s for s in sent if lo <= s.t < hi]
        if not here:
            continue
        answered = [s.latency_s for s in here if s.status is not None]
        out.append({"t": lo, "arrivals": len(here), "ok": sum(s.status in (200, 202) for s in here),
                    "timeouts": sum(s.status is None for s in here),
                    "errors": sum(s.status is not None and s.status not in (200, 202) for s in here),
                    "p50_ms": _ms(_pct(answered, 0.5)), "p99_ms": _ms(_pct(answered, 0.99))})
    return out


def unanswered_outside(sent: list[Sent], windows: list[tuple[float, float]]) -> int:
    """Requests that got no answer in 30 s though they arrived outside every fault window (+30 s)."""
    return sum(1 for s in sent if s.status is None and not any(a <= s.t + s.held_s <= b + 30 for a, b in windows))


def summarise(sent: list[Sent], shape: list[Phase], windows: list[tuple[float, float]] = ()) -> dict:
    per_phase = {}
    for name in [p.name for p in shape]:
        here = [s for s in sent if s.phase == name]
        answered = [s.latency_s for s in here if s.status is not None]
        codes: dict[str, int] = {}
        for s in here:
            key = str(s.status) if s.status is not None else "timeout"
            codes[key] = codes.get(key, 0) + 1
        per_phase[name] = {"arrivals": len(here), "answers": codes,
                           "p50_ms": _ms(_pct(answered, 0.5)), "p99_ms": _ms(_pct(answered, 0.99)),
                           "max_ms": _ms(max(answered, default=None))}
    outcomes: dict[str, int] = {}
    for s in sent:
        if s.outcome:
            outcomes[s.outcome] = outcomes.get(s.outcome, 0) + 1
    done = [s.ended_s for s in sent if s.outcome == "completed" and s.ended_s is not None]
    return {"arrivals": len(sent), "answered": sum(s.status is not None for s in sent),
            "accepted_or_stamped": sum(s.status in (200, 202) for s in sent),
            "timeouts": sum(s.status is None and s.error.startswith("no answer") for s in sent),
            "transport_errors": sum(s.status is None and not s.error.startswith("no answer") for s in sent),
            "retried": sum(s.attempts > 1 for s in sent), "outcomes": outcomes, "phases": per_phase,
            "accepted_in_the_end": sum(s.request_id is not None for s in sent),
            "unanswered_outside_faults": unanswered_outside(sent, list(windows)),
            "sent_again_answered": {k: sum(s.late == k for s in sent) for k in {s.late for s in sent if s.late}},
            "held_for_credit": {"requests": sum(s.held_s > 0.05 for s in sent),
                                "max_s": round(max((s.held_s for s in sent), default=0.0), 1)},
            "last_completed_s": round(max(done), 1) if done else None}


def channel_times(sent: list[Sent], shares: tuple[float, ...]) -> list[dict]:
    out = []
    for c, share in enumerate(shares):
        took = [s.took_s for s in sent if s.channel == c and s.took_s is not None and s.outcome == "completed"]
        out.append({"channel": c, "share": share, "completed": len(took),
                    **{f"{q}_s": round(v, 2) if (v := _pct(took, x)) is not None else None
                       for q, x in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}})
    return out


def ledger_check(raw: dict) -> list[dict]:
    """Per channel: what it bought (accepted) and what completed, against the quota ledger's account:
    credited = bought, committed = completed, nothing pending."""
    out = []
    for c, ledger in enumerate(raw["ledgers"]):
        bought = sum(b["quantity"] for b in raw["purchases"] if b["channel"] == c and b["status"] == 202)
        completed = sum(1 for s in raw["sent"] if s.channel == c and s.outcome == "completed")
        out.append({"channel": c, "bought": bought, "completed": completed, "credited": ledger.get("credited"),
                    "committed": ledger.get("committed"), "pending": ledger.get("pending"),
                    "exact": (ledger.get("credited"), ledger.get("committed"), ledger.get("pending"))
                    == (bought, completed, 0)})
    return out


def reconcile(env: dict, raw: dict) -> list[dict]:
    """``bubuh reconcile`` per channel: its accepted orders (a CSV, as a channel keeps them) against the
    purchase service's confirmed purchases and the ledger's credits; exit code 0 when they match."""
    import csv
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, cred in enumerate(raw["channels"]):
            path = Path(tmp) / f"orders-{c}.csv"
            with path.open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["channel_order_id", "account_id", "quantity", "amount"])
                for b in raw["purchases"]:
                    if b["channel"] == c and b["status"] == 202:
                        w.writerow([b["channel_order_id"], b["account_id"], b["quantity"], b["amount"]])
            done = subprocess.run([sys.executable, "-m", "services.operator.cli", "reconcile", str(path),
                                   "--channel", cred["channel_id"]], env=env, capture_output=True, text=True,
                                  timeout=300)
            out.append({"channel": c, "exit_code": done.returncode,
                        "output": (done.stdout + done.stderr).strip().splitlines()[0][:300] if
                        (done.stdout + done.stderr).strip() else ""})
    return out


def open_requests(sent: list[Sent], step: float = 1.0) -> tuple[list[float], list[int]]:
    """(times, how many of the day's requests were accepted and not yet seen ended) every ``step`` s."""
    events = sorted([(s.accepted_s, 1) for s in sent if s.accepted_s is not None]
                    + [(s.ended_s, -1) for s in sent if s.accepted_s is not None and s.ended_s is not None])
    times, counts, level, i = [], [], 0, 0
    t, end = 0.0, (events[-1][0] if events else 0.0)
    while t <= end + step:
        while i < len(events) and events[i][0] <= t:
            level += events[i][1]
            i += 1
        times.append(t)
        counts.append(level)
        t += step
    return times, counts


# --- the plots ----------------------------------------------------------------------------------------


def with_gaps(series: list[tuple[float, float]], every_s: float) -> tuple[list[float], list[float]]:
    """x and y of a series sampled every ``every_s``, with a break (NaN) where samples are missing, so a
    plot leaves the gap empty instead of drawing a straight line across it."""
    xs: list[float] = []
    ys: list[float] = []
    for t, v in series:
        if xs and t - xs[-1] > 1.5 * every_s:
            xs.append((xs[-1] + t) / 2)
            ys.append(math.nan)
        xs.append(t)
        ys.append(v)
    return xs, ys


def plot(result: dict, raw: dict, out_dir: Path, stem: str) -> dict[str, str]:
    """The five PNGs issue 12 asks for, beside the JSON; returns {plot: path}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{stem}-{name}.png" for name in PLOTS}
    faults = result["faults"]

    def shade(ax) -> None:
        for f in faults:
            ax.axvspan(f["began_s"], max(f["ended_s"], f["began_s"] + 2), color="tab:red", alpha=0.15)
            ax.text(f["began_s"], 1.0, f" {f['kind']}", transform=ax.get_xaxis_transform(), fontsize=7,
                    va="top", rotation=90, color="tab:red")
        at = 0.0
        for p in result["shape"][:-1]:
            at += p["seconds"]
            ax.axvline(at, color="grey", lw=0.8, ls=":")

    # 1. each tier's throughput (the platform's counters) and the arrivals
    fig, ax = plt.subplots(figsize=(11, 5))
    for tier, series in result["tier_rates"].items():
        if series:
            ax.plot(*with_gaps(series, SCRAPE_EVERY_S), label=tier, lw=1.2)
    arr = result["platform"]["buckets"]
    ax.step([b["t"] for b in arr], [b["arrivals"] / BUCKET_S for b in arr], where="post", color="black", lw=1,
            ls="--", label="stamp arrivals (offered)")
    shade(ax)
    ax.set(xlabel="seconds into the day", ylabel="per second", title="Throughput per tier (scraped every 5 s)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(paths["throughput"], dpi=110)
    plt.close(fig)

    # 2. intake latency over time, the platform
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for key, style in (("p50_ms", "-"), ("p99_ms", "-")):
        ax.plot([b["t"] for b in arr], [b[key] for b in arr], style, label=f"POST /v1/stamps {key[:3]}")
    ax.axhline(300, color="tab:green", ls="--", lw=0.8, label="300 ms (plateau target)")
    ax.axhline(1000, color="tab:orange", ls="--", lw=0.8, label="1 s (spike target)")
    shade(ax)
    ax.set_yscale("log")
    ax.set(xlabel="seconds into the day (arrival time)", ylabel="ms from arrival to answer",
           title="Stamp intake latency, per 10 s of arrivals (retries after 503 included)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["intake-latency"], dpi=110)
    plt.close(fig)

    # 3. queue depth and ETA error
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    depth = raw["scrapes"].depth
    a1.plot(*with_gaps(depth, SCRAPE_EVERY_S),
            label="bubuh_stamp_queue_depth_requests (scraped, all channels)")
    a1.plot(*open_requests(raw["sent"]), label="this day's requests accepted, not yet seen ended (the channels' view)")
    a1.set(ylabel="requests not yet finished", title="Queue depth")
    shade(a1)
    a1.legend(fontsize=8)
    pts = [(s.accepted_s, s.took_s / s.first_eta_s) for s in raw["sent"]
           if s.took_s is not None and s.first_eta_s and s.accepted_s is not None]
    a2.scatter([p[0] for p in pts], [p[1] for p in pts], s=2, alpha=0.3)
    a2.axhspan(1 - ETA_WITHIN, 1 + ETA_WITHIN, color="tab:green", alpha=0.15, label="within 25% of the first ETA")
    a2.set_yscale("log")
    a2.set(xlabel="seconds into the day (accepted)", ylabel="took / first ETA", title="ETA error")
    shade(a2)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["queue-eta"], dpi=110)
    plt.close(fig)

    # 4. per-channel completion times
    fig, ax = plt.subplots(figsize=(9, 4.5))
    shares = result["shares"]
    data = [[s.took_s for s in raw["sent"] if s.channel == c and s.took_s is not None] or [0]
            for c in range(len(shares))]
    ax.boxplot(data, whis=(1, 99), showfliers=False)
    ax.set_xticks(range(1, len(shares) + 1),
                  [f"channel {c}\n{share:.0%} of arrivals" for c, share in enumerate(shares)])
    ax.set(ylabel="seconds, 202 to completed (whiskers p1-p99)", title="Completion time per channel")
    fig.tight_layout()
    fig.savefig(paths["channels"], dpi=110)
    plt.close(fig)

    # 5. the baseline: latency and timeouts, beside the platform's intake p99
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    base = result["baseline"]["buckets"]
    a1.plot([b["t"] for b in base], [b["p50_ms"] for b in base], label="baseline p50 (stamped in the request)")
    a1.plot([b["t"] for b in base], [b["p99_ms"] for b in base], label="baseline p99")
    a1.plot([b["t"] for b in arr], [b["p99_ms"] for b in arr], ls="--", label="platform intake p99 (202)")
    a1.axhline(TIMEOUT_S * 1000, color="tab:red", ls=":", lw=0.8, label="client timeout (30 s)")
    a1.set_yscale("log")
    a1.set(ylabel="ms from arrival to answer", title="Synchronous baseline: latency")
    a1.legend(fontsize=8)
    a2.bar([b["t"] for b in base], [b["timeouts"] for b in base], width=BUCKET_S * 0.9, align="edge",
           color="tab:red", label="baseline: no answer in 30 s")
    a2.bar([b["t"] for b in base], [b["errors"] for b in base], width=BUCKET_S * 0.9, align="edge",
           bottom=[b["timeouts"] for b in base], color="tab:orange", label="baseline: error answers")
    a2.set(xlabel="seconds into the day (arrival time)", ylabel="requests per 10 s", title="Baseline: lost requests")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["baseline"], dpi=110)
    plt.close(fig)
    return {k: str(v) for k, v in paths.items()}


# --- the report -----------------------------------------------------------------------------------------


def verdict(result: dict) -> dict[str, bool]:
    p = result["platform"]["summary"]
    return {
        "every fault was seen": bool(result["faults"]) and all(f["seen"] for f in result["faults"]),
        "every accepted request ended, completed": p["outcomes"].get("completed", 0) == p["accepted_in_the_end"] > 0,
        "outside fault windows (+30 s), every request answered within 30 s": p["unanswered_outside_faults"] == 0,
        "every purchase accepted": result["purchases"]["accepted"] == result["purchases"]["count"] > 0,
        "every channel's orders reconcile (bubuh reconcile)": all(r["exit_code"] == 0 for r in result["reconcile"]),
        "every account exact: credited = bought, committed = completed, none pending":
            all(x["exact"] for x in result["ledger"]),
    }


def headline(r: dict) -> dict:
    """One round's figures that issue 12 states targets for, and the checks."""
    p = r["platform"]["summary"]
    biggest = max(range(len(r["shares"])), key=lambda c: r["shares"][c])
    small = [c["p90_s"] for c in r["channels"] if c["channel"] != biggest and c["p90_s"] is not None]
    return {"stamps_per_s": r["rate_per_s"], "engine_stamps_per_s": r.get("engine", {}).get("stamps_per_s"),
            "of_engine": r.get("of_engine"), "arrivals": p["arrivals"], "unanswered": p["timeouts"],
            "unanswered_outside_faults": p["unanswered_outside_faults"],
            "plateau_p99_ms": p["phases"].get("plateau", {}).get("p99_ms"),
            "spike_p99_ms": p["phases"].get("spike", {}).get("p99_ms"),
            "median_first_eta_s": r["eta"].get("median_first_eta_s"),
            "eta_within_25_percent": r["eta"].get("within_25_percent"),
            "small_channels_worst_p90_s": max(small, default=None),
            "biggest_channel_p90_s": r["channels"][biggest]["p90_s"],
            "baseline_unanswered": r["baseline"]["summary"]["timeouts"],
            "checks_held": all(r["verdict"].values())}


def combine(rounds: list[dict]) -> dict:
    """Several rounds as one report: the median round in full (by requests left unanswered, then the
    plateau's p99), every round's headline, their medians, and each check held only if it held in every
    round (a guarantee that held in two days of three did not hold)."""
    heads = [headline(r) for r in rounds]
    order = sorted(range(len(rounds)), key=lambda i: (heads[i]["unanswered"], heads[i]["plateau_p99_ms"] or 0.0))
    mid = order[len(order) // 2]
    medians = {}
    for key in heads[0]:
        values = [h[key] for h in heads if isinstance(h[key], int | float) and not isinstance(h[key], bool)]
        if values:
            medians[key] = round(statistics.median(values), 3)
    verdict_all = {check: all(r["verdict"].get(check, False) for r in rounds) for check in rounds[mid]["verdict"]}
    return {**rounds[mid], "median_round": mid + 1, "rounds": heads, "medians": medians, "verdict": verdict_all}


def rounds_markdown(r: dict) -> list[str]:
    if len(r.get("rounds", [])) < 2:
        return []
    lines = ["| round | stamps/s (closed loop) | engine alone, share | arrivals | unanswered in 30 s (outside faults) "
             "| plateau p99 ms | spike p99 ms | first ETA median s, within 25% | small channels' worst p90 s, "
             "biggest's | baseline unanswered | checks held |", "|---|---:|---|---:|---|---:|---:|---|---|---:|---|"]
    rows = [*((str(i), h) for i, h in enumerate(r["rounds"], 1)), ("**median**", r["medians"])]
    for name, h in rows:
        eta = h.get("eta_within_25_percent")
        held = h.get("checks_held")
        share = h.get("of_engine")
        lines.append(f"| {name} | {h.get('stamps_per_s')} | {h.get('engine_stamps_per_s', '-')}, "
                     f"{f'{share:.0%}' if share is not None else '-'} | {h.get('arrivals')} | {h.get('unanswered')} "
                     f"({h.get('unanswered_outside_faults')}) | {h.get('plateau_p99_ms')} | {h.get('spike_p99_ms')} | "
                     f"{h.get('median_first_eta_s')}, {f'{eta:.0%}' if eta is not None else '-'} | "
                     f"{h.get('small_channels_worst_p90_s')}, {h.get('biggest_channel_p90_s')} | "
                     f"{h.get('baseline_unanswered')} | {'-' if held is None else 'yes' if held else 'no'} |")
    lines += ["", f"{len(r['rounds'])} rounds, one after the other, each with its own sustainable rate, faults and "
              f"baseline. Below: round {r['median_round']} in full (the median by requests left unanswered), its "
              "plots; a check reads yes only if it held in every round.", ""]
    return lines


def held_for_credit(summary: dict) -> str:
    h = summary.get("held_for_credit") or {}
    if not h.get("requests"):
        return "no stamp waited for its units to be credited"
    return (f"{h['requests']} stamps held by their channel until their units were credited "
            f"(at most {h['max_s']} s; their intake times count from when they were sent)")


def markdown(r: dict) -> str:
    p, b = r["platform"]["summary"], r["baseline"]["summary"]
    lines = [*rounds_markdown(r),
             "| phase | arrivals/s | seconds | platform intake p50 / p99 / max ms | platform answers | "
             "baseline p50 / p99 / max ms | baseline answers |", "|---|---|---:|---|---|---|---|"]
    for ph in r["shape"]:
        pp, bp = p["phases"][ph["name"]], b["phases"][ph["name"]]
        rate = f"{ph['from_per_s']}-{ph['to_per_s']}" if ph["from_per_s"] != ph["to_per_s"] else f"{ph['to_per_s']}"
        lines.append(f"| {ph['name']} | {rate} | {ph['seconds']:g} | "
                     f"{pp['p50_ms']} / {pp['p99_ms']} / {pp['max_ms']} | "
                     f"{pp['answers']} | {bp['p50_ms']} / {bp['p99_ms']} / {bp['max_ms']} | {bp['answers']} |")
    lines += ["", f"- **Platform**: {p['arrivals']} stamp requests, {p['accepted_or_stamped']} accepted "
              f"({p['retried']} sent more than once after a 503), {p['timeouts']} without an answer in 30 s "
              f"(sent again "
              f"afterwards with their keys, answered {p['sent_again_answered'] or '-'}: `queued` is new, anything "
              f"else had been accepted all along); outcomes "
              f"{p['outcomes']}; the last completed {p['last_completed_s']} s into the day "
              f"(the arrivals end at {r['arrivals_end_s']:g} s); {r['purchases']['count']} purchases beside them "
              f"({r['purchases']['accepted']} accepted, {r['purchases']['retried']} after a retry); "
              f"{held_for_credit(p)}.",
              f"- **Synchronous baseline**, the same arrivals: {b['accepted_or_stamped']} stamped, "
              f"**{b['timeouts']} without an answer in 30 s** ({b['timeouts'] / max(1, b['arrivals']):.0%}), "
              f"{b['transport_errors']} transport errors; the last stamped {b['last_completed_s']} s into the day.",
              f"- Sustainable rate: **{r['rate_per_s']} stamps/s** ({r['rate_source']}); channels' shares "
              f"{', '.join(f'{s:.0%}' for s in r['shares'])}."]
    e = r.get("engine")
    if e and r.get("of_engine") is not None:
        lines.append(f"- The engine alone at the same level ({e['level'].upper()}, the same key, letter and TSA), "
                     f"measured in this round: **{e['stamps_per_s']} stamps/s** with {e['processes']} processes "
                     f"({e['cores_used']} cores busy); the platform's closed loop is **{r['of_engine']:.0%}** of it "
                     f"(issue 12 asks >= {OF_ENGINE:.0%}: {'yes' if r['of_engine'] >= OF_ENGINE else '**no**'}).")
    e = r["eta"]
    if e.get("requests"):
        lines.append(f"- First ETAs (outside fault windows, the biggest channel excluded): median "
                     f"{e['median_first_eta_s']} s, {e['within_25_percent']:.0%} completed within 25% of it "
                     f"(took/ETA p10 {e['took_over_eta']['p10']}, median {e['took_over_eta']['median']}, "
                     f"p90 {e['took_over_eta']['p90']}).")
    lines.append("- Completion time per channel (202 to completed), p50 / p90 / p99 s: " + "; ".join(
        f"channel {c['channel']} ({c['share']:.0%}) {c['p50_s']} / {c['p90_s']} / {c['p99_s']}" for c in r["channels"]))
    for f in r["faults"]:
        lines.append(f"- Fault **{f['name']}** at {f['began_s']:g}-{f['ended_s']:g} s, seen: "
                     f"{'yes' if f['seen'] else '**no**'} ({f['evidence'][:300]})")
    for check, ok in r["verdict"].items():
        lines.append(f"- {check}: {'yes' if ok else '**NO**'}")
    lines.append(f"- Machine: {r['machine']['cores']} cores shared by Kafka, PostgreSQL, the test PKI, the platform, "
                 f"the baseline and the load generator; load average {r['machine']['loadavg_at_start']} at the start. "
                 f"Plots: {', '.join(f'`{Path(v).name}`' for v in r['plots'].values())}.")
    return "\n".join(lines)


def purchase_summary(bought: list[dict]) -> dict:
    latencies = [b["latency_s"] for b in bought if b["status"] == 202]
    return {"count": len(bought), "accepted": sum(b["status"] == 202 for b in bought),
            "retried": sum(b["attempts"] > 1 for b in bought), "units": sum(b["quantity"] for b in bought),
            "p50_ms": _ms(_pct(latencies, 0.5)), "p99_ms": _ms(_pct(latencies, 0.99))}


def _sent_json(sent: list[Sent]) -> list[dict]:
    return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.__dict__.items()} for s in sent]


def engine_rate(settings, seconds: float) -> dict:
    """Issue 12, point 1: the engine alone at the platform's PAdES level, measured in the same round as the
    platform's closed loop: two processes (one a core) stamping the same letter with the platform's key, TSA
    and revocation sources (``signer_config``), nothing else but the idle platform on the box."""
    from services.stamping.service import signer_config

    config = signer_config(settings)
    r = measure_processes(config, ENGINE_PROCESSES, seconds, corpus.a4_text(7))
    log(f"the engine alone at {config.pades_level.upper()}: {r['stamps_per_s']} stamps/s with "
        f"{ENGINE_PROCESSES} processes")
    return {**r, "level": config.pades_level}


async def measure(args, env: dict) -> dict:
    """``--rounds`` days, combined (``combine``); the plots beside ``--out`` are the median round's."""
    if args.rounds <= 1:
        return await measure_day(args, env, args.out.parent, args.out.stem)
    from services.kernel.settings import Settings

    kept = Settings().local_dir / "results"
    rounds = []
    for i in range(1, args.rounds + 1):
        log(f"round {i} of {args.rounds}")
        r = await measure_day(args, env, kept, f"{args.out.stem}-round{i}")
        (kept / f"{args.out.stem}-round{i}.json").write_text(json.dumps(r, default=str) + "\n")
        rounds.append(r)
    result = combine(rounds)
    plots = {}
    for name, path in result["plots"].items():          # the median round's plots under the report's names
        plots[name] = str(args.out.parent / f"{args.out.stem}-{name}.png")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, plots[name])
    result["plots"] = plots
    return result


async def measure_day(args, env: dict, out_dir: Path, stem: str) -> dict:
    """One day: the sustainable rate, the platform's day with its faults, the baseline's; plots as ``stem``."""
    from services.kernel.settings import Settings

    settings = Settings()
    machine = {"cores": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    rate, source = await sustainable_rate(args, env)
    engine = await asyncio.to_thread(engine_rate, settings, args.engine_seconds)
    shares = tuple(float(x) for x in args.shares.split(","))
    shape = phases(args.ramp, args.plateau, args.spike)
    arrivals = schedule(shape, rate, shares, args.seed)
    buys = purchases(arrivals, len(shares))
    log(f"the day: {len(arrivals)} stamp requests, {len(buys)} purchases over {sum(p.seconds for p in shape):g} s "
        f"at {rate:.1f} stamps/s sustainable")
    raw = await play_platform(args.base_url, env, settings, arrivals, buys, shape, len(shares), not args.no_faults,
                              args.drain_timeout)
    recon = await asyncio.to_thread(reconcile, env, raw)
    log("the synchronous baseline: the same arrivals")
    with baseline_server(args.baseline_port, env) as url:
        base_sent = await play_baseline(url, arrivals)
    sent = raw["sent"]
    horizon = sum(p.seconds for p in shape)
    windows = [(f["began_s"], f["ended_s"]) for f in raw["faults"]]
    result = {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rate_per_s": rate, "rate_source": source, "engine": engine,
        "of_engine": round(rate / engine["stamps_per_s"], 3) if engine.get("stamps_per_s") else None,
        "shares": shares, "seed": args.seed, "machine": machine,
        "shape": [{"name": p.name, "seconds": p.seconds, "from_per_s": round(rate * p.start, 1),
                   "to_per_s": round(rate * p.end, 1)} for p in shape],
        "arrivals_end_s": horizon, "faults": raw["faults"], "reconcile": recon, "ledger": ledger_check(raw),
        "platform": {"summary": summarise(sent, shape, windows), "buckets": buckets(sent, horizon),
                     "reads": raw["reads"],
                     "drained_s": round(raw["drained_s"], 1), "scrape_failures": raw["scrapes"].failed},
        "baseline": {"summary": summarise(base_sent, shape), "buckets": buckets(base_sent, horizon),
                     "processes": os.cpu_count()},
        "purchases": purchase_summary(raw["purchases"]),
        "tier_rates": {k: [(round(t, 1), round(v, 2)) for t, v in s] for k, s in raw["scrapes"].rates().items()},
        "queue_depth": [(round(t, 1), v) for t, v in raw["scrapes"].depth],
        "eta": eta_check(sent, windows, biggest=max(range(len(shares)), key=lambda c: shares[c])),
        "channels": channel_times(sent, shares),
    }
    # every request, as each side saw it: raw material (megabytes), kept beside the stack, not in the repo
    raw_out = settings.local_dir / "results" / f"{stem}-requests.json"
    raw_out.parent.mkdir(parents=True, exist_ok=True)
    raw_out.write_text(json.dumps({"platform": _sent_json(sent), "baseline": _sent_json(base_sent),
                                   "purchases": raw["purchases"]}))
    result["requests_file"] = str(raw_out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, default=str) + "\n")    # kept should a plot fail; rewritten below
    result["plots"] = plot(result, {"sent": sent, "scrapes": raw["scrapes"]}, out_dir, stem)
    result["verdict"] = verdict(result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    rate_arguments(p)
    p.add_argument("--ramp", type=float, default=90.0, help="seconds rising from 10%% to 80%% of the rate")
    p.add_argument("--plateau", type=float, default=240.0, help="seconds at 80%% (the faults fall in it)")
    p.add_argument("--spike", type=float, default=60.0, help="seconds at 3x, just before the deadline")
    p.add_argument("--shares", default=",".join(str(s) for s in SHARES), help="each channel's share of the arrivals")
    p.add_argument("--no-faults", action="store_true", help="the same day without the faults")
    p.add_argument("--drain-timeout", type=float, default=900.0,
                   help="seconds after the last arrival to wait for every accepted request to end")
    p.add_argument("--baseline-port", type=int, default=int(os.environ.get("BUBUH_BASELINE_PORT", "8090")))
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--rounds", type=int, default=1, help="days played one after the other; medians reported")
    p.add_argument("--engine-seconds", type=float, default=5.0,
                   help="seconds the engine alone stamps at the platform's level after the closed loop")
    p.add_argument("--out", type=Path, default=Path("loadtests/results/surge.json"))
    p.add_argument("--readme", type=Path)
    args = p.parse_args(argv)
    return measure_and_publish(measure, markdown, args, begin=README_BEGIN, end=README_END)


if __name__ == "__main__":
    raise SystemExit(main())
