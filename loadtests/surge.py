"""The deadline-day surge against a running platform: does the front door stay up?

September 2024: 3.5 million applicants, one deadline, channels that could not get an answer. This
scenario plays several channels at once: each buys quota and then fires stamp requests with bounded
concurrency, far faster than the stamping tier can sign. What it measures is what invariant 6 promises:
- intake answers every request (no 5xx, no timeout), with its latency per route (p50, p99);
- the backlog shows up as a queue: positions and expected completion times in the 202s;
- every accepted request ends (completed, or failed with a code) and the ledger agrees.

    make up && python -m loadtests.surge --channels 4 --stamps 400 --out loadtests/results/surge.json

Absolute figures move with the machine (a shared 2-core box here); read them next to each other.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import corpus  # noqa: E402


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


async def _channel(base_env: dict, name: str) -> dict:
    command = [sys.executable, "-m", "services.operator.cli", "channel", "add", name, "--json"]
    out = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=True, env=base_env)
    return json.loads(out.stdout)


async def run(base_url: str, channels: int, stamps_per_channel: int, concurrency: int, env: dict) -> dict:
    routes = {"POST /v1/purchases": Route(), "POST /v1/stamps": Route(), "GET /v1/stamps/{id}": Route()}
    creds = [await _channel(env, f"surge-{i}-{secrets.token_hex(2)}") for i in range(channels)]
    letter = corpus.a4_text(7)
    accepted: list[tuple[dict, str, dict]] = []
    positions: list[tuple[float, int, float]] = []
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency * channels)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        async def call(route: str, method: str, url: str, **kw) -> httpx.Response | None:
            started = time.perf_counter()
            try:
                r = await client.request(method, url, **kw)
            except httpx.HTTPError as exc:
                routes[route].record(started, None, repr(exc))
                return None
            routes[route].record(started, r.status_code, "" if r.status_code < 500 else r.text[:200])
            return r

        async def buy(c: dict) -> None:
            auth = {"Authorization": f"Bearer {c['api_key']}"}
            body = {"channel_order_id": f"surge-{secrets.token_hex(6)}", "account_id": "applicants",
                    "quantity": stamps_per_channel, "amount": stamps_per_channel * 10_000,
                    "paid_at": dt.datetime.now(dt.UTC).isoformat()}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:   # a new channel reaches the intake's view within moments
                r = await call("POST /v1/purchases", "POST", "/v1/purchases", json=body, headers=auth)
                if r is not None and r.status_code == 202:
                    return
                await asyncio.sleep(0.2)
            raise SystemExit(f"channel {c['channel_id']}: purchase not accepted")

        await asyncio.gather(*(buy(c) for c in creds))
        await asyncio.sleep(2)   # let the credits land; stamping beyond the quota would be refused

        async def stamper(c: dict, n: int) -> None:
            auth = {"Authorization": f"Bearer {c['api_key']}"}
            meta = json.dumps({"account_id": "applicants", "page": 1, "llx": 400, "lly": 60, "urx": 540, "ury": 200})
            for _ in range(n):
                r = await call("POST /v1/stamps", "POST", "/v1/stamps", headers=auth, data={"meta": meta},
                               files={"file": ("letter.pdf", letter, "application/pdf")})
                if r is not None and r.status_code == 202:
                    body = r.json()
                    accepted.append((c, body["request_id"], body))
                    if body.get("position") is not None:
                        positions.append((time.perf_counter() - t0, body["position"], body.get("eta_seconds")))

        per_worker = stamps_per_channel // concurrency
        await asyncio.gather(*(stamper(c, per_worker) for c in creds for _ in range(concurrency)))
        intake_done = time.perf_counter() - t0

        # follow every request to its end, as channels poll: a bounded set of pollers (latencies measured
        # are the server's, not time spent waiting for a free connection in this client)
        pending: asyncio.Queue = asyncio.Queue()
        for c, rid, _ in accepted:
            pending.put_nowait((c, rid))
        results: list[dict] = []

        async def poller() -> None:
            while len(results) < len(accepted):
                try:
                    c, rid = pending.get_nowait()
                except asyncio.QueueEmpty:
                    await asyncio.sleep(0.2)
                    continue
                r = await call("GET /v1/stamps/{id}", "GET", f"/v1/stamps/{rid}",
                               headers={"Authorization": f"Bearer {c['api_key']}"})
                if r is not None and r.status_code == 200 and r.json()["status"] in ("completed", "failed"):
                    results.append(r.json())
                else:
                    pending.put_nowait((c, rid))
                    await asyncio.sleep(0.05)

        await asyncio.wait_for(asyncio.gather(*(poller() for _ in range(min(16, concurrency * channels)))), 1800)
        drained = time.perf_counter() - t0
        # the ledger commits a unit when it consumes the stamp's outcome, a moment after the status shows it:
        # read the accounts once nothing is pending any more (or report what stands after a minute)
        settle_deadline = time.perf_counter() + 60
        while True:
            quotas = []
            for c in creds:
                r = await client.get("/v1/accounts/applicants/quota",
                                     headers={"Authorization": f"Bearer {c['api_key']}"})
                quotas.append(r.json())
            if all(q.get("pending") == 0 for q in quotas) or time.perf_counter() > settle_deadline:
                break
            await asyncio.sleep(0.2)
        ledger_settled = time.perf_counter() - t0
    outcomes: dict[str, int] = {}
    for r in results:
        key = r["status"] if r["status"] == "completed" else f"failed:{r.get('code')}"
        outcomes[key] = outcomes.get(key, 0) + 1
    max_pos = max((p for _, p, _ in positions), default=None)
    return {
        "channels": channels, "stamps_accepted": len(accepted), "outcomes": outcomes,
        "intake_seconds": round(intake_done, 1), "drain_seconds": round(drained, 1),
        "stamps_per_s_end_to_end": round(len(accepted) / drained, 1) if drained else None,
        "routes": {k: v.summary() for k, v in routes.items()},
        "queue": {"max_position": max_pos,
                  "max_eta_seconds": max((e for _, _, e in positions if e is not None), default=None),
                  "samples": [positions[i] for i in range(0, len(positions), max(1, len(positions) // 10))]},
        "ledger": quotas, "ledger_settle_seconds": round(ledger_settled - drained, 1),
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    import os
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=f"http://127.0.0.1:{os.environ.get('BUBUH_HTTP_PORT', '8080')}")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--stamps", type=int, default=200, help="stamps per channel")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per channel")
    p.add_argument("--out", type=Path, default=Path("loadtests/results/surge.json"))
    args = p.parse_args(argv)
    result = asyncio.run(run(args.base_url, args.channels, args.stamps, args.concurrency, dict(os.environ)))
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
