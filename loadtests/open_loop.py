"""The front door, open loop (issue 12, point 2): arrivals at a set rate, not a fixed number in flight.

A closed-loop surge (``surge.py``) waits for an answer before it sends the next request, so a slow
front door slows the load down and hides itself. Here every arrival has its time fixed in advance
(a Poisson process with a fixed seed) and is sent then, whatever the earlier ones are doing; its
latency counts from that time, so a client-side backlog counts against the platform, not for it.

``--rounds`` rounds against the running platform (``make up`` first; ``make surge-open`` plays 3, as
issue 12 asks its figures as medians of 3 runs):

1. **sustainable**: the end-to-end stamps/s of a closed-loop surge played first, once for every round
   (or ``--rate``);
2. **plateau**: arrivals at 80% of it for ``--plateau`` seconds (issue 12: 10 minutes);
3. **spike**: 3x for ``--spike`` seconds (60), the excess to show as queue (positions in the 202s);
4. **drain**: until every accepted request has ended; then ``--pause`` seconds before the next round,
   whose arrivals come from the next seed.

Each accepted request is then read as a channel that plans by its ETA would read it: again when its
last answer's ETA says, at least 1 s later. What is checked (issue 12, point 2): in the plateau,
intake p99 <= 300 ms and status reads p99 <= 100 ms; in the spike, intake p99 <= 1 s, no 5xx and no
transport error; the queue visible during the spike; every accepted request ended, completed. Latencies are grouped by
the phase the request was sent in. Each check is made on the median of the rounds' figures (the p99s,
the spike's 5xx and transport errors); the queue and the drain must hold in every round.

    make up && python -m loadtests.open_loop --plateau 600 --spike 60 --readme README.md

The load generator runs on the same two cores as the platform, and each arrival costs it CPU too;
read the figures as this box's, next to each other.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import heapq
import json
import os
import random
import secrets
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import corpus  # noqa: E402
from loadtests.load_client import TRANSPORT_ERRORS, LoadClient, bearer  # noqa: E402
from loadtests.readme import measure_and_publish  # noqa: E402
from loadtests.surge import Route, _quantile, add_channels, eta_accuracy, run  # noqa: E402

PLATEAU_SHARE = 0.8       # issue 12: the plateau at 80% of the sustainable rate
SPIKE_FACTOR = 3.0        # ... and a spike at 3x
TARGETS_MS = {"plateau": {"POST /v1/stamps": 300.0, "GET /v1/stamps/{id}": 100.0},
              "spike": {"POST /v1/stamps": 1000.0}}
README_BEGIN = "<!-- surge:open-loop:begin (make surge-open writes this table) -->"
README_END = "<!-- surge:open-loop:end -->"
ROUTES = ("POST /v1/stamps", "GET /v1/stamps/{id}")
READERS = 16              # status reads in flight at most
EVERY_ROUND = ("spike: the excess visible as queue", "drained: every accepted request completed")
SENDERS = 256             # stamp requests in flight at most (each on its own connection)


def arrivals(phases: list[tuple[str, float, float]], seed: int) -> list[tuple[float, str]]:
    """(offset in seconds, phase) of every arrival: a Poisson process per phase at its rate."""
    rng = random.Random(seed)
    out, start = [], 0.0
    for name, rate, seconds in phases:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            out.append((t, name))
        start += seconds
    return out


async def play(base_url: str, env: dict, *, rate: float, plateau_s: float, spike_s: float, channels: int,
               seed: int, progress_every_s: float = 30.0) -> dict:
    phases = [("plateau", rate * PLATEAU_SHARE, plateau_s), ("spike", rate * SPIKE_FACTOR, spike_s)]
    schedule = arrivals(phases, seed)
    lat = {(phase, route): Route() for phase in ("plateau", "spike", "drain") for route in ROUTES}
    creds = await add_channels(env, "open", channels)
    need = len(schedule) // channels + 50
    letter = corpus.a4_text(7)
    meta = json.dumps({"account_id": "applicants", "page": 1, "llx": 400, "lly": 60, "urx": 540, "ury": 200})
    accepted: dict[str, dict] = {}          # request id -> {channel, phase, eta, position}
    spike_positions: list[int] = []
    due: list[tuple[float, str]] = []       # (monotonic time to read it, request id)
    results: dict[str, dict] = {}
    # Requests in flight are bounded here, with a semaphore, and the client has a connection for each (the
    # first spike runs, with httpx, spent a core matching waiting requests against its pool's connections;
    # load_client.py says why the client is aiohttp's now). Senders and readers use separate clients: a read
    # does not wait behind the spike's uploads.
    in_flight = asyncio.Semaphore(SENDERS)
    async with LoadClient(base_url, max_connections=SENDERS) as client, \
            LoadClient(base_url, max_connections=READERS) as reading:
        for c in creds:                      # the quota first: stamps beyond it would be refused
            left = need
            while left:
                n = min(left, 10_000)
                body = {"channel_order_id": f"open-{secrets.token_hex(6)}", "account_id": "applicants",
                        "quantity": n, "amount": n * 10_000, "paid_at": dt.datetime.now(dt.UTC).isoformat()}
                for _ in range(150):
                    r = await client.post("/v1/purchases", json=body,
                                          headers=bearer(c["api_key"]))
                    if r.status_code == 202:
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise SystemExit(f"channel {c['channel_id']}: purchase not accepted ({r.status_code})")
                left -= n
        await asyncio.sleep(3)

        t0, t0_wall = time.perf_counter(), time.time()

        def phase_at(t: float) -> str:
            return "plateau" if t - t0 < plateau_s else "spike" if t - t0 < plateau_s + spike_s else "drain"

        def again(body: dict) -> float:
            """When a channel that plans by the ETA reads the request again: when the ETA says, at least 1 s."""
            return max(1.0, body.get("eta_seconds") or 1.0)

        async def arrive(i: int, offset: float, phase: str) -> None:
            scheduled = t0 + offset
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            c = creds[i % channels]
            rec = lat[(phase, "POST /v1/stamps")]
            try:
                async with in_flight:   # a wait here counts: the latency runs from the scheduled time
                    r = await client.post("/v1/stamps", headers=bearer(c["api_key"]),
                                          form={"meta": meta}, file=("letter.pdf", letter, "application/pdf"))
            except TRANSPORT_ERRORS as exc:
                rec.record(scheduled, None, repr(exc))
                return
            rec.record(scheduled, r.status_code, "" if r.status_code < 500 else r.text[:200])
            if r.status_code == 202:
                body = r.json()
                accepted[body["request_id"]] = {"channel": c, "phase": phase, "eta": body.get("eta_seconds")}
                if phase == "spike" and body.get("position") is not None:
                    spike_positions.append(body["position"])
                heapq.heappush(due, (time.perf_counter() + again(body), body["request_id"]))

        async def reader() -> None:
            """Reads each accepted request again when its ETA says, until it ends."""
            while True:
                if not due:
                    if sending.done():
                        return
                    await asyncio.sleep(0.1)
                    continue
                when, rid = heapq.heappop(due)
                await asyncio.sleep(max(0.0, when - time.perf_counter()))
                rec = lat[(phase_at(time.perf_counter()), "GET /v1/stamps/{id}")]
                started = time.perf_counter()
                try:
                    r = await reading.get(f"/v1/stamps/{rid}",
                                         headers=bearer(accepted[rid]["channel"]["api_key"]))
                except TRANSPORT_ERRORS as exc:
                    rec.record(started, None, repr(exc))
                    heapq.heappush(due, (time.perf_counter() + 1.0, rid))
                    continue
                rec.record(started, r.status_code, "" if r.status_code < 500 else r.text[:200])
                body = r.json() if r.status_code == 200 else {}
                if body.get("status") in ("completed", "failed"):
                    results[rid] = body
                else:
                    heapq.heappush(due, (time.perf_counter() + again(body), rid))

        async def report() -> None:
            while not sending.done() or due:
                await asyncio.sleep(progress_every_s)
                t = time.perf_counter() - t0
                print(f"[{time.strftime('%H:%M:%S')}] {t:6.0f} s {phase_at(time.perf_counter()):7s} accepted "
                      f"{len(accepted)}/{len(schedule)}, ended {len(results)}", flush=True)

        sending = asyncio.ensure_future(asyncio.gather(*(arrive(i, off, ph) for i, (off, ph) in enumerate(schedule))))
        watcher = asyncio.ensure_future(report())
        await asyncio.gather(sending, *(reader() for _ in range(READERS)))
        watcher.cancel()
        drained_s = time.perf_counter() - t0
    outcomes: dict[str, int] = {}
    for body in results.values():
        key = body["status"] if body["status"] == "completed" else f"failed:{body.get('code')}"
        outcomes[key] = outcomes.get(key, 0) + 1
    return {
        "rate_sustainable_per_s": rate,
        "phases": [{"name": n, "arrivals_per_s": round(r, 1), "seconds": s,
                    "arrivals": sum(1 for _, phase in schedule if phase == n)} for n, r, s in phases],
        "arrivals": len(schedule), "accepted": len(accepted), "ended": len(results), "outcomes": outcomes,
        "drained_after_s": round(drained_s - plateau_s - spike_s, 1),
        "completed_after_s": _last_completion(results.values(), t0_wall + plateau_s + spike_s),
        "latency": {phase: {route: lat[(phase, route)].summary() for route in ROUTES}
                    for phase in ("plateau", "spike", "drain")},
        "spike_queue": {"max_position": max(spike_positions, default=None),
                        "median_position": _quantile(sorted(spike_positions), 0.5)},
        "eta": {phase: eta_accuracy({rid: a["eta"] for rid, a in accepted.items() if a["phase"] == phase},
                                    list(results.values())) for phase in ("plateau", "spike")},
        "channels": channels, "seed": seed,
    }


def _last_completion(bodies, spike_end: float) -> float | None:
    """Seconds from the spike's end to the last completion the server recorded (``finished_at``): when the
    queue drained. The run ends later, at the last read, which comes when the request's latest ETA said."""
    finished = [dt.datetime.fromisoformat(b["finished_at"]).timestamp() for b in bodies if b.get("finished_at")]
    return round(max(finished) - spike_end, 1) if finished else None


