"""Replay the ETA forecast over a held-queue run's requests: what the current ``stamping/pace.py`` and
``QueueFacts`` would have told each 202, against what it was told and what it took.

``make surge-eta`` (``held_queue.py``) writes each request's first ETA, its position and its phase to
``.local/results/surge-eta-requests.jsonl``; the stamping schema keeps every request's times. For each
request this rebuilds, from those times, what a read of the queue's facts at its 202 would have seen
(each second's intake and finishes over the fit's span, the latest 500 stamps' hop times, the door's
intake just before it) and asks the forecast in the working tree for its ETA at the position it was told.
Change the forecast, replay, and compare, before a 7-minute run on a box whose pace moves between runs:

    make surge-eta && python -m loadtests.eta_replay

What it leaves out: the facts' caching (a read serves up to a second; here each request has a read of its
own, one per tenth of a second), the seconds a stamping worker yielded to a busy door, and the position
(it is the one told, not one the change would count). Over the six rounds of 7 December (20:18-20:33) told
by the forecast it replays (7d0e1c9), the fills' replayed share within 25% of the ETA came out 10 points
under the told one to 4 over (72/79, 79/89, 61/69, 91/91, 32/28, 21/20%), the held requests' 1-3 over.
Replayed over the six rounds told by the forecast before it: the fills 70, 90, 78, 25, 11 and 73% against
65, 83, 76, 24, 8 and 62% told.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.stamping.pace import DOOR_COST_ONE_BOX, FIT_SPAN_S, LATELY_AT_DOOR_S, LATELY_S, Second, TierPace
from services.stamping.queue import (
    BACKLOG_PACE_SECONDS,
    BACKLOG_SECONDS,
    BACKLOG_WAIT_S,
    HISTORY_STAMPS,
    QueueFacts,
)

REQUESTS_FILE = Path(__file__).resolve().parents[1] / ".local" / "results" / "surge-eta-requests.jsonl"
WITHIN = 0.25
READ_EVERY_S = 0.1        # one read of the facts per this much of the run, shared by the requests in it


@dataclass(frozen=True)
class Stamp:
    """A request's times in the stamping schema (epoch seconds; None: not reached)."""

    accepted: float
    reserved: float | None
    started: float | None
    finished: float | None
    status: str


class Registry:
    """Every request's times, indexed as the queue's reads see them."""

    def __init__(self, stamps: Iterable[Stamp]) -> None:
        stamps = list(stamps)
        self._accepted = sorted(s.accepted for s in stamps)
        self._ended = sorted((s for s in stamps if s.status in ("completed", "failed") and s.finished is not None),
                             key=lambda s: s.finished)
        self._ends = [s.finished for s in self._ended]
        self._came: dict[int, int] = {}
        for at in self._accepted:
            self._came[int(at)] = self._came.get(int(at), 0) + 1
        self._done: dict[int, int] = {}
        self._backlog: dict[int, bool] = {}
        for s in self._ended:
            at = int(s.finished)
            self._done[at] = self._done.get(at, 0) + 1
            waited = s.started is not None and s.reserved is not None and s.started - s.reserved > BACKLOG_WAIT_S
            self._backlog[at] = self._backlog.get(at, True) and waited

    def seconds(self, now: int) -> list[tuple[int, Second]]:
        """The fit's span before ``now``, as ``_SECONDS`` reads it (intake of every request, not only open)."""
        out = []
        for at in range(now - FIT_SPAN_S, now):
            came, done = self._came.get(at, 0), self._done.get(at, 0)
            if came or done:
                out.append((at, Second(came, done, self._backlog.get(at, False))))
        return out

    def came(self, since: float, until: float) -> int:
        return bisect.bisect_left(self._accepted, until) - bisect.bisect_left(self._accepted, since)

    def latest(self, at: float) -> list[Stamp]:
        """The latest ``HISTORY_STAMPS`` ended before ``at``."""
        i = bisect.bisect_left(self._ends, at)
        return self._ended[max(0, i - HISTORY_STAMPS):i]


def facts_at(registry: Registry, at: float) -> QueueFacts | None:
    """The facts a read at ``at`` would give, from the forecast in the working tree."""
    now = int(at)
    latest = registry.latest(at)
    if not latest:
        return None
    done = [s for s in latest if s.status == "completed" and s.reserved is not None and s.started is not None]
    reserve_s = statistics.median(s.reserved - s.accepted for s in done) if done else 0.0
    finish_s = statistics.median(s.finished - s.started for s in done) if done else 0.0
    pace_from = min(int(latest[0].finished), now - BACKLOG_PACE_SECONDS)
    pace = TierPace(unfitted_cost=DOOR_COST_ONE_BOX)    # make surge-eta's platform: the door shares the tier's cores
    pace.record(now - FIT_SPAN_S, now - FIT_SPAN_S, now, registry.seconds(now))
    lately = registry.came(at - LATELY_S, at) / LATELY_S
    forecast = pace.forecast(pace_from, now, BACKLOG_SECONDS, BACKLOG_PACE_SECONDS, lately)
    if forecast is None:
        return None
    at_door = registry.came(at - LATELY_AT_DOOR_S, at) / LATELY_AT_DOOR_S   # the 202's own count (QueueView)
    forecast = pace.at_the_door(pace_from, now, BACKLOG_SECONDS, BACKLOG_PACE_SECONDS, forecast, at_door)
    return QueueFacts(forecast.per_second, reserve_s, finish_s, forecast.burst_per_second, forecast.burst_s)


