"""The body limits as the OpenAPI document states them, and BodyLimits' rules at the ASGI level.
(The same against the real server, with a raw socket client: tests/integration/test_intake_limits.py.)"""

from __future__ import annotations

import json
from unittest.mock import MagicMock

from fastapi import APIRouter, Request

from services.kernel import errors, http, metrics
from services.kernel.settings import Settings
from services.purchase import api as purchase_api
from services.stamping import api as stamping_api


def _routers(settings: Settings) -> list[APIRouter]:
    stamping = stamping_api.router(settings, *(MagicMock() for _ in range(4)))
    return [stamping, purchase_api.router(settings, MagicMock(), MagicMock())]


def test_the_openapi_document_names_every_body_limit_and_the_refusals():
    settings = Settings()
    doc = http.create_app("Bubuh", _routers(settings)).openapi()
    expect = {"/v1/stamps": (settings.stamp_max_body_bytes, "PDF_TOO_LARGE", {"401", "413", "422"}),
              "/v1/verify": (settings.verify_max_body_bytes, "PDF_TOO_LARGE", {"413", "422"}),
              "/v1/purchases": (settings.purchase_max_body_bytes, "BODY_TOO_LARGE", {"401", "413", "422"})}
    for path, (limit, code, statuses) in expect.items():
        op = doc["paths"][path]["post"]
        assert op["x-max-body-bytes"] == limit and op["x-body-too-large-code"] == code, path
        assert statuses <= set(op["responses"]), (path, op["responses"].keys())
        assert f"At most {limit} bytes" in op["requestBody"]["description"], path
    fields = doc["paths"]["/v1/stamps"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(fields["required"]) == {"file", "meta"} and fields["properties"]["file"]["maxLength"] > 0


class _Harness:
    """One request through BodyLimits around a tiny app that reads its body when told to."""

    def __init__(self, limit: int = 100) -> None:
        r = APIRouter()
        self.read = False

        @r.post("/upload", openapi_extra=http.body_limit(limit))
        async def upload(request: Request):
            self.read = True
            return {"bytes": len(await request.body())}

        @r.post("/refuse", openapi_extra=http.body_limit(limit))
        async def refuse():
            raise errors.BubuhError(errors.UNAUTHENTICATED)   # as a route does before reading

        self.app = http.create_app("t", [r])

    async def post(self, headers: dict[str, str], chunks: list[bytes],
                   path: str = "/upload") -> tuple[int, dict[str, str], dict, int]:
        sent: list[dict] = []
        queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        taken = 0

        async def receive():
            nonlocal taken
            if queue:
                taken += 1
                return queue.pop(0)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await self.app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body), taken


async def test_a_declared_length_over_the_limit_never_reaches_the_route():
    h = _Harness()
    before = metrics.HTTP_REQUESTS.labels("/upload", "413")._value.get()
    status, headers, body, taken = await h.post({"content-length": "101"}, [b"x" * 101])
    assert (status, body["code"], headers.get("connection")) == (413, "BODY_TOO_LARGE", "close")
    assert taken == 0 and not h.read
    # counted under its route, though the router never ran (it was "unmatched")
    assert metrics.HTTP_REQUESTS.labels("/upload", "413")._value.get() == before + 1


async def test_a_streamed_body_stops_at_the_limit():
    h = _Harness()
    status, headers, body, taken = await h.post({"transfer-encoding": "chunked"}, [b"x" * 60] * 10)
    assert (status, body["code"], headers.get("connection")) == (413, "BODY_TOO_LARGE", "close")
    assert taken == 2   # the chunk that passed the limit is the last one read


async def test_within_the_limit_the_route_reads_it_all_and_the_connection_lives():
    h = _Harness()
    status, headers, body, _ = await h.post({"transfer-encoding": "chunked"}, [b"x" * 50, b"y" * 50])
    assert (status, body, headers.get("connection")) == (200, {"bytes": 100}, None)


async def test_an_early_answer_drops_a_small_rest_and_closes_on_a_large_one():
    h = _Harness(limit=1024 * 1024)
    small = [b"x" * 1000] * 3
    status, headers, _, taken = await h.post({"content-length": "3000"}, small, "/refuse")
    assert (status, headers.get("connection"), taken) == (401, None, 3)   # read and dropped: keep-alive
    large = [b"x" * 100_000] * 5
    status, headers, _, taken = await h.post({"content-length": "500000"}, large, "/refuse")
    assert (status, headers.get("connection"), taken) == (401, "close", 0)   # not read: the server closes
    status, headers, _, taken = await h.post({"transfer-encoding": "chunked"}, small, "/refuse")
    assert (status, headers.get("connection"), taken) == (401, "close", 0)   # unknown length: closes


