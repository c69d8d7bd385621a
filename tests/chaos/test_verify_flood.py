"""Anonymous verification cannot starve stamp intake (issue 11): eight clients from 127.0.0.2 to
127.0.0.9 upload the heaviest document verification still answers (a 1,500-field form, about two
seconds of pyHanko CPU each) in a loop, ignoring Retry-After, while a channel uploads letters.
Stamp intake's p99 during the flood stays within 2x its quiet p99 measured just before, same run.

Why it holds: verification runs in its own pool of children under SCHED_IDLE (any other task that
wakes takes the core at once; at nice 10 alone the outside CI saw flooded p99 91 ms against 28 ms
quiet, after the whole suite) with at most 8 waiting (BUSY beyond), and each address has a token
bucket (RATE_LIMITED), checked before the upload is parsed; intake has its own children.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtests import corpus
from tests.flows import auth, stamp_meta
from tests.platform import PlatformProcess, add_channel

# exclusive: it compares latencies, so it runs alone, not beside the other test workers' load
pytestmark = [pytest.mark.slow, pytest.mark.exclusive]
# 200 intake requests a phase (~4 s each): with 40, "p99" was nearly the slowest sample, and one
# commit that waited on the disk's flush (60-90 ms, quiet or flooded alike) decided the comparison
SAMPLES = 200
ROOT = Path(__file__).resolve().parents[2]
WARM_UP = 40


async def _settled(limit: float = 0.35, within_s: float = 60.0) -> float:
    """Wait until the machine's cores are mostly idle over one second (``make test`` runs this test right
    after the parallel suite, whose processes, checkpoints and vacuums may still be finishing): the
    comparison is of the flood against quiet, not of whatever else was running. Returns the last busy share."""
    from loadtests.bench_pipeline import system_busy

    deadline = time.monotonic() + within_s
    while True:
        b0, t0 = system_busy()
        await asyncio.sleep(1.0)
        b1, t1 = system_busy()
        busy = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        if busy <= limit or time.monotonic() > deadline:
            return busy


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def _intake_latencies(api: httpx.AsyncClient, channel: dict, letter: bytes, n: int = SAMPLES) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        r = await api.post("/v1/stamps", headers=auth(channel), files={"file": ("l.pdf", letter, "application/pdf")},
                           data={"meta": json.dumps(stamp_meta("flood"))})
        out.append(time.perf_counter() - started)
        assert r.status_code == 202, r.text
    return out


async def test_eight_verification_flooders_leave_stamp_intake_within_twice_its_quiet_p99(settings):
    letter = corpus.a4_text(11)
    busy_before = await _settled()
    front = await PlatformProcess(settings, api="all", workers="none", name="flood-front").start()
    base = f"http://127.0.0.1:{settings.http_port}"
    flood: asyncio.subprocess.Process | None = None
    try:
        # by the command, in a process of its own: this process times intake, and the command's
        # modules in it (a larger heap for the collector to walk) are not what is measured
        channel = await asyncio.to_thread(add_channel, settings, by_cli=True)
        async with httpx.AsyncClient(base_url=base, timeout=60) as api:
            warm = await _intake_latencies(api, channel, letter, WARM_UP)  # first uses warm caches
            quiet = await _intake_latencies(api, channel, letter)
            # the flooders in a process of their own: sharing this event loop, their client work was
            # timed as intake's
            flood = await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.chaos.verify_flooder", base,
                                                         cwd=ROOT, stdout=asyncio.subprocess.PIPE)
            assert (await asyncio.wait_for(flood.stdout.readline(), 60)).strip() == b"flooding"
            await asyncio.sleep(3)                                                 # the flood is on
            flooded = await _intake_latencies(api, channel, letter)
            flood.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(flood.communicate(), 150)
            answers = {int(k): v for k, v in json.loads(out).items()}
    finally:
        if flood is not None and flood.returncode is None:
            flood.kill()
        await front.stop()
    quiet_p99, flooded_p99 = _p99(quiet), _p99(flooded)
    print(f"stamp intake p99: quiet {quiet_p99 * 1000:.0f} ms, flooded {flooded_p99 * 1000:.0f} ms; "
          f"p50 {statistics.median(quiet) * 1000:.0f} and {statistics.median(flooded) * 1000:.0f} ms, slowest "
          f"{max(quiet) * 1000:.0f} and {max(flooded) * 1000:.0f} ms "
          f"(warm-up p50 {statistics.median(warm) * 1000:.0f} ms); verify answers {answers}; the cores were "
          f"{100 * busy_before:.0f}% busy before it began")
    # the flood was real: the verification pool worked through heavy documents the whole time, and
    # whatever it could not take was turned away with a code
    assert answers.get(200, 0) >= 8, answers
    assert set(answers) <= {200, 429, 503}, answers
    assert flooded_p99 <= 2 * quiet_p99, (quiet_p99, flooded_p99, answers)
