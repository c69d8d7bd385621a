"""Stamp intake admits a bounded number of uploads per process; the next is answered at once.

Found by the deadline-day report (``loadtests/deadline_day.py``): in the spike, uploads queued inside
the API process past the channels' 30 s budget were still parsed, checked, stored and published for
callers long gone (10,242 of 15,650 requests got no answer in time), while the next ones waited
behind them. With ``BUBUH_INTAKE_MAX_IN_FLIGHT`` uploads in progress, the next gets 503 ``UNAVAILABLE``
with ``Retry-After`` before its body is read, and a slot is free again as soon as an upload ends.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from loadtests import corpus
from tests.flows import post_stamp, stamp_meta

BOUND = 2


@pytest.mark.platform_env(BUBUH_INTAKE_MAX_IN_FLIGHT=BOUND)
async def test_uploads_beyond_the_bound_are_answered_at_once_and_the_bound_frees_up(platform, settings, channel):
    scan = corpus.scan_800k(4)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=60,
                                 limits=limits) as api:
        r = await post_stamp(api, channel, corpus.a4_text(1), stamp_meta())
        assert r.status_code == 202, r.text                     # the channel is known, the door open

        async def upload() -> tuple[int, float, httpx.Response]:
            started = time.perf_counter()
            r = await post_stamp(api, channel, scan, stamp_meta())
            return r.status_code, time.perf_counter() - started, r

        answers = await asyncio.gather(*(upload() for _ in range(16)))
        statuses = sorted(s for s, _, _ in answers)
        assert set(statuses) <= {202, 503}, statuses
        busy = [(took, r) for s, took, r in answers if s == 503]
        assert busy, f"16 uploads at once with a bound of {BOUND}: none was turned away ({statuses})"
        assert statuses.count(202) >= BOUND
        for took, r in busy:
            assert r.json()["code"] == "UNAVAILABLE" and 1 <= int(r.headers["Retry-After"]) <= 30, r.text
            assert took < 3.0, f"a turned-away upload waited {took:.1f} s"

        for _ in range(2 * BOUND + 1):          # one at a time: every slot came back
            r = await post_stamp(api, channel, scan, stamp_meta())
            assert r.status_code == 202, r.text
