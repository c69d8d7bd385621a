"""Stamp intake admits a bounded number of uploads per process; the next is answered at once.

Found by the deadline-day report (``loadtests/deadline_day.py``): in the spike, uploads queued inside
the API process past the channels' 30 s budget were still parsed, checked, stored and published for
callers long gone (10,242 of 15,650 requests got no answer in time), while the next ones waited
behind them. With uploads worth ``BUBUH_INTAKE_MAX_IN_FLIGHT`` of the largest in progress, the next gets 503
``UNAVAILABLE`` with ``Retry-After`` before its body is read, and a slot is free again as soon as an upload
ends. An 800 KB scan counts as a quarter of the largest upload (``BUBUH_INTAKE_SMALLEST_SHARE``), so a bound
of 2 holds 8 of them (the weights themselves: tests/unit/test_body_limits.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

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


@pytest.mark.platform_env(BUBUH_INTAKE_MAX_IN_FLIGHT=BOUND)
async def test_a_request_turned_away_keeps_its_place_with_the_ticket_the_503_gave(platform, settings, channel):
    """docs/channels.md, "Keep your place in line": a request with an Idempotency-Key turned away at the
    bound gets a Bubuh-Queue-Ticket, and its Retry-After is its turn, later for those turned away later.
    Sent back at its turn with the ticket (and the same key), it is taken; with the ticket on another
    request, the ticket counts for nothing."""
    import json

    scan = corpus.scan_800k(4)
    meta = json.dumps(stamp_meta())
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=60,
                                 limits=limits) as api:
        def post(key: str, ticket: str | None = None) -> Awaitable[httpx.Response]:
            headers = {"Authorization": f"Bearer {channel['api_key']}", "Idempotency-Key": key}
            return api.post("/v1/stamps", headers=headers | ({"Bubuh-Queue-Ticket": ticket} if ticket else {}),
                            files={"file": ("doc.pdf", scan, "application/pdf")}, data={"meta": meta})

        keys = [f"ticket-{time.time_ns()}-{i}" for i in range(16)]
        answers = dict(zip(keys, await asyncio.gather(*(post(k) for k in keys)), strict=True))
        busy = {k: r for k, r in answers.items() if r.status_code == 503}
        assert busy, f"16 uploads at once with a bound of {BOUND}: none was turned away"
        assert all(answers[k].status_code == 202 for k in keys if k not in busy)
        tickets = {k: r.headers["Bubuh-Queue-Ticket"] for k, r in busy.items()}
        turns = sorted((int(t.split(".")[0]), k) for k, t in tickets.items())
        assert len({t for t, _ in turns}) == len(turns)                  # a turn each
        for _, k in turns:
            assert 1 <= int(busy[k].headers["Retry-After"]) <= 30

        stranger = await post(f"stranger-{time.time_ns()}", tickets[turns[0][1]])   # someone else's ticket
        if stranger.status_code == 503:                            # judged as a newcomer: booked anew
            assert stranger.headers["Bubuh-Queue-Ticket"] != tickets[turns[0][1]]
        else:
            assert stranger.status_code == 202, stranger.text

        async def at_its_turn(k: str) -> tuple[str, int, int]:
            ticket, tries = tickets[k], 0
            while True:
                await asyncio.sleep(max(0.0, int(ticket.split(".")[0]) / 1000 - time.time()))
                r = await post(k, ticket)
                tries += 1
                if r.status_code != 503 or tries >= 5:
                    return k, r.status_code, tries
                ticket = r.headers.get("Bubuh-Queue-Ticket", ticket)

        back = await asyncio.gather(*(at_its_turn(k) for _, k in turns))
        assert all(status == 202 for _, status, _ in back), back
        assert sum(tries for _, _, tries in back) <= len(back) + 2, back      # at its turn, nearly always in
