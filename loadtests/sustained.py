"""Issue 12, point 1 as written: end-to-end stamps/s sustained for 10 minutes, against the engine's rate.

Point 1 asks for end-to-end stamps/s of at least 30% of the two-process engine rate at the same PAdES
level, measured in the same run, sustained for 10 minutes (all completed, the ledger exact), with
purchases flowing at the same time. Until this benchmark the README quoted a proxy for it: the 15 s
closed-loop surge that ``make surge-deadline`` plays before each day, divided by the engine.

Each round:

1. The engine alone (``deadline_day.engine_rate``: two processes, one a core, stamping the letter at the
   platform's PAdES level with its key, TSA and revocation sources) on the idle platform, before the
   load and again after it has drained. The target is ``OF_ENGINE`` of the *faster* of the two, so a
   platform slowed by its own leftovers cannot make the engine look slow.
2. Open-loop arrivals at ``OFFER`` x the target for ``--seconds`` (600): a Poisson process over four
   channels of unequal size, each stamp paid for by a purchase that flows beside the stamps (the
   deadline day's schedule and purchases: ``deadline_day.schedule``, ``purchases``; no faults). Each
   accepted request is read again when its ETA says, as a channel planning by it would. Offering a
   little more than the target means a platform that keeps up completes at least the target inside the
   window despite Poisson noise and the requests still in its pipeline when the window closes.
3. The platform's sustained rate is the stamps it *completed inside the window* (their ``finished_at``)
   over the window. What was accepted and had not ended when the window closed is the backlog;
   the drain after it is reported, not counted.
4. Every accepted request must end completed, every purchase be accepted, each channel's orders
   reconcile (``bubuh reconcile``) and each account be exact (credited = bought, committed =
   completed, nothing pending).

When the platform cannot keep up, arrivals run ahead of it and its figure is what it completed while
intake went on at the offered rate; the surplus's intake takes CPU on these two shared cores, so that
figure is a little below what it would complete at exactly its own pace.

    make up && python -m loadtests.sustained --rounds 3 --out loadtests/results/surge-sustained.json --readme README.md
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.deadline_day import (  # noqa: E402
    OF_ENGINE,
    READERS,
    SHARES,
    TIMEOUT_S,
    Phase,
    Sent,
    engine_rate,
    ledger_check,
    play_platform,
    purchase_summary,
    purchases,
    reconcile,
    schedule,
    seen_ended,
    settled,
)
from loadtests.load_client import TRANSPORT_ERRORS, LoadClient, bearer  # noqa: E402
from loadtests.readme import measure_and_publish  # noqa: E402
from loadtests.surge import log  # noqa: E402

OFFER = 1.05            # arrivals at this multiple of the target
SETTLE_S = 10.0         # the platform left idle before the engine is measured
README_BEGIN = "<!-- surge:sustained:begin (make surge-sustained writes this table) -->"
README_END = "<!-- surge:sustained:end -->"


def _ended_by(s: Sent, t: float) -> bool:
    """Ended by ``t`` seconds into the run: accepted (the 202 came) at ``accepted_s`` and finished ``took_s``
    later by the platform's own ``accepted_at`` and ``finished_at``."""
    return s.outcome is not None and s.accepted_s is not None and s.took_s is not None and s.accepted_s + s.took_s <= t


def completed_in(sent: list[Sent], window_s: float) -> int:
    """Requests that completed inside ``[0, window_s]``."""
    return sum(1 for s in sent if s.outcome == "completed" and _ended_by(s, window_s))


def backlog_at(sent: list[Sent], window_s: float) -> int:
    """Requests accepted by the window's end and not ended by then."""
    return sum(1 for s in sent if s.accepted_s is not None and s.accepted_s <= window_s and not _ended_by(s, window_s))


