"""Issue 12's ETA check at a size that fits CI: three channels each keep a set number of stamp requests
unfinished (``loadtests/held_queue.py``: a new one for each the ledger commits, about 35 s of them), so the
stamping tier, made the bottleneck (one signing child, one taker), works through a standing queue of
about 20 s of its pace (measured first; 300 requests or more), as on a deadline day. The requests sent
once the queue stands ("held") must have a median first ETA of 10 s or more (else the check does not
apply: issue 12 asks it of such a run), and their first ETAs must be right at the pace the tier kept
before each 202 (the bounds below; the time they took is held to them loosely: the machine's pace moves
under a wait).

The first of each channel ("fill", sent at once into an empty queue) are reported, not asserted:
their ETAs are short, and the tier signs slower while the door takes that burst on the same two cores
than after it, which no ETA given in the burst can know (README, "ETAs people can plan by").
"""

from __future__ import annotations

import asyncio
import json

import pytest

from loadtests import held_queue
from tests.platform import PlatformProcess, env_for

pytestmark = [pytest.mark.slow, pytest.mark.exclusive]   # it times the tier: alone on the cores

CHANNELS = 3
HELD_S = 35.0       # the held phase in seconds of the calibration's pace (held_queue.sized; the benchmark: 60 s).
                    # A held phase of 1-2 queues read the tier's speed-up after the fill as ETA error: took/ETA
                    # 0.67-0.74


async def test_requests_joining_a_standing_queue_complete_within_a_quarter_of_their_first_eta(settings):
    front = PlatformProcess(settings, api="all", workers="purchase,quota,notification", name="front")
    worker = PlatformProcess(settings, api="none", workers="stamping", name="worker",
                             BUBUH_SIGNING_PROCESSES="1", BUBUH_STAMPING_CONCURRENCY="1")
    base, env = f"http://127.0.0.1:{settings.http_port}", env_for(settings)
    try:
        await asyncio.gather(front.start(), worker.start())     # as an orchestrator starts pods: together
        # how fast this tier signs today (38-60 stamps/s on this box): a small held run, which also gives
        # the estimate a history, as a deadline day's queue does not meet a cold platform
        pace = await held_queue.calibrate(base, env, CHANNELS)
        depth, stamps = held_queue.sized(pace, CHANNELS, held_s=HELD_S)
        held_each = stamps - depth
        run = await held_queue.play(base, env, channels=CHANNELS, depth=depth, stamps=stamps)
    finally:
        await worker.stop()
        await front.stop()
    print("\n" + json.dumps({"pace": round(pace, 1), "depth": depth} |
                             {k: run[k] for k in ("eta", "at_pace_before", "seconds", "positions", "refused")}))
    assert run["outcomes"] == {"completed": CHANNELS * stamps}
    held = run["eta"]["held"]
    assert held["requests"] >= CHANNELS * held_each * 0.95
    # the fault was real: a standing queue, long enough for issue 12's check to apply
    assert run["positions"]["held"] >= CHANNELS * depth * 0.8
    assert held["median_first_eta_s"] >= 10.0, held
    # Issue 12 asks 90% within 25%: the benchmark's check (make surge-eta), on a box left alone. Here the
    # cores are shared with whatever else the machine runs, and an ETA is the requests ahead over the pace
    # the tier keeps now: when the cores are taken or given back during a wait, or the pace drifts, the
    # wait ends early or late by as much, and no estimate made at the 202 can know it (CI, 3 December:
    # calibrated at 7/s, the tier then signed at 13-19/s and the held requests took 0.71 of their ETAs;
    # here two busy loops in the first 60-70 s gave 0.61-0.83, and a run left alone whose tier slowed
    # from 27 to 16/s, 1.18-1.31). So the time taken is only held to its ETA loosely, and the estimate's
    # own accuracy is asserted: each ETA against the time its wait would have taken at the pace the tier
    # kept in the 15 s before its 202 (held_queue.at_the_pace_before), so the requests ahead counted
    # right and the present pace read right. In those runs: 100% within 25%, median 0.97. (The estimate
    # before 3 December told a queue that formed after a quieter spell 1.6x its time.)
    assert 0.5 <= held["actual_over_eta"]["median"] <= 2.0, held
    foreseen = run["at_pace_before"]["held"]
    # a request counts once the run has 15 s of completions before its 202: on a fast tier the held phase
    # is ~35 s, so about half (CI, 3 December: 522 of 1,119 at 32 stamps/s, all within 25%)
    assert foreseen["requests"] >= CHANNELS * held_each * 0.25, foreseen
    assert 0.85 <= foreseen["actual_over_eta"]["median"] <= 1.18, foreseen
    assert foreseen["within_25_percent"] >= 0.8, foreseen