async def test_every_answer_carries_its_trace_and_an_unhandled_exception_gets_a_coded_answer():
    """TraceAndMeasure: the caller's trace id comes back in ``traceparent`` and in the error body; a
    dependency away is 503 UNAVAILABLE with Retry-After, anything else 500 INTERNAL, never a bare crash."""
    import httpx

    from services.kernel import metrics

    r = APIRouter()

    @r.get("/away")
    async def away():
        raise ConnectionRefusedError(111, "Connection refused")

    @r.get("/bug")
    async def bug():
        raise RuntimeError("a bug")

    @r.get("/fine")
    async def fine():
        return {"ok": True}

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    before = metrics.HTTP_REQUESTS.labels("/bug", "500")._value.get()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=http.create_app("t", [r])),
                                 base_url="http://t", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}) as c:
        fine_r, away_r, bug_r = await c.get("/fine"), await c.get("/away"), await c.get("/bug")
    assert fine_r.status_code == 200 and fine_r.headers["traceparent"].startswith(f"00-{trace}-")
    assert away_r.status_code == 503 and away_r.json()["code"] == "UNAVAILABLE" and away_r.headers["retry-after"]
    assert bug_r.status_code == 500 and bug_r.json()["code"] == "INTERNAL"
    assert bug_r.json()["trace_id"] == trace and bug_r.headers["traceparent"].startswith(f"00-{trace}-")
    assert metrics.HTTP_REQUESTS.labels("/bug", "500")._value.get() == before + 1


async def test_a_caller_gone_mid_upload_is_counted_as_499_not_an_internal_error():
    """Starlette raises ClientDisconnect when the connection closes while a route reads the body: the
    caller left, nothing failed here. It was answered (to nobody) and counted as a 500 INTERNAL with
    an error log; it is counted as 499 and nothing is sent."""
    from services.kernel import metrics

    r = APIRouter()

    @r.post("/upload", openapi_extra=http.body_limit(1 << 20))
    async def upload(request: Request):
        async for _ in request.stream():
            pass
        return {"ok": True}

    app = http.create_app("t", [r])
    arriving = [{"type": "http.request", "body": b"x" * 100, "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return arriving.pop(0)

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    before = (metrics.HTTP_REQUESTS.labels("/upload", "499")._value.get(),
              metrics.HTTP_REQUESTS.labels("/upload", "500")._value.get())
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/upload", "raw_path": b"/upload", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"t"), (b"content-length", b"1000")], "client": ("127.0.0.1", 1),
             "server": ("t", 80)}
    await app(scope, receive, send)
    assert sent == []
    assert (metrics.HTTP_REQUESTS.labels("/upload", "499")._value.get(),
            metrics.HTTP_REQUESTS.labels("/upload", "500")._value.get()) == (before[0] + 1, before[1])


async def test_callers_turned_away_together_are_told_to_come_back_at_different_times():
    """A route at its admission bound answers 503 at once; its Retry-After, like that of the route's
    own retryable errors (Kafka away), is spread by how many were turned away (kernel/retry_after.py):
    a fixed 1 s brought them all back together, to be turned away again."""
    import asyncio

    import httpx

    r = APIRouter()
    release = asyncio.Event()

    @r.post("/slow", openapi_extra=http.body_limit(100, max_in_flight=1))
    async def slow(request: Request):
        await request.body()
        if request.headers.get("x-kafka-away"):
            raise errors.BubuhError(errors.UNAVAILABLE, "Kafka has acknowledged nothing")
        await release.wait()
        return {"ok": True}

    refused_before = metrics.HTTP_REQUESTS.labels("/slow", "503")._value.get()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=http.create_app("t", [r])),
                                 base_url="http://t") as c:
        held = asyncio.create_task(c.post("/slow", content=b"x"))
        await asyncio.sleep(0.05)
        busy = await asyncio.gather(*(c.post("/slow", content=b"x") for _ in range(60)))
        release.set()
        assert (await held).status_code == 200
        away = [await c.post("/slow", content=b"x", headers={"x-kafka-away": "1"}) for _ in range(5)]
    assert {b.status_code for b in busy} == {503} and {b.json()["code"] for b in busy} == {"UNAVAILABLE"}
    waits = [int(b.headers["retry-after"]) for b in busy]
    assert min(waits) >= 1 and max(waits) <= 30
    assert len(set(waits)) >= 5 and max(waits) >= 10, waits
    assert {a.status_code for a in away} == {503}
    assert all(int(a.headers["retry-after"]) >= 1 for a in away)
    assert max(int(a.headers["retry-after"]) for a in away) > 1     # the same route's spread: 60 just refused
    # the 60 turned away at the bound count under the route, with the 5 the route itself answered 503
    assert metrics.HTTP_REQUESTS.labels("/slow", "503")._value.get() == refused_before + 65