def per_minute(sent: list[Sent], window_s: float) -> list[float]:
    """Completions per second in each whole minute of the window: whether the rate held or sagged."""
    done = sorted(s.accepted_s + s.took_s for s in sent if s.outcome == "completed" and s.accepted_s is not None
                  and s.took_s is not None)
    out = []
    for m in range(int(window_s // 60)):
        out.append(round(sum(1 for t in done if m * 60 <= t < (m + 1) * 60) / 60, 1))
    return out


def summarise(sent: list[Sent], window_s: float, drained_s: float) -> dict:
    completed = completed_in(sent, window_s)
    return {"arrivals": len(sent),
            # a 202, in time or to the channel's resend with the same key after no answer in 30 s
            "accepted": sum(s.request_id is not None for s in sent),
            "unanswered": sum(s.status is None for s in sent),
            "outcomes": dict(sorted(collections.Counter(s.outcome or "none" for s in sent).items())),
            "completed_in_window": completed, "stamps_per_s": round(completed / window_s, 1),
            "backlog_at_window_end": backlog_at(sent, window_s),
            "per_minute": per_minute(sent, window_s),
            # by the platform's own times: the channels' reads, at the ETAs they were given, see it later
            "drained_after_s": round(max([0.0] + [s.accepted_s + s.took_s - window_s for s in sent
                                                  if _ended_by(s, float("inf"))]), 1),
            "last_seen_ended_after_s": round(max(0.0, drained_s - window_s), 1)}


async def read_the_rest(base_url: str, raw: dict, within_s: float) -> int:
    """Reads each accepted request the channels had not seen end when their reads stopped, until it ends
    (``within_s`` at most), then each channel's account again once nothing is pending; how many it read.
    The channels read a request again when its ETA says, and the ETAs given while arrivals outran the tier
    read its pace under that intake: it drains faster, and the last reads come long after the last stamp.
    Waiting for them made a round 25 minutes, and a read cut off would have failed the checks, not the
    platform."""
    left = [s for s in raw["sent"] if s.request_id and s.outcome is None]
    creds, deadline = raw["channels"], time.monotonic() + within_s
    async with LoadClient(base_url, max_connections=READERS, timeout_s=TIMEOUT_S) as client:

        async def reader() -> None:
            while left and time.monotonic() < deadline:
                s = left.pop()
                try:
                    r = await client.get(f"/v1/stamps/{s.request_id}", headers=bearer(creds[s.channel]["api_key"]))
                    ended = seen_ended(s, r.json() if r.status_code == 200 else {}, time.time() - raw["t0_wall"])
                except TRANSPORT_ERRORS:
                    ended = False
                if not ended:
                    left.insert(0, s)
                    await asyncio.sleep(1.0)

        count = len(left)
        await asyncio.gather(*(reader() for _ in range(READERS)))
        raw["ledgers"] = [await settled(client, c, bearer(c["api_key"])) for c in creds]
    return count


def verdict(r: dict) -> dict[str, bool]:
    p = r["platform"]
    return {
        f"sustained >= {OF_ENGINE:.0%} of the engine for the window": p["stamps_per_s"] >= r["target_per_s"],
        "every accepted request ended, completed":
            p["accepted"] > 0 and p["outcomes"].get("completed") == p["accepted"],
        "every purchase accepted": r["purchases"]["accepted"] == r["purchases"]["count"],
        "every channel's orders reconcile (bubuh reconcile)": all(c["exit_code"] == 0 for c in r["reconcile"]),
        "every account exact: credited = bought, committed = completed, none pending":
            all(c["exact"] for c in r["ledger"]),
    }


async def measure_round(args, env: dict) -> dict:
    from services.kernel.settings import Settings

    settings = Settings()
    machine = {"cores": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    await asyncio.sleep(SETTLE_S)
    before = await asyncio.to_thread(engine_rate, settings, args.engine_seconds)
    target = OF_ENGINE * before["stamps_per_s"]
    offered = args.rate or OFFER * target
    shape = [Phase("sustained", args.seconds, 1.0, 1.0)]
    shares = tuple(float(x) for x in args.shares.split(","))
    arrivals = schedule(shape, offered, shares, args.seed)
    buys = purchases(arrivals, len(shares))
    log(f"offering {offered:.1f} stamps/s for {args.seconds:g} s ({len(arrivals)} stamps, {len(buys)} purchases); "
        f"{OF_ENGINE:.0%} of the engine is {target:.1f}")
    raw = await play_platform(args.base_url, env, settings, arrivals, buys, shape, len(shares), False,
                              args.read_for)
    read = await read_the_rest(args.base_url, raw, args.drain_timeout)
    log(f"read {read} requests the channels had not seen end")
    recon = await asyncio.to_thread(reconcile, env, raw)
    await asyncio.sleep(SETTLE_S)
    after = await asyncio.to_thread(engine_rate, settings, args.engine_seconds)
    engine = max(before["stamps_per_s"], after["stamps_per_s"])
    r = {"generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine,
         "seconds": args.seconds, "shares": shares, "seed": args.seed,
         "engine": {"before": before, "after": after, "stamps_per_s": engine, "level": before["level"]},
         "target_per_s": round(OF_ENGINE * engine, 1), "offered_per_s": round(offered, 1),
         "platform": summarise(raw["sent"], args.seconds, raw["drained_s"]),
         "purchases": purchase_summary(raw["purchases"]), "reconcile": recon, "ledger": ledger_check(raw)}
    r["of_engine"] = round(r["platform"]["stamps_per_s"] / engine, 3)
    r["verdict"] = verdict(r)
    log(f"sustained {r['platform']['stamps_per_s']} stamps/s = {r['of_engine']:.0%} of the engine's {engine} "
        f"(target {r['target_per_s']}); backlog at the window's end {r['platform']['backlog_at_window_end']}")
    return r


async def measure(args, env: dict) -> dict:
    rounds = []
    for i in range(1, args.rounds + 1):
        log(f"round {i} of {args.rounds}")
        rounds.append(await measure_round(args, env))
    return combine(rounds)


def combine(rounds: list[dict]) -> dict:
    """Every round's figures, their medians, and a check held only if it held in every round."""
    shares = [r["of_engine"] for r in rounds]
    med = sorted(range(len(rounds)), key=lambda i: shares[i])[len(rounds) // 2]
    return {"generated_at": rounds[-1]["generated_at"], "rounds": rounds, "median_round": med + 1,
            "medians": {"stamps_per_s": statistics.median(r["platform"]["stamps_per_s"] for r in rounds),
                        "engine_stamps_per_s": statistics.median(r["engine"]["stamps_per_s"] for r in rounds),
                        "of_engine": statistics.median(shares)},
            "verdict": {k: all(r["verdict"][k] for r in rounds) for k in rounds[0]["verdict"]}}


def markdown(result: dict) -> str:
    rounds = result["rounds"]
    lines = ["| round | engine alone before / after, stamps/s | offered stamps/s | completed in the window, "
             "stamps/s (per minute) | of the engine | backlog at the window's end | drained after | every check |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for i, r in enumerate(rounds, 1):
        p = r["platform"]
        lines.append(f"| {i} | {r['engine']['before']['stamps_per_s']} / {r['engine']['after']['stamps_per_s']} | "
                     f"{r['offered_per_s']} | **{p['stamps_per_s']}** ({', '.join(str(x) for x in p['per_minute'])}) | "
                     f"**{r['of_engine']:.0%}** | {p['backlog_at_window_end']} | {p['drained_after_s']} s | "
                     f"{'yes' if all(r['verdict'].values()) else 'no'} |")
    m = result["medians"]
    first = rounds[0]
    lines += ["", f"- {first['seconds']:g} s of Poisson arrivals over {len(first['shares'])} channels "
              f"({', '.join(f'{s:.0%}' for s in first['shares'])}), purchases beside them, no faults; the engine at "
              f"{first['engine']['level'].upper()}, two processes, on the idle platform before and after each round "
              f"(the faster counts).",
              f"- Medians: **{m['stamps_per_s']} stamps/s** sustained, the engine {m['engine_stamps_per_s']}: "
              f"**{m['of_engine']:.0%}** (issue 12 asks >= {OF_ENGINE:.0%}: "
              f"**{'met' if m['of_engine'] >= OF_ENGINE else 'not met'}**)."]
    lines.append("- Requests without an answer within 30 s (the door under these arrivals; each sent again with its "
                 f"key, as docs/channels.md says): {', '.join(str(r['platform']['unanswered']) for r in rounds)}.")
    lines += [f"- {k}: {'yes' if v else 'no'} (in every round)" for k, v in result["verdict"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=f"http://127.0.0.1:{os.environ.get('BUBUH_HTTP_PORT', '8080')}")
    p.add_argument("--seconds", type=float, default=600.0, help="the window the rate must hold for")
    p.add_argument("--rate", type=float, default=0.0,
                   help=f"arrivals/s to offer; by default {OFFER} x {OF_ENGINE:.0%}% of the engine measured first")
    p.add_argument("--shares", default=",".join(str(s) for s in SHARES), help="each channel's share of the arrivals")
    p.add_argument("--read-for", type=float, default=300.0,
                   help="seconds after the window the channels go on reading at their ETAs")
    p.add_argument("--drain-timeout", type=float, default=900.0,
                   help="seconds after that to wait for every accepted request to end")
    p.add_argument("--engine-seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("loadtests/results/surge-sustained.json"))
    p.add_argument("--readme", type=Path)
    args = p.parse_args(argv)
    return measure_and_publish(measure, markdown, args, begin=README_BEGIN, end=README_END)


if __name__ == "__main__":
    raise SystemExit(main())