def _median(values: list) -> float | None:
    """The median of the rounds' figures that are known (None when no round has one)."""
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 1) if known else None


def figures(r: dict) -> dict:
    """One round's checked figures."""
    lat = r["latency"]
    spike_post = lat["spike"]["POST /v1/stamps"]
    out = {f"{phase}: {route} p99 ms": lat[phase][route]["p99_ms"]
           for phase, routes in TARGETS_MS.items() for route in routes}
    out["spike: 5xx"] = sum(n for s, n in spike_post["statuses"].items() if int(s) >= 500)
    # the errors kept are the 5xx answers' bodies and the requests that got no answer
    out["spike: transport errors"] = spike_post["errors"] - out["spike: 5xx"]
    out["spike: largest position"] = r["spike_queue"]["max_position"] or 0
    out["drained"] = r["outcomes"].get("completed", 0) == r["accepted"] > 0
    return out


def verdict_of(rounds: list[dict]) -> tuple[dict[str, float | None], dict[str, bool]]:
    """The rounds' median figures, and the checks on them: each p99 and the spike's errors at the median of the
    rounds (issue 12: medians of 3 runs); the queue visible and every request drained in every round."""
    each = [figures(r) for r in rounds]
    median = {k: _median([f[k] for f in each]) for k in each[0] if k != "drained"}
    out = {f"{phase}: {route} p99 <= {limit:g} ms": (median[f"{phase}: {route} p99 ms"] or 0) <= limit
           for phase, routes in TARGETS_MS.items() for route, limit in routes.items()}
    out["spike: no 5xx, no transport error"] = median["spike: 5xx"] == 0 and median["spike: transport errors"] == 0
    queue, drained = EVERY_ROUND
    out[queue] = all(f["spike: largest position"] > 0 for f in each)
    out[drained] = all(f["drained"] for f in each)
    return median, out