async def test_first_turned_away_first_taken_with_the_ticket_the_503_gave():
    """At the admission bound, a request with an Idempotency-Key is given its place in line as well as
    its Retry-After (Bubuh-Queue-Ticket, kernel/retry_after.py). Sent back at its time, the ticket lets it
    in ahead of newcomers, which are booked behind it; early, it keeps its place; on another request, or
    altered, it counts for nothing. (6 December: with a spread alone, 550-1,056 deadline-day requests a
    round were turned away again and again past their client's 30 s, while later ones got in.)"""
    import asyncio
    import time

    import httpx

    r = APIRouter()
    release = asyncio.Semaphore(0)           # one request finishes per release()
    taken: list[str] = []

    @r.post("/slow", openapi_extra=http.body_limit(100, max_in_flight=2))
    async def slow(request: Request):
        await request.body()
        taken.append(request.headers.get("idempotency-key", ""))
        await release.acquire()
        return {"ok": True}

    def sent(key: str, ticket: str | None = None, caller: str = "Bearer a") -> dict[str, str]:
        return {"Idempotency-Key": key, "Authorization": caller} | ({"Bubuh-Queue-Ticket": ticket} if ticket else {})

    counted = {o: metrics.QUEUE_TICKETS.labels("/slow", o)._value.get()
               for o in ("issued", "honoured", "early", "full", "invalid")}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=http.create_app("t", [r])),
                                 base_url="http://t") as c:
        held = [asyncio.create_task(c.post("/slow", content=b"x", headers=sent(f"held-{i}"))) for i in range(2)]
        await asyncio.sleep(0.05)
        first, second, third = [await c.post("/slow", content=b"x", headers=sent(k)) for k in ("a", "b", "c")]
        keyless = await c.post("/slow", content=b"x")
        assert {x.status_code for x in (first, second, third, keyless)} == {503}
        tickets = [x.headers["bubuh-queue-ticket"] for x in (first, second, third)]
        times = [int(t.split(".")[0]) for t in tickets]
        assert times == sorted(times) and len(set(times)) == 3            # in the order turned away
        assert int(first.headers["retry-after"]) >= 1
        assert "bubuh-queue-ticket" not in keyless.headers                # no key: a retry is another request
        early = await c.post("/slow", content=b"x", headers=sent("c", tickets[2]))
        assert early.status_code == 503 and early.headers["bubuh-queue-ticket"] == tickets[2]   # its place kept
        assert int(early.headers["retry-after"]) >= 2
        await asyncio.sleep(max(0.0, times[0] / 1000 - time.time() - 0.3))     # the first ticket's time
        # while "a" is booked: a newcomer is booked behind it, a ticket on another request counts for nothing
        newcomer = await c.post("/slow", content=b"x", headers=sent("d"))
        borrowed = await c.post("/slow", content=b"x", headers=sent("e", tickets[0]))
        other_caller = await c.post("/slow", content=b"x", headers=sent("a", tickets[0], "Bearer b"))
        assert (newcomer.status_code, borrowed.status_code, other_caller.status_code) == (503, 503, 503)
        assert int(newcomer.headers["bubuh-queue-ticket"].split(".")[0]) > times[2]
        full = await c.post("/slow", content=b"x", headers=sent("a", tickets[0]))     # its turn, but still full
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        again = full.headers["bubuh-queue-ticket"]                     # a turn a second on, ahead of "d"
        assert int(again.split(".")[0]) < int(newcomer.headers["bubuh-queue-ticket"].split(".")[0])
        release.release()                                              # one of the two held ends: a slot
        assert (await held[0]).status_code == 200
        await asyncio.sleep(max(0.0, int(again.split(".")[0]) / 1000 - time.time() - 0.3))
        late_newcomer = await c.post("/slow", content=b"x", headers=sent("f"))
        back = asyncio.create_task(c.post("/slow", content=b"x", headers=sent("a", again)))
        await asyncio.sleep(0.05)
        assert late_newcomer.status_code == 503                        # below the bound, but a line stands
        assert taken == ["held-0", "held-1", "a"]                      # the slot went to "a", not to "f"
        for _ in range(2):
            release.release()
        assert [(await t).status_code for t in (held[1], back)] == [200, 200]
    got = {o: metrics.QUEUE_TICKETS.labels("/slow", o)._value.get() - counted[o] for o in counted}
    assert got == {"issued": 7, "honoured": 1, "early": 1, "full": 1, "invalid": 2}


