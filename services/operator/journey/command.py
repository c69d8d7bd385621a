"""``bubuh trace ID [--json] [--follow]``: print a journey, or follow one still in flight."""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg

from services.kernel.runtime import ConfigError
from services.kernel.settings import Settings
from services.operator.journey.journey import TERMINAL, Journey, NotFound, Step, Tracer


def _latency(step: Step, previous: Step | None) -> str:
    if previous is None:
        return ""
    ms = (step.at - previous.at).total_seconds() * 1000
    return f"+{ms / 1000:.1f}s" if abs(ms) >= 10_000 else f"+{ms:.0f}ms"


def step_lines(steps: list[Step], previous: Step | None = None) -> list[str]:
    out = []
    for s in steps:
        line = (f"  {s.at.strftime('%H:%M:%S.%f')[:-3]} {_latency(s, previous):>9}  {s.service:<12} "
                f"{s.step:<44} {s.where:<30} {s.detail}")
        out.append(line.rstrip())
        previous = s
    return out


def header(j: Journey) -> str:
    what = "stamp request" if j.kind == "stamp" else "purchase"
    day = j.steps[0].at.strftime("%Y-%m-%d UTC") if j.steps else ""
    return f"{what} {j.id}  channel {j.channel_id}  account {j.account_id}  {day}"


def now_line(j: Journey) -> str:
    since = f" since {j.now.since.strftime('%H:%M:%S')}" if j.now.since and j.now.state == "waiting" else ""
    return f"now: {j.now.summary}{since}"


def as_json(j: Journey) -> dict:
    steps, previous = [], None
    for s in j.steps:
        steps.append({"at": s.at.isoformat(), "service": s.service, "step": s.step, "topic": s.topic or None,
                      "partition": s.partition, "offset": s.offset, "producer": s.producer or None,
                      "detail": s.detail or None,
                      "latency_ms": round((s.at - previous.at).total_seconds() * 1000, 1) if previous else None})
        previous = s
    return {"kind": j.kind, "id": j.id, "channel_id": j.channel_id, "account_id": j.account_id, "steps": steps,
            "now": {"state": j.now.state, "code": j.now.code or None,
                    "since": j.now.since.isoformat() if j.now.since else None, "summary": j.now.summary}}


async def trace(settings: Settings, ident: str, *, as_json_output: bool = False, follow: bool = False,
                interval: float = 1.0, out=print) -> int:
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"trace: cannot reach PostgreSQL: {exc}") from None
    tracer = Tracer(settings, conn)
    try:
        try:
            j = await tracer.identify(ident)
        except NotFound as exc:
            print(f"bubuh: trace: {exc}", file=sys.stderr)
            return 1
        except asyncpg.UndefinedTableError as exc:
            raise ConfigError(f"trace: {exc} (schema prefix {settings.schema_prefix!r}: has the platform "
                              "run against this database?)") from None
        await tracer.gather(j)
        text = out
        if as_json_output:     # machines get one document, at the end (after following, the final one)
            def text(_line: str) -> None:
                return None
        text(header(j))
        for line in step_lines(j.steps):
            text(line)
        if follow:
            await follow_journey(tracer, j, text, interval)
        else:
            text(now_line(j))
        if as_json_output:
            out(json.dumps(as_json(j), indent=2))
        return 0
    finally:
        await tracer.close()
        await conn.close()


async def follow_journey(tracer, j: Journey, text, interval: float) -> None:
    """Prints where the request stands, then each new step and each change, until the journey is finished.

    An end the database knows but whose last record is not yet on Kafka is said once, after that record's
    line: a follower's last line is always where the request stands."""
    shown = {s.identity for s in j.steps}
    said = now_line(j)
    text(said)
    last_is_now = True
    while not j.finished:
        await asyncio.sleep(interval)
        before = j.steps[:]
        await tracer.gather(j)
        new = [s for s in j.steps if s.identity not in shown]
        if new:
            earlier = [s for s in before if s.at <= new[0].at]
            for line in step_lines(new, earlier[-1] if earlier else None):
                text(line)
            shown |= {s.identity for s in new}
            last_is_now = False
        if now_line(j) != said and (j.finished or j.now.state not in TERMINAL):
            said = now_line(j)
            text(said)
            last_is_now = True
    if not last_is_now:
        text(said)


def run(settings: Settings, ident: str, *, as_json_output: bool, follow: bool) -> int:
    return asyncio.run(trace(settings, ident, as_json_output=as_json_output, follow=follow))