def verdict(r: dict) -> dict[str, bool]:
    """One round's checks."""
    return verdict_of([r])[1]


def _phase_table(r: dict) -> list[str]:
    lines = ["| phase | arrivals/s | seconds | `POST /v1/stamps` p50 / p99 / max ms | status reads p50 / p99 ms |",
             "|---|---:|---:|---|---|"]
    for p in r["phases"] + [{"name": "drain", "arrivals_per_s": 0, "seconds": r["drained_after_s"]}]:
        post, get = r["latency"][p["name"]]["POST /v1/stamps"], r["latency"][p["name"]]["GET /v1/stamps/{id}"]
        codes = ", ".join(f"{k}: {v}" for k, v in post["statuses"].items())
        lines.append(f"| {p['name']} | {p['arrivals_per_s']} | {p['seconds']} | "
                     f"{post['p50_ms']} / {post['p99_ms']} / {post['max_ms']} ({codes or '-'}) | "
                     f"{get['p50_ms']} / {get['p99_ms']} |")
    return lines


def _rounds_table(result: dict) -> list[str]:
    lines = ["| round | plateau intake p50 / p99 ms | plateau status p99 ms | spike intake p50 / p99 ms | "
             "spike 5xx / transport errors | spike's first ETA median s, within 25% | drained after s "
             "(last completion / last read) |",
             "|---:|---|---:|---|---|---|---:|"]
    for i, r in enumerate(result["rounds"], 1):
        lat = r["latency"]
        pp, pg = lat["plateau"]["POST /v1/stamps"], lat["plateau"]["GET /v1/stamps/{id}"]
        sp = lat["spike"]["POST /v1/stamps"]
        f = figures(r)
        e = r["eta"]["spike"]
        eta = f"{e['median_first_eta_s']}, {e['within_25_percent']:.0%}" if e.get("requests") else "-"
        spike_arrivals = r["phases"][1].get("arrivals", "?")
        lines.append(f"| {i} | {pp['p50_ms']} / {pp['p99_ms']} | {pg['p99_ms']} | {sp['p50_ms']} / {sp['p99_ms']} | "
                     f"{f['spike: 5xx']} of {spike_arrivals} / {f['spike: transport errors']} | {eta} | "
                     f"{r.get('completed_after_s')} / {r['drained_after_s']} |")
    m = result["median"]
    lines.append(f"| **median** | {m['plateau: POST /v1/stamps p99 ms']} (p99) | "
                 f"{m['plateau: GET /v1/stamps/{id} p99 ms']} | {m['spike: POST /v1/stamps p99 ms']} (p99) | "
                 f"{m['spike: 5xx']} / {m['spike: transport errors']} | | |")
    return lines