async def test_only_a_known_caller_is_given_a_place_in_line():
    """Requests with made-up keys and credentials must not fill the line ahead of real callers: with the
    platform's ``caller`` (the channel an Authorization header names), an unknown one gets a spread
    Retry-After and no ticket, and a ticket is bound to the channel, not to the header's text."""
    import asyncio

    import httpx

    r = APIRouter()
    release = asyncio.Event()

    @r.post("/slow", openapi_extra=http.body_limit(100, max_in_flight=1))
    async def slow(request: Request):
        await request.body()
        await release.wait()
        return {"ok": True}

    known = {"Bearer good": "channel-a", "Bearer also-a": "channel-a"}
    app = http.create_app("t", [r], caller=known.get)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        held = asyncio.create_task(c.post("/slow", content=b"x"))
        await asyncio.sleep(0.05)
        stranger = await c.post("/slow", content=b"x", headers={"Authorization": "Bearer made-up",
                                                                 "Idempotency-Key": "k1"})
        member = await c.post("/slow", content=b"x", headers={"Authorization": "Bearer good", "Idempotency-Key": "k2"})
        ticket = member.headers["bubuh-queue-ticket"]
        early = await c.post("/slow", content=b"x", headers={"Authorization": "Bearer also-a", "Idempotency-Key": "k2",
                                                              "Bubuh-Queue-Ticket": ticket})
        release.set()
        assert (await held).status_code == 200
    assert stranger.status_code == 503 and "bubuh-queue-ticket" not in stranger.headers
    assert 1 <= int(stranger.headers["retry-after"]) <= 30
    assert member.status_code == 503
    # the channel's other key reads the same ticket as the channel's: kept in line, not judged anew
    assert early.status_code == 503 and early.headers["bubuh-queue-ticket"] == member.headers["bubuh-queue-ticket"]


async def test_a_bound_in_largest_uploads_lets_small_ones_in_by_their_share(tmp_path):
    """With ``smallest_share`` (the stamp route's, ``BUBUH_INTAKE_SMALLEST_SHARE``), the admission bound is
    that many of the route's largest uploads: a smaller one counts as its Content-Length, at least the
    share of the largest; a chunked one (no length) as the largest. The door's busy mark still counts
    requests (kernel/door_pressure.py). A spike of 1.5 KB letters met a bound of 64 requests while the
    process held 100 KB of bodies of the 640 MiB it may (make surge-open, 7 December: 24-104 503s)."""
    import asyncio

    import httpx

    from services.kernel import door_pressure

    r = APIRouter()
    release = asyncio.Event()

    @r.post("/slow", openapi_extra=http.body_limit(1000, max_in_flight=2, smallest_share=0.25))
    async def slow(request: Request):
        await request.body()
        await release.wait()
        return {"ok": True}

    async def chunks():
        yield b"y" * 10

    mark = tmp_path / "door-busy"
    app = http.create_app("t", [r], door_busy_file=str(mark))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        small = [asyncio.create_task(c.post("/slow", content=b"x" * 10)) for _ in range(7)]
        await asyncio.sleep(0.05)
        assert door_pressure.marked_at(mark) is not None        # 7 requests past half of 2: busy
        whole = await c.post("/slow", content=b"x" * 600)         # 1,750 held of 2,000: 600 does not fit
        streamed = await c.post("/slow", content=chunks())        # no length: the largest, 1,000
        eighth = asyncio.create_task(c.post("/slow", content=b"x" * 10))     # 250 more: 2,000, the bound
        await asyncio.sleep(0.05)
        ninth = await c.post("/slow", content=b"x")
        release.set()
        answers = [await t for t in (*small, eighth)]
    assert (whole.status_code, streamed.status_code, ninth.status_code) == (503, 503, 503)
    assert ninth.json()["code"] == "UNAVAILABLE" and "2 x 1000 bytes" in ninth.json()["detail"]
    assert [a.status_code for a in answers] == [200] * 8

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        release.clear()
        large = asyncio.create_task(c.post("/slow", content=b"x" * 1000))    # one of the largest: half the bound
        await asyncio.sleep(0.05)
        smalls = [asyncio.create_task(c.post("/slow", content=b"x" * 300)) for _ in range(3)]   # 900 more: fits
        await asyncio.sleep(0.05)
        over = await c.post("/slow", content=b"x" * 300)                     # 2,200: over
        release.set()
        assert [(await t).status_code for t in (large, *smalls)] == [200] * 4
    assert over.status_code == 503


def test_the_stamp_routes_bound_is_stated_in_largest_uploads():
    settings = Settings()
    doc = http.create_app("Bubuh", _routers(settings)).openapi()
    op = doc["paths"]["/v1/stamps"]["post"]
    assert op["x-max-in-flight"] == settings.intake_max_in_flight
    assert op["x-smallest-share"] == settings.intake_smallest_share == 0.25
    text = op["requestBody"]["description"]
    assert f"up to {int(settings.intake_max_in_flight / 0.25)} small uploads" in text, text
