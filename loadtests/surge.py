"""The deadline-day surge against a running platform: does the front door stay up?

September 2024: 3.5 million applicants, one deadline, channels that could not get an answer. This
scenario plays several channels at once: each buys quota and then fires stamp requests with bounded
concurrency, far faster than the stamping tier can sign. What it measures is what invariant 6 promises:
- intake answers every request (no 5xx, no timeout), with its latency per route (p50, p99);
- the backlog shows up as a queue: positions and expected completion times in the 202s;
- every accepted request ends (completed, or failed with a code) and the ledger agrees.

    make up && python -m loadtests.surge --channels 4 --stamps 400 --out loadtests/results/surge-levels.json

``--levels b-b,b-lt`` compares PAdES levels in one invocation (issue 13: B-LT keeps at least 85% of the
end-to-end stamps/s of B-B, the level before it). For each level the platform is restarted with
``bubuh down`` / ``bubuh up`` and ``BUBUH_PADES_LEVEL`` set, warmed up with a few stamps (consumer
groups joined, revocation data cached as in steady state), then surged; ``--rounds`` repeats that
with the order of the levels reversed every other round, and the medians are compared. What stays
pinned is checked, not assumed: the signing key's type, the document, PostgreSQL's ``fsync`` and
``synchronous_commit`` (SHOW, before and after), every platform producer's ``acks`` (recorded as
``make bench`` does), and the level of the stamps delivered (``pades_level`` on a few of them).
At the end the platform is restarted as it was found (the caller's environment).

    make up && python -m loadtests.surge --levels b-b,b-lt --rounds 3 --readme README.md

Absolute figures move with the machine (a shared 2-core box here); read them next to each other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import heapq
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import corpus  # noqa: E402
from loadtests.load_client import TRANSPORT_ERRORS, Answer, LoadClient, bearer  # noqa: E402
from loadtests.readme import publish, update_readme  # noqa: E402
from services.operator import process_tree  # noqa: E402

TARGET_RATIO = 0.85          # issue 13: B-LT keeps at least 85% of B-B's end-to-end stamps/s
MEMBERS_TARGET_RATIO = 0.90  # issue 12: two stamping members on two cores within 10% of one
MEMBER_SHARE = (0.40, 0.60)  # issue 12: each of two members does 40-60% of the tier's work
README_BEGIN = "<!-- surge:levels:begin (make surge-levels writes this table) -->"
README_END = "<!-- surge:levels:end -->"
README_MEMBERS_BEGIN = "<!-- surge:members:begin (make surge-members writes this table) -->"
README_MEMBERS_END = "<!-- surge:members:end -->"
README_TIERS_BEGIN = "<!-- surge:tier-members:begin (make surge-tier-members writes this table) -->"
README_TIERS_END = "<!-- surge:tier-members:end -->"
README_FAIR_BEGIN = "<!-- surge:fairness:begin (make surge-fairness writes this table) -->"
README_FAIR_END = "<!-- surge:fairness:end -->"
FAIR_FACTOR = 2.0   # issue 12: a small channel's p99 under a flood within 2x of its p99 alone


@dataclass
class Route:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def record(self, started: float, status: int | None, error: str = "") -> None:
        self.latencies.append(time.perf_counter() - started)
        if status is not None:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        if error:
            self.errors.append(error)

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)) if lat else (lambda q: None)
        return {"requests": len(lat), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0),
                "statuses": self.statuses, "errors": len(self.errors), "first_errors": self.errors[:3]}


async def add_channels(base_env: dict, prefix: str, n: int) -> list[dict]:
    """``n`` new channels (``bubuh channel add``, at once: each command is ~2 s of a process start)."""
    async def one(name: str) -> dict:
        command = [sys.executable, "-m", "services.operator.cli", "channel", "add", name, "--json"]
        out = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=True,
                                      env=base_env)
        return json.loads(out.stdout)
    return list(await asyncio.gather(*(one(f"{prefix}-{i}-{secrets.token_hex(2)}") for i in range(n))))


async def run(base_url: str, channels: int, stamps_per_channel: int, concurrency: int, env: dict,
              completed: list[tuple[str, str]] | None = None, sizes: list[tuple[int, int]] | None = None,
              held: frozenset[int] = frozenset(), applicants: int = 1) -> dict:
    """One surge; ``completed`` (if given) receives (api key, request id) of every completed stamp. ``sizes``:
    channels of unequal size, (stamps, requests in flight) each, instead of ``channels`` equal ones. A channel
    whose index is in ``held`` keeps its requests in flight *until they end* (it sends the next one when one
    completes, as a channel of few applicants does); the others count a request in flight until its 202.

    ``applicants``: the accounts of each channel. With 1, a channel buys all its stamps into one account
    (``applicants``) and stamps from it: every reservation and post of the channel writes that one row,
    the worst case for the ledger's row locks. With more, each applicant (``applicant-<k>``) buys its own
    share of the channel's stamps in a purchase of its own and stamps from its own account, as on the
    deadline day (3.5 million applicants, a stamp or two each). ``ledger`` is each channel's accounts summed."""
    routes = {"POST /v1/purchases": Route(), "POST /v1/stamps": Route(), "GET /v1/stamps/{id}": Route()}
    sizes = sizes or [(stamps_per_channel, concurrency)] * channels
    channels = len(sizes)
    creds = await add_channels(env, "surge", channels)
    for i, (c, (n, _)) in enumerate(zip(creds, sizes, strict=True)):
        c["stamps"], c["index"] = n, i
        c["accounts"] = applicant_accounts(n, applicants)
        # the account of each of the channel's stamps in turn (popped from the end): an applicant's together
        c["stamp_accounts"] = [a for a, units in c["accounts"].items() for _ in range(units)][::-1]
    letter = corpus.a4_text(7)
    accepted: list[tuple[dict, str, dict]] = []
    positions: list[tuple[float, int, float]] = []
    t0, t0_wall = time.perf_counter(), time.time()
    async with contextlib.AsyncExitStack() as clients:
        # a client (a pool) per channel, as channels are: httpcore's pool looks at each of its connections
        # whenever a request starts or ends, so one pool of every channel's connections cost the load
        # generator (on the platform's two cores) a third of its CPU in that scan (py-spy)
        for c, (_, inflight) in zip(creds, sizes, strict=True):
            c["client"] = await clients.enter_async_context(LoadClient(base_url, max_connections=inflight))

        async def call(c: dict, route: str, method: str, url: str, **kw) -> Answer | None:
            started = time.perf_counter()
            try:
                r = await c["client"].request(method, url, **kw)
            except TRANSPORT_ERRORS as exc:
                routes[route].record(started, None, repr(exc))
                return None
            routes[route].record(started, r.status_code, "" if r.status_code < 500 else r.text[:200])
            return r

        def auth(c: dict) -> dict[str, str]:
            return bearer(c["api_key"])

        async def buy(c: dict, account: str) -> None:
            units = c["accounts"][account]
            body = {"channel_order_id": f"surge-{secrets.token_hex(6)}", "account_id": account,
                    "quantity": units, "amount": units * 10_000, "paid_at": dt.datetime.now(dt.UTC).isoformat()}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:   # a new channel reaches the intake's view within moments
                r = await call(c, "POST /v1/purchases", "POST", "/v1/purchases", json=body, headers=auth(c))
                if r is not None and r.status_code == 202:
                    return
                await asyncio.sleep(0.2)
            raise SystemExit(f"channel {c['channel_id']}: purchase for {account} not accepted")

        async def quota(c: dict, account: str) -> dict:
            r = await c["client"].get(f"/v1/accounts/{account}/quota", headers=auth(c))
            return r.json() if r.status_code == 200 else {}

        async def each_account(work, accounts: list[tuple[dict, str]], at_once: int = 16) -> list:
            """``work(channel, account)`` for every account, at most ``at_once`` at a time, in order."""
            gate = asyncio.Semaphore(at_once)

            async def one(c: dict, account: str):
                async with gate:
                    return await work(c, account)
            return list(await asyncio.gather(*(one(c, a) for c, a in accounts)))

        # each channel's purchases, with as many in flight as its stamps will have
        await asyncio.gather(*(each_account(buy, [(c, a) for a in c["accounts"]], at_once=inflight)
                               for c, (_, inflight) in zip(creds, sizes, strict=True)))
        # stamping beyond the quota would be refused: wait until every account is credited (a minute at most)
        short = [(c, a) for c in creds for a in c["accounts"]]
        credit_deadline = time.perf_counter() + 60
        while short and time.perf_counter() < credit_deadline:
            seen = await each_account(quota, short)
            short = [(c, a) for (c, a), q in zip(short, seen, strict=True) if q.get("credited", 0) < c["accounts"][a]]
            if short:
                await asyncio.sleep(0.2)

        results: list[dict] = []

        async def stamper(c: dict, n: int) -> None:
            for _ in range(n):
                meta = json.dumps({"account_id": c["stamp_accounts"].pop(), "page": 1, "llx": 400, "lly": 60,
                                   "urx": 540, "ury": 200})
                r = await call(c, "POST /v1/stamps", "POST", "/v1/stamps", headers=auth(c), form={"meta": meta},
                               file=("letter.pdf", letter, "application/pdf"))
                if r is not None and r.status_code == 202:
                    body = r.json()
                    accepted.append((c, body["request_id"], body))
                    if body.get("position") is not None:
                        positions.append((time.perf_counter() - t0, body["position"], body.get("eta_seconds")))
                    if c["index"] in held:
                        await until_ended(c, body["request_id"])

        async def read_status(c: dict, rid: str) -> tuple[bool, Answer | None]:
            """One status read: (ended, the answer); an ended request's answer is recorded."""
            r = await call(c, "GET /v1/stamps/{id}", "GET", f"/v1/stamps/{rid}",
                           headers=auth(c))
            ended = r is not None and r.status_code == 200 and r.json()["status"] in ("completed", "failed")
            if ended:
                results.append(r.json())
                if completed is not None and r.json()["status"] == "completed":
                    completed.append((c["api_key"], rid))
            return ended, r

        async def until_ended(c: dict, rid: str) -> None:
            """A held channel's request, read every 0.2 s until it ends (its time is the server's finish)."""
            while True:
                await asyncio.sleep(0.2)
                if (await read_status(c, rid))[0]:
                    return

        await asyncio.gather(*(stamper(c, share) for c, (n, inflight) in zip(creds, sizes, strict=True)
                               for share in split(n, inflight)))
        intake_done = time.perf_counter() - t0

        # follow every request to its end, as channels poll: a bounded set of pollers, and each request read
        # again when its last answer's ETA says (between 0.5 and 3 s), as a channel that plans by the ETA
        # would. (Polling every 50 ms cost the load generator and the API more CPU the longer the drain took,
        # on the same two cores: the slower level paid twice.) Throughput is read from the server's own
        # finish times, so how late a poll notices the end does not count.
        due: list[tuple[float, int, dict, str]] = [(0.0, i, c, rid) for i, (c, rid, _) in enumerate(accepted)
                                                   if c["index"] not in held]
        heapq.heapify(due)

        async def poller() -> None:
            while due:
                when, i, c, rid = heapq.heappop(due)
                wait = when - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                ended, r = await read_status(c, rid)
                if not ended:
                    eta = (r.json().get("eta_seconds") if r is not None and r.status_code == 200 else None) or 1.0
                    heapq.heappush(due, (time.perf_counter() + min(3.0, max(0.5, eta)), i, c, rid))

        await asyncio.wait_for(asyncio.gather(*(poller() for _ in range(min(16, sum(c for _, c in sizes))))), 1800)
        finished = [dt.datetime.fromisoformat(r["finished_at"]).timestamp() for r in results if r.get("finished_at")]
        drained = time.perf_counter() - t0
        last_finish = (max(finished) - t0_wall) if finished else drained   # the server's clock: same box
        # the ledger commits a unit when it consumes the stamp's outcome, a moment after the status shows it:
        # read the accounts once nothing is pending any more (or report what stands after a minute)
        settle_deadline = time.perf_counter() + 60
        pending = [(c, a) for c in creds for a in c["accounts"]]
        balances: dict[tuple[str, str], dict] = {}
        while pending:
            seen = await each_account(quota, pending)
            balances.update({(c["channel_id"], a): q for (c, a), q in zip(pending, seen, strict=True)})
            pending = [(c, a) for (c, a), q in zip(pending, seen, strict=True) if q.get("pending") != 0]
            if not pending or time.perf_counter() > settle_deadline:
                break
            await asyncio.sleep(0.2)
        quotas = [{"accounts": len(c["accounts"]),
                   **{k: sum(balances.get((c["channel_id"], a), {}).get(k, 0) for a in c["accounts"])
                      for k in ("credited", "pending", "committed", "available")}} for c in creds]
        ledger_settled = time.perf_counter() - t0
    outcomes: dict[str, int] = {}
    for r in results:
        key = r["status"] if r["status"] == "completed" else f"failed:{r.get('code')}"
        outcomes[key] = outcomes.get(key, 0) + 1
    max_pos = max((p for _, p, _ in positions), default=None)
    channel_of = {rid: c["index"] for c, rid, _ in accepted}
    return {
        "per_channel": completion_times(sizes, channel_of, results),
        "eta": eta_accuracy({rid: body.get("eta_seconds") for _, rid, body in accepted}, results),
        "channels": channels, "stamps_accepted": len(accepted), "outcomes": outcomes,
        "intake_seconds": round(intake_done, 1), "drain_seconds": round(last_finish, 1),
        "stamps_per_s_end_to_end": round(len(accepted) / last_finish, 1) if last_finish else None,
        "status_reads_per_stamp": round(len(routes["GET /v1/stamps/{id}"].latencies) / max(1, len(accepted)), 2),
        "routes": {k: v.summary() for k, v in routes.items()},
        "queue": {"max_position": max_pos,
                  "max_eta_seconds": max((e for _, _, e in positions if e is not None), default=None),
                  "samples": [positions[i] for i in range(0, len(positions), max(1, len(positions) // 10))]},
        "ledger": quotas, "ledger_settle_seconds": round(ledger_settled - drained, 1),
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _quantile(ordered: list[float], q: float) -> float | None:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None


def completion_times(sizes: list[tuple[int, int]], channel_of: dict[str, int], results: list[dict]) -> list[dict]:
    """Per channel: its size, and its stamps' times from 202 to completed (the server's ``finished_at -
    accepted_at``), p50 / p99 / max in seconds: what issue 12's fairness check compares."""
    took: list[list[float]] = [[] for _ in sizes]
    for r in results:
        if r.get("status") == "completed" and r.get("finished_at") and r.get("request_id") in channel_of:
            took[channel_of[r["request_id"]]].append(
                (dt.datetime.fromisoformat(r["finished_at"]) - dt.datetime.fromisoformat(r["accepted_at"]))
                .total_seconds())
    out = []
    for (n, inflight), times in zip(sizes, took, strict=True):
        times.sort()
        out.append({"stamps": n, "in_flight": inflight, "completed": len(times), "p50_s": _quantile(times, 0.5),
                    "p99_s": _quantile(times, 0.99), "max_s": _quantile(times, 1.0)})
    return out


def applicant_accounts(stamps: int, applicants: int) -> dict[str, int]:
    """A channel's accounts and the units each buys: one account (``applicants``) for all ``stamps``, or
    ``applicant-<k>`` with shares that differ by at most one (none with nothing to buy)."""
    if applicants <= 1:
        return {"applicants": stamps}
    return {f"applicant-{k}": units for k, units in enumerate(split(stamps, applicants)) if units}


def split(n: int, parts: int) -> list[int]:
    """``n`` stamps among ``parts`` stampers, counts that differ by at most one and sum to ``n`` (80 among 32:
    sixteen of 3 and sixteen of 2; ``n // parts`` each sent 64 of the 80)."""
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


def eta_accuracy(first_eta: dict[str, float | None], results: list[dict], within: float = 0.25) -> dict:
    """How the first ETA each request was given (its 202) compares with when it completed (the server's
    ``finished_at - accepted_at``): issue 12 asks that, in a run whose median first ETA is at least
    10 s, 90% complete within 25% of it."""
    pairs = []
    for r in results:
        eta = first_eta.get(r.get("request_id"))
        if eta and r.get("finished_at") and r.get("status") == "completed":
            took = (dt.datetime.fromisoformat(r["finished_at"]) - dt.datetime.fromisoformat(r["accepted_at"]))
            pairs.append((eta, took.total_seconds()))
    return accuracy(pairs, within)


def accuracy(pairs: list[tuple[float, float]], within: float = 0.25) -> dict:
    """(ETA, time taken) pairs: how many within ``within`` of their ETA, and took/ETA's spread."""
    if not pairs:
        return {"requests": 0}
    ratios = sorted(took / eta for eta, took in pairs)
    etas = sorted(eta for eta, _ in pairs)
    return {"requests": len(pairs), "median_first_eta_s": round(etas[len(etas) // 2], 1),
            "within_25_percent": round(sum(abs(took - eta) <= within * eta for eta, took in pairs) / len(pairs), 3),
            "actual_over_eta": {"p10": round(ratios[len(ratios) // 10], 2),
                                "median": round(ratios[len(ratios) // 2], 2),
                                "p90": round(ratios[(9 * len(ratios)) // 10], 2)}}


# --------------------------------------------------------------------------------------------------
# --levels: the same surge once per PAdES level, the platform restarted for each


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _bubuh(env: dict, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "services.operator.cli", *args], env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode:
        raise SystemExit(f"bubuh {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout.strip()


def restart(env: dict) -> None:
    """``bubuh down`` then ``bubuh up`` (services/operator/local_processes.py) with ``env``: the one
    process manager the platform has."""
    log(_bubuh(env, "down"))
    log(_bubuh(env, "up"))


def scrape(port: int) -> str:
    """One process's ``/metrics`` text."""
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def stamping_metrics(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of the stamping worker's stage histograms and of its signing child's tasks."""
    body = scrape(port)
    out: dict[str, tuple[float, float]] = {}
    pattern = re.compile(r'^bubuh_(stamp_stage_seconds|document_sandbox_task_seconds)_(sum|count)'
                         r'\{(?:stage|sandbox)="([^"]+)"\} (\S+)$')
    for line in body.splitlines():
        m = pattern.match(line)
        if m:
            key = m[3] if m[1] == "stamp_stage_seconds" else f"sandbox {m[3]}"
            total, count = out.get(key, (0.0, 0.0))
            out[key] = (total + float(m[4]), count) if m[2] == "sum" else (total, count + float(m[4]))
    return out


def work_done(body: str) -> float:
    """What one process has done so far (its ``/metrics`` text): records its consumers handled plus HTTP
    requests it answered (/metrics and /healthz not counted)."""
    total = 0.0
    for line in body.splitlines():
        if line.startswith("bubuh_consumer_records_total{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("bubuh_http_requests_total{") and 'route="/metrics"' not in line \
                and 'route="/healthz"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def ledger_ways(body: str) -> dict[str, float]:
    """How one quota process (its ``/metrics`` text) applied its batches so far
    (``bubuh_ledger_batches_total`` by way) and how many it worked out again because an account
    changed (``bubuh_ledger_stale_reads_total``)."""
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = re.match(r'^bubuh_ledger_batches_total\{way="([a-z_]+)"\} (\S+)$', line)
        if m:
            out[m[1]] = out.get(m[1], 0.0) + float(m[2])
        elif line.startswith("bubuh_ledger_stale_reads_total "):
            out["stale_reads"] = out.get("stale_reads", 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _added(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b, a in zip(before, after, strict=True):
        for key, value in a.items():
            out[key] = out.get(key, 0) + round(value - b.get(key, 0.0))
    return out


def tier_shares(before: dict[str, float], after: dict[str, float], least: int = 100) -> dict[str, dict]:
    """Per tier with several members (``<tier>-<i>``): each member's share of the tier's work over the
    run, and how much work that was; a tier that did fewer than ``least`` units is marked too small
    to judge a split by."""
    tiers: dict[str, dict[str, float]] = {}
    for name in after:
        tier = name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name
        tiers.setdefault(tier, {})[name] = after[name] - before.get(name, 0.0)
    out = {}
    for tier, done in sorted(tiers.items()):
        total = sum(done.values())
        if len(done) > 1:
            out[tier] = {"work": total, "judged": total >= least,
                         "shares": [round(done[n] / total, 3) if total else 0.0 for n in sorted(done)]}
    return out


def _summed(per_member: list[dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for metrics in per_member:
        for key, (total, count) in metrics.items():
            t, c = out.get(key, (0.0, 0.0))
            out[key] = (t + total, c + count)
    return out


def member_shares(before: list[dict], after: list[dict]) -> list[float]:
    """Each stamping member's share of the stamps the tier signed over the surge."""
    signed = [a.get("signing", (0.0, 0.0))[1] - b.get("signing", (0.0, 0.0))[1]
              for b, a in zip(before, after, strict=True)]
    total = sum(signed)
    return [round(n / total, 3) for n in signed] if total else []


def stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per stamp of each stage over the surge (warm-up excluded)."""
    means = {}
    for key, (total, count) in after.items():
        t0, c0 = before.get(key, (0.0, 0.0))
        if count > c0:
            means[f"{key} ms"] = round(1000 * (total - t0) / (count - c0), 1)
    return means


async def delivered_levels(base_url: str, completed: list[tuple[str, str]], n: int = 3) -> list[str]:
    """The PAdES level of a few delivered stamps (first, middle, last), read from the files themselves."""
    import httpx

    from services.stamping.document.signature_validation import pades_level

    picks = [completed[i] for i in sorted({0, len(completed) // 2, len(completed) - 1})][:n] if completed else []
    levels = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for key, rid in picks:
            r = await client.get(f"/v1/stamps/{rid}/document", headers=bearer(key))
            levels.append(pades_level(r.content) if r.status_code == 200 else f"HTTP {r.status_code}")
    return levels


def pinned_key(env: dict) -> dict:
    from services.kernel.settings import Settings
    from services.stamping.service import signer_config

    cfg = signer_config(Settings())
    if not cfg.p12_path:
        return {"source": "PKCS#11", "module": cfg.pkcs11_module}
    from services.stamping.signing import signing_key

    cert = signing_key.load_pkcs12(cfg.p12_path, cfg.p12_password).signing_cert
    return {"source": cfg.p12_path, "type": f"{cert.public_key.algorithm.upper()}-{cert.public_key.bit_size}",
            "subject": cert.subject.human_friendly}


def cpu_snapshot(settings) -> dict[str, float]:
    """CPU seconds so far of everything on the box a surge uses, by part: each platform process and,
    apart, its children (signing and document sandboxes); the test PKI; this stack's PostgreSQL
    (postmaster with its live and reaped backends) and Kafka broker, found by their ports; and this
    load generator. A sandbox child that exits within the window takes its CPU with it (none should)."""
    import resource

    from loadtests.bench_pipeline import proc_cpu_s, server_pids, stack_ports
    from services.operator import local_processes
    from services.stamping.signing import dev_pki

    out: dict[str, float] = {}
    for name, pid in local_processes.pids(settings).items():
        if pid is not None:
            out[f"{name} process"] = proc_cpu_s(pid) or 0.0
            out[f"{name} sandboxes"] = sum(proc_cpu_s(c) or 0.0 for c in process_tree.descendants([pid]))
    try:
        pki = int((dev_pki.default_root(settings.local_dir) / "pki.pid").read_text())
        out["test PKI (TSA, OCSP, CRL)"] = proc_cpu_s(pki) or 0.0
    except (OSError, ValueError):
        pass
    servers = server_pids(*stack_ports(settings))
    out["postgres"] = sum(proc_cpu_s(p, p in servers["postmaster"]) or 0.0 for p in servers["postgres"])
    out["kafka"] = sum(proc_cpu_s(p) or 0.0 for p in servers["kafka"])
    me = resource.getrusage(resource.RUSAGE_SELF)
    out["load generator"] = me.ru_utime + me.ru_stime
    return out


def cpu_per_stamp(before: dict[str, float], after: dict[str, float], stamps: int) -> dict[str, float]:
    """CPU ms per accepted stamp of each part over a surge (purchases, intake, stamping, polls)."""
    out = {k: round(1000 * (after[k] - before[k]) / stamps, 1) for k in after if k in before and stamps}
    out["all"] = round(sum(out.values()), 1)
    return out


def postgres_log(settings) -> Path | None:
    """The local cluster's server log (Debian's pg_ctlcluster: /var/log/postgresql/postgresql-<v>-<cluster>.log)."""
    from loadtests.bench_pipeline import stack_ports

    port = stack_ports(settings)[0]
    cluster = os.environ.get("BUBUH_LOCAL_PG_CLUSTER") or ("bubuh" if port == 15432 else f"bubuh-{port}")
    logs = sorted(Path("/var/log/postgresql").glob(f"postgresql-*-{cluster}.log"))
    return logs[-1] if logs else None


_PG_LINE = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] (?:\S+ )?(LOG|DETAIL|CONTEXT|STATEMENT):\s+(.*)$")
_WAITING = re.compile(r"process \d+ still waiting for (.+) after ([\d.]+) ms")
_ACQUIRED = re.compile(r"process \d+ acquired (.+) after ([\d.]+) ms")


def lock_waits_since(log: Path | None, offset: int) -> list[dict]:
    """Lock waits PostgreSQL logged after ``offset`` (log_lock_waits: waits longer than deadlock_timeout)."""
    if log is None:
        return []
    with open(log, "rb") as f:
        f.seek(offset)
        return lock_waits(f.read().decode(errors="replace"))


def lock_waits(text: str) -> list[dict]:
    """Each lock wait in PostgreSQL's log text (the default ``log_line_prefix``, ``%m [%p] %q%u@%d``): the
    lock, what the waiting backend was doing (``in``, from CONTEXT: the relation), its statement (the
    first 120 characters), the holder, and how long it waited in all (``waited_ms``: from its
    "acquired" line, or the "still waiting" one when it never got the lock in the log)."""
    waits: list[dict] = []
    open_wait: dict[str, dict] = {}          # pid -> its wait being described (the lines that follow it)
    for line in text.splitlines():
        m = _PG_LINE.match(line)
        if not m:
            continue
        pid, kind, message = m.groups()
        if kind == "LOG":
            if w := _WAITING.match(message):
                open_wait[pid] = {"lock": w.group(1), "waited_ms": float(w.group(2)), "in": "", "statement": "",
                                  "holder": ""}
                waits.append(open_wait[pid])
                continue
            current = open_wait.pop(pid, None)
            if (a := _ACQUIRED.match(message)) and current is not None and a.group(1) == current["lock"]:
                current["waited_ms"] = float(a.group(2))
        elif pid in open_wait:
            field = {"DETAIL": "holder", "CONTEXT": "in", "STATEMENT": "statement"}[kind]
            if not open_wait[pid][field]:
                open_wait[pid][field] = message.strip()[:120]
    return waits


def _logged_line(line: str) -> dict:
    m = _WAITING.search(line)
    return {"lock": m.group(1), "waited_ms": float(m.group(2))} if m else {"lock": line[:80], "waited_ms": 0.0}


def described_waits(waits: list[dict], at_most: int = 4) -> str:
    """``n`` and, for the first few, how long and on what: ``2 (60.1 ms, accounts; 52.1 ms, channel_tags)``."""
    if not waits:
        return "0"
    waits = [w if isinstance(w, dict) else _logged_line(w) for w in waits]   # results from before waits were described

    def one(w: dict) -> str:
        relation = re.search(r'relation "([^"]+)"', w.get("in", ""))
        return f"{w['waited_ms']:.1f} ms, {relation.group(1) if relation else w['lock']}"
    more = f"; {len(waits) - at_most} more" if len(waits) > at_most else ""
    return f"{len(waits)} ({'; '.join(one(w) for w in waits[:at_most])}{more})"


def _median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["stamps_per_s_end_to_end"] or 0)
    return ordered[len(ordered) // 2]


async def compare_levels(args, env: dict) -> dict:
    from loadtests.bench_pipeline import PRODUCER_HOOK, producers_seen, server_guarantees
    from services.kernel.settings import Settings
    from services.operator.local_processes import metrics_targets

    settings = Settings()
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    members = [int(m) for m in args.members.split(",") if m.strip()] if args.members else [1]
    by_tier = bool(args.tier_members)
    as_found = env
    if by_tier:
        members = [int(m) for m in args.tier_members.split(",") if m.strip()]
        env = {**env, "BUBUH_LOCAL_LAYOUT": "tiers"}
        settings = settings.model_copy(update={"local_layout": "tiers"})
    if len(members) > 1 and len(levels) > 1:
        raise SystemExit("compare levels or members, not both at once")
    # (label, PAdES level, stamping members); labels are the table's columns
    variants = ([(f"{levels[0]} x{m}", levels[0], m) for m in members] if len(members) > 1
                else [(lv, lv, members[0]) for lv in levels])
    target = MEMBERS_TARGET_RATIO if len(members) > 1 else TARGET_RATIO
    letter = corpus.a4_text(7)
    work = Path(tempfile.mkdtemp(prefix="surge-levels-"))
    (work / "hook").mkdir()
    (work / "hook" / "sitecustomize.py").write_text(PRODUCER_HOOK)
    guarantees = {"server": await server_guarantees(settings.database_url)}
    result: dict = {
        "levels": [label for label, _, _ in variants], "rounds": args.rounds, "channels": args.channels,
        "stamps_per_channel": args.stamps, "concurrency_per_channel": args.concurrency, "target_ratio": target,
        "applicants_per_channel": args.applicants,
        "compares": ("tier members" if by_tier else "stamping members") if len(members) > 1 else "PAdES levels",
        "pinned": {"signing_key": pinned_key(env),
                   "document": {"what": "loadtests.corpus.a4_text(7), one A4 page of text", "bytes": len(letter),
                                "sha256": hashlib.sha256(letter).hexdigest()},
                   "tsa": settings.signing_tsa_url},
        "machine": {"cores": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "runs": [],
    }
    log(f"PostgreSQL fsync={guarantees['server']['fsync']}, synchronous_commit="
        f"{guarantees['server']['synchronous_commit']}; key {result['pinned']['signing_key'].get('type')}; "
        f"load {result['machine']['loadavg_at_start']}")
    try:
        for rnd in range(1, args.rounds + 1):
            for label, pades, n_members in (variants if rnd % 2 else variants[::-1]):
                level = label
                producer_log = work / f"producers-{rnd}-{label.replace(' ', '')}.jsonl"
                run_env = {**env, "BUBUH_PADES_LEVEL": pades, "BUBUH_LOCAL_STAMPING_MEMBERS": str(n_members),
                           "BUBUH_LOCAL_TIER_MEMBERS": str(n_members if by_tier else 1),
                           # members of every tier compared: the API's too (by default one per core)
                           **({"BUBUH_LOCAL_API_MEMBERS": str(n_members)} if by_tier else {}),
                           "BUBUH_BENCH_PRODUCER_LOG": str(producer_log),
                           "PYTHONPATH": os.pathsep.join(filter(None, [str(work / "hook"), env.get("PYTHONPATH")]))}
                log(f"round {rnd}, {label}: restarting the platform with BUBUH_PADES_LEVEL={pades}, "
                    f"{'BUBUH_LOCAL_TIER_MEMBERS' if by_tier else 'BUBUH_LOCAL_STAMPING_MEMBERS'}={n_members}")
                restart(run_env)
                shape = settings.model_copy(update={"local_stamping_members": n_members,
                                                    "local_tier_members": n_members if by_tier else 1,
                                                    **({"local_api_members": n_members} if by_tier else {})})
                ports = {name: port for name, (_, port) in metrics_targets(shape).items()}
                member_ports = [port for name, (_, port) in metrics_targets(shape).items()
                                if name.startswith("stamping-")]
                warm: list[tuple[str, str]] = []
                await run(args.base_url, 1, args.warmup, min(args.warmup, 4), env, warm)
                before = [stamping_metrics(port) for port in member_ports]
                metrics_before = {name: scrape(port) for name, port in ports.items()}   # once a process
                load = [round(x, 2) for x in os.getloadavg()]
                completed: list[tuple[str, str]] = []
                cpu_before = cpu_snapshot(shape)
                pg_log = postgres_log(settings)
                pg_log_at = pg_log.stat().st_size if pg_log else 0
                r = await run(args.base_url, args.channels, args.stamps, args.concurrency, env, completed,
                              applicants=args.applicants)
                r["cpu_ms_per_stamp"] = cpu_per_stamp(cpu_before, cpu_snapshot(shape), r["stamps_accepted"])
                after = [stamping_metrics(port) for port in member_ports]
                metrics_after = {name: scrape(port) for name, port in ports.items()}
                r["tier_shares"] = tier_shares({n: work_done(t) for n, t in metrics_before.items()},
                                               {n: work_done(t) for n, t in metrics_after.items()})
                r["lock_waits_over_deadlock_timeout"] = lock_waits_since(pg_log, pg_log_at)[:20]
                quota = [name for name in ports if name.startswith("quota")]
                r["ledger_batches"] = _added([ledger_ways(metrics_before[n]) for n in quota],
                                             [ledger_ways(metrics_after[n]) for n in quota])
                r.pop("queue", None)
                r.pop("ledger", None)
                r.update({"round": rnd, "level": level, "pades_level": pades, "stamping_members": n_members,
                          "loadavg_at_start": load,
                          "stage_means": stage_means(_summed(before), _summed(after)),
                          "member_shares": member_shares(before, after),
                          "delivered_levels": await delivered_levels(args.base_url, completed),
                          "platform_producers": producers_seen(producer_log)})
                stamps = r["routes"]["POST /v1/stamps"]
                log(f"round {rnd}, {level}: {r['stamps_per_s_end_to_end']} stamps/s end to end, intake p50 "
                    f"{stamps['p50_ms']} ms p99 {stamps['p99_ms']} ms, outcomes {r['outcomes']}, delivered "
                    f"{r['delivered_levels']}, stages {r['stage_means']}")
                result["runs"].append(r)
    finally:
        log("restarting the platform as it was found")
        restart(as_found)
    guarantees["server_after"] = await server_guarantees(settings.database_url)
    result["lock_wait_logging"] = await _lock_wait_logging(settings.database_url)
    result["summary"] = summarise(result, result["levels"])
    # the money path's producers (client ids bubuh-*); faust's statistics producer for queue ETAs is acks=1 by
    # design (services/stamping/throughput.py) and listed apart
    acks = {p["acks"] for r in result["runs"] for p in r["platform_producers"] if p["client_id"].startswith("bubuh")}
    guarantees["other_producers"] = sorted({f"{p['client_id']}: acks={p['acks']}" for r in result["runs"]
                                            for p in r["platform_producers"] if not p["client_id"].startswith("bubuh")})
    srv, after = guarantees["server"], guarantees["server_after"]
    guarantees["verdict"] = {
        "fsync_on": srv["fsync"] == after["fsync"] == "on",
        "synchronous_commit_on": srv["synchronous_commit"] == after["synchronous_commit"] == "on",
        "no_db_role_overrides": not srv["db_role_overrides"] and not after["db_role_overrides"],
        # aiokafka keeps acks=all as -1
        "platform_producers_acks_all": acks == {-1},
        "stamps_at_the_level_asked": all(
            r["delivered_levels"]
            and all(lv == r.get("pades_level", r["level"]).upper() for lv in r["delivered_levels"])
            for r in result["runs"]),
    }
    result["guarantees"] = guarantees
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["generated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return result


async def _lock_wait_logging(database_url: str) -> dict:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        return {"log_lock_waits": await conn.fetchval("SHOW log_lock_waits"),
                "deadlock_timeout": await conn.fetchval("SHOW deadlock_timeout")}
    finally:
        await conn.close()


def summarise(result: dict, levels: list[str]) -> dict:
    """Per level the median run's figures; each level's median stamps/s over the first level's."""
    per_level = {}
    for level in levels:
        runs = [r for r in result["runs"] if r["level"] == level]
        med = _median_run(runs)
        outcomes: dict[str, int] = {}
        for r in runs:
            for k, n in r["outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + n
        per_level[level] = {
            "stamps_per_s_runs": [r["stamps_per_s_end_to_end"] for r in runs],
            "stamps_per_s_median": statistics.median(r["stamps_per_s_end_to_end"] or 0 for r in runs),
            "intake_p50_ms_median": statistics.median(r["routes"]["POST /v1/stamps"]["p50_ms"] for r in runs),
            "intake_p99_ms_median": statistics.median(r["routes"]["POST /v1/stamps"]["p99_ms"] for r in runs),
            "drain_seconds_median": statistics.median(r["drain_seconds"] for r in runs),
            "stage_means_of_median_run": med["stage_means"],
            "cpu_ms_per_stamp_of_median_run": med.get("cpu_ms_per_stamp", {}),
            "eta_of_median_run": med.get("eta", {}),
            "member_shares_runs": [r.get("member_shares", []) for r in runs],
            "delivered_levels": sorted({lv for r in runs for lv in r["delivered_levels"]}),
            "outcomes": outcomes,
        }
    base = levels[0]
    ratios = {}
    for level in levels[1:]:
        b = per_level[base]["stamps_per_s_median"]
        ratio = per_level[level]["stamps_per_s_median"] / b if b else None
        by_round = {}
        for rnd in range(1, result["rounds"] + 1):
            pair = {r["level"]: r["stamps_per_s_end_to_end"] for r in result["runs"] if r["round"] == rnd}
            if pair.get(base) and pair.get(level) is not None:
                by_round[rnd] = round(pair[level] / pair[base], 3)
        ratios[f"{level}/{base}"] = {"ratio_of_medians": round(ratio, 3) if ratio is not None else None,
                                     "ratio_per_round": by_round,
                                     "meets_target": ratio is not None and ratio >= result["target_ratio"]}
    return {"per_level": per_level, "ratios": ratios}


def applicants_words(result: dict) -> str:
    """Whose accounts the stamps came from (``--applicants``; runs from before it had one account a channel)."""
    n = result.get("applicants_per_channel", 1)
    if n <= 1:
        return "all of a channel's stamps from one account (every reservation of a channel writes one row)"
    each = result["stamps_per_channel"] / n
    return (f"{n} applicants a channel, each buying its {each:g} stamp{'s' if each != 1 else ''} and stamping "
            "from its own account")


def markdown(result: dict) -> str:
    levels = result["levels"]
    per = result["summary"]["per_level"]
    rows = ["| measure | " + " | ".join(f"`{lv}`" for lv in levels) + " |", "|---|" + "---:|" * len(levels)]

    def row(name: str, values: list[str]) -> None:
        rows.append(f"| {name} | " + " | ".join(values) + " |")

    row("stamps/s end to end (median)", [f"{per[lv]['stamps_per_s_median']:.1f}" for lv in levels])
    row("runs (stamps/s, in round order)", [", ".join(f"{x:.1f}" for x in per[lv]["stamps_per_s_runs"])
                                            for lv in levels])
    row("`POST /v1/stamps` p50 / p99 ms (median)",
        [f"{per[lv]['intake_p50_ms_median']:.0f} / {per[lv]['intake_p99_ms_median']:.0f}" for lv in levels])
    row("seconds to drain (median)", [f"{per[lv]['drain_seconds_median']:.1f}" for lv in levels])
    stages = list(dict.fromkeys(k for lv in levels for k in per[lv]["stage_means_of_median_run"]))
    for st in stages:
        row(f"{st.replace(' ms', '')}: mean ms per stamp (median run)",
            [f"{per[lv]['stage_means_of_median_run'].get(st, 0):.0f}" for lv in levels])
    def eta(e: dict) -> str:
        if not e.get("requests"):
            return "-"
        a = e["actual_over_eta"]
        return (f"{e['median_first_eta_s']:.1f} s; {100 * e['within_25_percent']:.0f}% within 25%; "
                f"took/ETA p10 {a['p10']:.2f}, median {a['median']:.2f}, p90 {a['p90']:.2f}")
    row("first ETA (the 202's): median; completed within 25% of it (median run)",
        [eta(per[lv].get("eta_of_median_run", {})) for lv in levels])
    parts = list(dict.fromkeys(k for lv in levels for k in per[lv].get("cpu_ms_per_stamp_of_median_run", {})))
    for part in parts:
        row(f"CPU ms per stamp: {part} (median run)",
            [f"{per[lv]['cpu_ms_per_stamp_of_median_run'].get(part, 0):.1f}" for lv in levels])
    logging = result.get("lock_wait_logging", {})
    row(f"PostgreSQL lock waits over {logging.get('deadlock_timeout', '?')} (log_lock_waits="
        f"{logging.get('log_lock_waits', '?')}), all runs: how long, on what",
        [described_waits([w for r in result["runs"] if r["level"] == lv
                          for w in r.get("lock_waits_over_deadlock_timeout", [])]) for lv in levels])
    row("quota ledger batches: at once / in a transaction / worked out again (all runs)",
        [" / ".join(str(sum(r.get("ledger_batches", {}).get(k, 0) for r in result["runs"] if r["level"] == lv))
                    for k in ("at_once", "transaction", "stale_reads")) for lv in levels])
    if result.get("compares") == "stamping members":
        row("each stamping member's share of the stamps signed (per run)",
            ["; ".join("/".join(f"{100 * x:.0f}%" for x in shares) for shares in per[lv]["member_shares_runs"])
             for lv in levels])
    if result.get("compares") == "tier members":
        def shares(r: dict) -> str:
            return ", ".join(f"{tier} {'/'.join(f'{100 * x:.0f}' for x in v['shares'])}"
                             + ("" if v["judged"] else f" ({v['work']:.0f} units: too few to judge)")
                             for tier, v in r.get("tier_shares", {}).items()) or "-"
        row("each member's share of its tier's work, % (records handled + HTTP requests; per run)",
            ["; ".join(shares(r) for r in result["runs"] if r["level"] == lv) for lv in levels])
    row("outcomes (all runs)", [", ".join(f"{k} {v}" for k, v in per[lv]["outcomes"].items()) for lv in levels])
    row("level of the stamps delivered (checked)", [", ".join(per[lv]["delivered_levels"]) for lv in levels])
    rows.append("")
    for name, r in result["summary"]["ratios"].items():
        verdict = "met" if r["meets_target"] else "NOT met"
        per_round = ", ".join(f"{v:.2f}" for v in r["ratio_per_round"].values())
        rows.append(f"- **{name}: {100 * r['ratio_of_medians']:.1f}%** of the end-to-end stamps/s (medians of "
                    f"{result['rounds']} round(s); per round {per_round}); target >= "
                    f"{100 * result['target_ratio']:.0f}%: {verdict}.")
    g = result["guarantees"]
    key = result["pinned"]["signing_key"]
    doc = result["pinned"]["document"]
    rows.append(f"- Pinned: key {key.get('type', key.get('source'))}; document {doc['what']} ({doc['bytes']:,} "
                f"bytes); {result['channels']} channels x {result['stamps_per_channel']} stamps, "
                f"{result['concurrency_per_channel']} in flight each, {applicants_words(result)}; "
                f"PostgreSQL fsync={g['server']['fsync']}, "
                f"synchronous_commit={g['server']['synchronous_commit']} (before and after: "
                f"{'unchanged' if g['verdict']['fsync_on'] and g['verdict']['synchronous_commit_on'] else 'CHANGED'}"
                f"); the platform's producers (`bubuh-*`) acks=all: "
                f"{'yes' if g['verdict']['platform_producers_acks_all'] else 'NO'} (recorded in each process; "
                f"faust's queue-statistics producer: {', '.join(g.get('other_producers', [])) or 'none'});"
                f" TSA {result['pinned']['tsa']} (the stack's test PKI).")
    m = result["machine"]
    rows.append(f"- {m['cores']} cores shared by Kafka, PostgreSQL, the test PKI, the platform and the load "
                f"generator; load average {' / '.join(f'{x:.2f}' for x in m['loadavg_at_start'])} at the start, "
                f"{' / '.join(f'{x:.2f}' for x in m['loadavg_at_end'])} at the end. The platform is restarted "
                f"for each run and warmed up with a few stamps first; levels alternate order per round.")
    return "\n".join(rows)


async def compare_fairness(args, env: dict) -> dict:
    """Issue 12's fairness check as a benchmark: per round, one small channel alone, then one channel
    flooding (``--flood`` stamps, 80% of them by default) beside two small ones, on the running platform;
    each small channel's p99 from 202 to completed against the alone p99 of the same round."""
    flood, small = (args.flood, args.concurrency * 4), (args.stamps, 2)
    rounds = []
    for i in range(args.rounds):
        # a small channel keeps its requests in flight until they end (fewer applicants than it has slots):
        # counted until the 202 it sent its whole count at the door's pace, far above its share of signing, and
        # the check compared the tails of its own backlog drained at a third of the tier against all of it
        alone = await run(args.base_url, 0, 0, 0, env, sizes=[small], held=frozenset({0}))
        mixed = await run(args.base_url, 0, 0, 0, env, sizes=[flood, small, small], held=frozenset({1, 2}))
        alone_p99 = alone["per_channel"][0]["p99_s"]
        ratios = [round(c["p99_s"] / alone_p99, 2) if c["p99_s"] and alone_p99 else None
                  for c in mixed["per_channel"][1:]]
        rounds.append({"alone": alone["per_channel"][0], "mixed": mixed["per_channel"], "ratios": ratios,
                       "stamps_per_s_end_to_end": mixed["stamps_per_s_end_to_end"], "outcomes": mixed["outcomes"],
                       "routes": mixed["routes"]})
        beside = [c["p99_s"] for c in mixed["per_channel"][1:]]
        log(f"round {i + 1}: small alone p99 {alone_p99} s; beside the flood {beside} s (x{ratios}); "
            f"flood p99 {mixed['per_channel'][0]['p99_s']} s")
    worst = sorted(max(r for r in rd["ratios"] if r is not None) for rd in rounds)
    return {"compares": "fairness", "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "flood": {"stamps": flood[0], "in_flight": flood[1]},
            "small": {"stamps": small[0], "in_flight": small[1], "channels": 2, "held_until_ended": True},
            "flood_share": round(flood[0] / (flood[0] + 2 * small[0]), 2), "rounds": rounds,
            "median_worst_ratio": worst[len(worst) // 2], "target": FAIR_FACTOR,
            "meets_target": worst[len(worst) // 2] <= FAIR_FACTOR}


def fairness_markdown(result: dict) -> str:
    rows = ["| round | small channel alone: p99 s | small channels beside the flood: p99 s (x alone) "
            "| flood: p50 / p99 s | stamps/s |", "|---|---:|---|---:|---:|"]
    for i, rd in enumerate(result["rounds"], 1):
        beside = ", ".join(f"{c['p99_s']} (x{r})" for c, r in zip(rd["mixed"][1:], rd["ratios"], strict=True))
        fl = rd["mixed"][0]
        rows.append(f"| {i} | {rd['alone']['p99_s']} | {beside} | {fl['p50_s']} / {fl['p99_s']} "
                    f"| {rd['stamps_per_s_end_to_end']} |")
    f, sm = result["flood"], result["small"]
    rows.append("")
    rows.append(f"- One channel sends {f['stamps']} stamps ({f['in_flight']} in flight), {result['flood_share']:.0%} "
                f"of the run, beside {sm['channels']} channels of {sm['stamps']} ({sm['in_flight']} in flight"
                f"{', each until it ends' if sm.get('held_until_ended') else ''}); the "
                f"small channel alone first, in the same round. Worst small channel per round, median: "
                f"**x{result['median_worst_ratio']}** of its p99 alone; target <= x{result['target']}: "
                f"{'met' if result['meets_target'] else 'not met'}.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=f"http://127.0.0.1:{os.environ.get('BUBUH_HTTP_PORT', '8080')}")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--stamps", type=int, default=200, help="stamps per channel")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per channel")
    p.add_argument("--applicants", type=int, default=1,
                   help="accounts per channel: 1 buys and stamps all of a channel's stamps from one account (one "
                        "row every reservation writes); more spread them over applicants who buy their own")
    p.add_argument("--out", type=Path, default=Path("loadtests/results/surge-levels.json"))
    p.add_argument("--levels", default="", help="compare PAdES levels, e.g. b-b,b-lt (the first is the base); "
                                                "restarts the platform for each")
    p.add_argument("--rounds", type=int, default=1, help="with --levels: surges per level, order alternating")
    p.add_argument("--warmup", type=int, default=8, help="with --levels: stamps after each restart, not counted")
    p.add_argument("--readme", type=Path, help="with --levels: put the table into this README between the markers")
    p.add_argument("--render-only", action="store_true", help="measure nothing: rewrite the README from --out")
    p.add_argument("--members", default="", help="with one --levels level: compare stamping worker counts, e.g. 1,2 "
                                                 "(BUBUH_LOCAL_STAMPING_MEMBERS; issue 12: two within 10%% of one, "
                                                 "each member 40-60%% of the stamps)")
    p.add_argument("--tier-members", default="", help="with one --levels level: compare members of every tier, "
                                                      "e.g. 1,2 (BUBUH_LOCAL_LAYOUT=tiers, BUBUH_LOCAL_TIER_MEMBERS: "
                                                      "the API's share one port); each 40-60%% of its tier's work")
    p.add_argument("--fairness", action="store_true",
                   help="one channel flooding (--flood stamps, 4 x --concurrency in flight) beside two of --stamps "
                        "(2 in flight), against one of those alone, --rounds times, on the running platform")
    p.add_argument("--flood", type=int, default=320, help="with --fairness: the flooding channel's stamps")
    args = p.parse_args(argv)
    if args.fairness:
        result = (json.loads(args.out.read_text()) if args.render_only
                  else asyncio.run(compare_fairness(args, dict(os.environ))))
        publish(result, fairness_markdown(result), args.out, args.readme, begin=README_FAIR_BEGIN,
                end=README_FAIR_END)
        return 0 if result["meets_target"] else 1
    if args.levels or args.render_only:
        if args.render_only:
            result = json.loads(args.out.read_text())
        else:
            result = asyncio.run(compare_levels(args, dict(os.environ)))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        table = markdown(result)
        print(table)
        members = result.get("compares") in ("stamping members", "tier members")
        begin, end = {"stamping members": (README_MEMBERS_BEGIN, README_MEMBERS_END),
                      "tier members": (README_TIERS_BEGIN, README_TIERS_END)}.get(
                          result.get("compares"), (README_BEGIN, README_END))
        if args.readme:
            update_readme(args.readme, table, result["generated_at"], begin=begin, end=end, source=str(args.out))
        bad = sum(v["errors"] + sum(n for st, n in v["statuses"].items() if int(st) >= 500)
                  for r in result["runs"] for v in r["routes"].values())
        ok = (not bad and all(result["guarantees"]["verdict"].values())
              and all(r["meets_target"] for r in result["summary"]["ratios"].values())
              and (not members or (all(MEMBER_SHARE[0] <= x <= MEMBER_SHARE[1] for r in result["runs"]
                                       if r.get("stamping_members", 1) > 1 for x in r.get("member_shares", [0]))
                                   and all(MEMBER_SHARE[0] <= x <= MEMBER_SHARE[1] for r in result["runs"]
                                           for v in r.get("tier_shares", {}).values() if v["judged"]
                                           for x in v["shares"])
                                   and not any(r.get("lock_waits_over_deadlock_timeout") for r in result["runs"]))))
        return 0 if ok else 1
    result = asyncio.run(run(args.base_url, args.channels, args.stamps, args.concurrency, dict(os.environ),
                             applicants=args.applicants))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "queue"}, indent=2))
    print("queue:", json.dumps(result["queue"]["max_position"]), "max position,",
          result["queue"]["max_eta_seconds"], "s max expected time")
    bad = sum(v["errors"] for v in result["routes"].values()) + sum(
        n for r in result["routes"].values() for s, n in r["statuses"].items() if int(s) >= 500)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