def markdown(result: dict) -> str:
    rounds = result["rounds"]
    lines = _rounds_table(result) if len(rounds) > 1 else []
    lines += [""] if lines else []
    middle = sorted(range(len(rounds)), key=lambda i: rounds[i]["latency"]["plateau"]["POST /v1/stamps"]["p99_ms"] or 0)
    shown = middle[len(middle) // 2]
    if len(rounds) > 1:
        lines.append(f"Round {shown + 1} (the median plateau), phase by phase:")
        lines.append("")
    r = rounds[shown]
    lines += _phase_table(r)
    lines.append("")
    lines.append(f"- Sustainable rate: **{result['rate_sustainable_per_s']} stamps/s** ({result['rate_source']}); "
                 f"{len(rounds)} round(s), {result['pause_s']:g} s apart; round {shown + 1}: "
                 f"{r['arrivals']} arrivals, {r['accepted']} accepted, outcomes {r['outcomes']}; drained "
                 f"{r.get('completed_after_s')} s after the spike (its last completion; the last read "
                 f"{r['drained_after_s']} s after it); positions in the spike's 202s up to "
                 f"{r['spike_queue']['max_position']} (median {r['spike_queue']['median_position']}).")
    for phase in ("plateau", "spike"):
        e = r["eta"][phase]
        if e.get("requests"):
            lines.append(f"- First ETAs, {phase}: median {e['median_first_eta_s']} s, "
                         f"{e['within_25_percent']:.0%} completed within 25% of it.")
    for check, ok in result["verdict"].items():
        at = "" if len(rounds) == 1 else " (in every round)" if check in EVERY_ROUND else " (at the rounds' median)"
        lines.append(f"- {check}{at}: {'met' if ok else '**NOT met**'}")
    lines.append(f"- Machine: {result['machine']['cores']} cores shared with the platform, Kafka and PostgreSQL; "
                 f"load average at each round's start: {', '.join(str(each['loadavg_at_start']) for each in rounds)}.")
    return "\n".join(lines)


def rate_arguments(p: argparse.ArgumentParser) -> None:
    """The options every open-loop benchmark shares: where the platform is, and its sustainable rate."""
    p.add_argument("--base-url", default=f"http://127.0.0.1:{os.environ.get('BUBUH_HTTP_PORT', '8080')}")
    p.add_argument("--rate", type=float, default=0.0, help="the sustainable stamps/s; measured first when 0")
    p.add_argument("--measure-stamps", type=int, default=200, help="stamps per channel of the closed-loop surge")


async def sustainable_rate(args, env: dict) -> tuple[float, str]:
    """``--rate``, or the end-to-end stamps/s of a closed-loop surge played just before; and where it came from."""
    if args.rate:
        return args.rate, "given with --rate"
    closed = await run(args.base_url, 4, args.measure_stamps, 8, env)
    await asyncio.sleep(5)
    return (closed["stamps_per_s_end_to_end"],
            f"a closed-loop surge of 4 x {args.measure_stamps} stamps, 8 in flight each, just before")


async def measure(args, env: dict) -> dict:
    machine = {"cores": os.cpu_count()}
    rate, source = await sustainable_rate(args, env)
    rounds = []
    for i in range(args.rounds):
        if i:
            print(f"[{time.strftime('%H:%M:%S')}] round {i} drained; round {i + 1} of {args.rounds} in "
                  f"{args.pause:g} s", flush=True)
            await asyncio.sleep(args.pause)
        loadavg = [round(x, 2) for x in os.getloadavg()]
        r = await play(args.base_url, env, rate=rate, plateau_s=args.plateau, spike_s=args.spike,
                       channels=args.channels, seed=args.seed + i)
        r["loadavg_at_start"] = loadavg
        r["verdict"] = verdict(r)
        rounds.append(r)
    median, checks = verdict_of(rounds)
    return {"rate_sustainable_per_s": rate, "rate_source": source, "machine": machine, "pause_s": args.pause,
            "rounds": rounds, "median": median, "verdict": checks,
            "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    rate_arguments(p)
    p.add_argument("--plateau", type=float, default=600.0, help="seconds at 80%% of the sustainable rate")
    p.add_argument("--spike", type=float, default=60.0, help="seconds at 3x the sustainable rate")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--seed", type=int, default=12, help="the first round's arrivals; round n uses seed + n - 1")
    p.add_argument("--rounds", type=int, default=1, help="rounds at the same rate; the checks take their medians")
    p.add_argument("--pause", type=float, default=30.0, help="seconds between a round's drain and the next round")
    p.add_argument("--out", type=Path, default=Path("loadtests/results/surge-open.json"))
    p.add_argument("--readme", type=Path)
    args = p.parse_args(argv)
    return measure_and_publish(measure, markdown, args, begin=README_BEGIN, end=README_END)


if __name__ == "__main__":
    raise SystemExit(main())