def _summary(ratios: list[float]) -> dict:
    if not ratios:
        return {"requests": 0}
    within = sum(abs(q - 1) <= WITHIN for q in ratios) / len(ratios)
    return {"requests": len(ratios), "within_25_percent": round(within, 3),
            "took_over_eta_median": round(statistics.median(ratios), 2)}


def replay(registry: Registry, requests: Iterable[Mapping]) -> list[dict]:
    """Per round and phase (and the whole run): the told ETAs' and the replayed ETAs' share within 25% of
    the time each request took (202 to completed) and their took/ETA medians. ``requests``: as held_queue
    writes them (``round``, ``phase``, ``position``, ``eta``, ``accepted_at``, ``finished_at``, ``status``)."""
    told: dict[tuple[int, str], list[float]] = {}
    replayed: dict[tuple[int, str], list[float]] = {}
    reads: dict[float, QueueFacts | None] = {}
    for r in requests:
        if r.get("status") != "completed" or not r.get("eta") or r.get("finished_at") is None:
            continue
        took = r["finished_at"] - r["accepted_at"]
        key = round(r["accepted_at"] / READ_EVERY_S) * READ_EVERY_S
        if key not in reads:
            reads[key] = facts_at(registry, r["accepted_at"])
        facts = reads[key]
        eta = facts.eta_seconds(r.get("position") or 0) if facts is not None else None
        for phase in (r["phase"], "run"):
            told.setdefault((r["round"], phase), []).append(took / r["eta"])
            if eta:
                replayed.setdefault((r["round"], phase), []).append(took / eta)
    return [{"round": rnd, "phase": phase, "told": _summary(told[(rnd, phase)]),
             "replayed": _summary(replayed.get((rnd, phase), []))}
            for rnd, phase in sorted(told, key=lambda k: (k[0], ("fill", "held", "run").index(k[1])))]


def markdown(rows: list[dict]) -> str:
    lines = ["| round | phase | requests | told: within 25%, took/ETA median | replayed: within 25%, took/ETA median |",
             "|---:|---|---:|---|---|"]
    for row in rows:
        t, p = row["told"], row["replayed"]

        def cell(s: dict) -> str:
            return f"{100 * s['within_25_percent']:.0f}%, {s['took_over_eta_median']}" if s.get("requests") else "-"

        lines.append(f"| {row['round']} | {row['phase']} | {t['requests']} | {cell(t)} | {cell(p)} |")
    return "\n".join(lines)


async def _registry(database_url: str, schema: str, since: float, until: float) -> Registry:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f"SELECT extract(epoch FROM accepted_at)::float8 AS a, extract(epoch FROM reserved_at)::float8 AS r, "
            f"extract(epoch FROM started_at)::float8 AS s, extract(epoch FROM finished_at)::float8 AS f, status "
            f"FROM {schema}.requests WHERE accepted_at >= to_timestamp($1) AND accepted_at < to_timestamp($2)",
            since, until)
    finally:
        await conn.close()
    return Registry(Stamp(row["a"], row["r"], row["s"], row["f"], row["status"]) for row in rows)


def main(argv: list[str] | None = None) -> int:
    from services.kernel.settings import Settings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=Path, default=REQUESTS_FILE,
                   help=f"the requests a held-queue run wrote (default {REQUESTS_FILE})")
    args = p.parse_args(argv)
    if not args.requests.exists():
        raise SystemExit(f"{args.requests}: no held-queue run's requests; run `make surge-eta` first")
    requests = [json.loads(line) for line in args.requests.read_text().splitlines() if line.strip()]
    if not requests:
        raise SystemExit(f"{args.requests}: empty")
    s = Settings()
    first = min(r["accepted_at"] for r in requests)
    last = max(r.get("finished_at") or r["accepted_at"] for r in requests)
    try:
        registry = asyncio.run(_registry(s.database_url, s.schema("stamping"), first - FIT_SPAN_S, last + 1))
    except OSError as exc:
        raise SystemExit(f"PostgreSQL does not answer ({exc}): the replay reads the stamping schema's times; "
                         "`deploy/local/stack.sh up` starts it") from None
    print(markdown(replay(registry, requests)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
