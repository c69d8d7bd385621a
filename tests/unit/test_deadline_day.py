"""The deadline-day report's shape, accounting and plots (loadtests/deadline_day.py), without a platform."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from pathlib import Path

from loadtests.deadline_day import (
    PLOTS,
    SCRAPE_EVERY_S,
    Credits,
    Scrapes,
    Sent,
    buckets,
    channel_times,
    combine,
    eta_check,
    ledger_check,
    markdown,
    open_requests,
    phases,
    plot,
    purchase_summary,
    purchases,
    schedule,
    summarise,
    tier_rates,
    units_needed,
    verdict,
    with_gaps,
)
from loadtests.load_client import Answer

SHARES = (0.55, 0.25, 0.12, 0.08)


def test_the_day_ramps_holds_and_spikes_with_channels_of_unequal_size():
    shape = phases(100, 200, 50)
    day = schedule(shape, 20.0, SHARES, seed=3)
    assert day == schedule(shape, 20.0, SHARES, seed=3)                 # reproducible
    assert [a.t for a in day] == sorted(a.t for a in day)
    by_phase = {p.name: [a for a in day if a.phase == p.name] for p in shape}
    # expected: ramp 100 s from 2/s to 16/s = 900; plateau 200 s at 16/s = 3,200; spike 50 s at 60/s = 3,000
    assert 800 <= len(by_phase["ramp"]) <= 1_000
    assert 2_950 <= len(by_phase["plateau"]) <= 3_450
    assert 2_750 <= len(by_phase["spike"]) <= 3_250
    ramp = by_phase["ramp"]
    first, second = sum(a.t < 50 for a in ramp), sum(a.t >= 50 for a in ramp)
    assert second > 1.5 * first                                           # it rises
    counts = [sum(a.channel == c for a in day) / len(day) for c in range(len(SHARES))]
    assert all(abs(got - want) < 0.02 for got, want in zip(counts, SHARES, strict=True))


def test_every_stamp_is_paid_for_before_it_arrives():
    day = schedule(phases(60, 120, 30), 25.0, SHARES, seed=5)
    buys = purchases(day, len(SHARES), units=10, lead_s=40)
    assert all(n == 10 or when == 0.0 for when, _, n in buys)
    assert len([b for b in buys if b[0] == 0.0]) == len(SHARES)           # one purchase per channel up front
    for c in range(len(SHARES)):
        mine = [a.t for a in day if a.channel == c]
        for i, t in enumerate(mine):       # the i-th stamp: i + 1 units bought at least 40 s before it (or up front)
            paid = sum(n for when, ch, n in buys if ch == c and (when == 0.0 or when <= t - 40 + 1e-9))
            assert paid >= i + 1, (c, i, t)
        assert sum(n for _, ch, n in buys if ch == c) - len(mine) < 10    # and not much more


def test_tier_rates_count_a_restarted_process_from_zero_as_prometheus_does():
    s = SCRAPE_EVERY_S
    samples = [(0.0, "worker", "stamping", 100.0), (s, "worker", "stamping", 150.0),
               (2 * s, "worker", "stamping", 20.0),                   # SIGKILLed and started again: from 0
               (3 * s, "worker", "stamping", 70.0),
               (s, "api", "stamping", 5.0), (2 * s, "api", "stamping", 10.0)]
    rates = dict(tier_rates(samples)["stamping"])
    assert rates[s] == 50 / s
    assert rates[2 * s] == 20 / s + 5 / s                                # summed over processes
    assert rates[3 * s] == 50 / s


def test_scrapes_read_the_tiers_and_the_queue_depth_from_the_text_format():
    text = "\n".join([
        "# TYPE bubuh_stamp_outcomes_total counter",
        'bubuh_stamp_outcomes_total{code="",outcome="completed"} 40.0',
        'bubuh_stamp_outcomes_total{code="TSA_UNAVAILABLE",outcome="failed"} 3.0',
        "# TYPE bubuh_ledger_operations_total counter",
        'bubuh_ledger_operations_total{operation="reserve",outcome="applied"} 7.0',
        'bubuh_ledger_operations_total{operation="reserve",outcome="refused"} 1.0',
        'bubuh_ledger_operations_total{operation="commit",outcome="applied"} 6.0',
        "# TYPE bubuh_stamp_queue_depth_requests gauge",
        "bubuh_stamp_queue_depth_requests 12.0", ""])
    scrapes = Scrapes({"p": 1})
    scrapes.take(5.0, "p", text)
    scrapes.take(5.0, "q", "# TYPE bubuh_stamp_queue_depth_requests gauge\nbubuh_stamp_queue_depth_requests 0.0\n")
    got = {tier: v for _, _, tier, v in scrapes.samples}
    assert got == {"stamping (completed)": 40.0, "quota (reservations)": 8.0}
    assert scrapes.depth == [(5.0, 12.0)]                                 # the process that keeps it


async def _metrics_server(delay_s: float, counter: str) -> asyncio.Server:
    """A /metrics on loopback answering after ``delay_s``: a platform process, busy or not."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            await asyncio.sleep(delay_s)
            body = f"# TYPE bubuh_stamp_outcomes_total counter\n{counter}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def test_a_slow_process_does_not_space_out_the_others_samples(monkeypatch):
    """6 December: the report scraped seven processes one after the other, and in the spike the API
    processes' slow /metrics spaced every sample 25 s apart. Each round now scrapes them at once, on
    the clock, and a process over the timeout only misses that round."""
    import loadtests.deadline_day as day

    monkeypatch.setattr(day, "SCRAPE_EVERY_S", 0.4)
    monkeypatch.setattr(day, "SCRAPE_TIMEOUT_S", 0.3)
    fast = await _metrics_server(0.0, 'bubuh_stamp_outcomes_total{code="",outcome="completed"} 5.0')
    slow = await _metrics_server(1.0, 'bubuh_stamp_outcomes_total{code="",outcome="completed"} 7.0')
    scrapes = Scrapes({f"p{i}": fast.sockets[0].getsockname()[1] for i in range(3)}
                      | {"slow": slow.sockets[0].getsockname()[1]})
    stop = asyncio.Event()
    try:
        running = asyncio.ensure_future(scrapes.run(time.perf_counter(), stop))
        await asyncio.sleep(2.1)
        stop.set()
        await asyncio.wait_for(running, 2)
    finally:
        for server in (fast, slow):
            server.close()
    rounds = sorted({t for t, process, _, _ in scrapes.samples if process == "p0"})
    assert len(rounds) >= 4, rounds                                # one every 0.4 s, not one per 1 s + 0.3 s x 3
    assert max(b - a for a, b in zip(rounds, rounds[1:], strict=False)) < 0.6, rounds
    assert {p for _, p, _, _ in scrapes.samples} == {"p0", "p1", "p2"}     # the slow one never in time ...
    assert scrapes.failed >= len(rounds)                                   # ... and counted as failed


def test_a_plotted_series_breaks_where_samples_are_missing():
    xs, ys = with_gaps([(0.0, 1.0), (5.0, 2.0), (30.0, 3.0), (35.0, 4.0)], 5.0)
    assert xs == [0.0, 5.0, 17.5, 30.0, 35.0]
    assert ys[:2] == [1.0, 2.0] and math.isnan(ys[2]) and ys[3:] == [3.0, 4.0]
    assert with_gaps([(0.0, 1.0), (5.0, 2.0)], 5.0) == ([0.0, 5.0], [1.0, 2.0])


def _sent(t: float, channel: int, *, eta: float | None = 10.0, took: float | None = 10.0, status: int | None = 202,
          accepted: float | None = None, outcome: str | None = "completed") -> Sent:
    s = Sent(t, "plateau", channel, status=status, latency_s=0.1 if status else 30.0, attempts=1,
             first_eta_s=eta, took_s=took, outcome=outcome)
    s.accepted_s = t if accepted is None else accepted
    s.ended_s = s.accepted_s + (took or 0)
    s.request_id = f"r-{t}-{channel}" if status == 202 else None
    return s


def test_the_eta_check_leaves_out_fault_windows_and_the_biggest_channel():
    sent = [_sent(10, 1, took=11), _sent(20, 2, took=30),                 # within 25%; three times over
            _sent(100, 1, took=50),                                       # in a fault window (100-110)
            _sent(30, 0, took=90)]                                        # the biggest channel
    e = eta_check(sent, windows=[(100.0, 110.0)], biggest=0)
    assert e["requests"] == 2 and e["within_25_percent"] == 0.5
    assert eta_check([], windows=[], biggest=0) == {"requests": 0}


def _result(sent: list[Sent], base: list[Sent], faults: list[dict], shape) -> dict:
    horizon = sum(p.seconds for p in shape)
    return {"shape": [{"name": p.name, "seconds": p.seconds, "from_per_s": 1.0, "to_per_s": 2.0} for p in shape],
            "faults": faults, "shares": SHARES, "rate_per_s": 10.0, "rate_source": "given", "arrivals_end_s": horizon,
            "machine": {"cores": 2, "loadavg_at_start": [1, 1, 1]},
            "platform": {"summary": summarise(sent, shape, [(f["began_s"], f["ended_s"]) for f in faults]),
                         "buckets": buckets(sent, horizon)},
            "baseline": {"summary": summarise(base, shape), "buckets": buckets(base, horizon)},
            "purchases": purchase_summary([{"channel": 0, "quantity": 10, "status": 202, "latency_s": 0.1,
                                            "attempts": 1}]),
            "reconcile": [{"channel": 0, "exit_code": 0}],
            "ledger": ledger_check({"ledgers": [{"credited": 10, "committed": 3, "pending": 0}],
                                    "purchases": [{"channel": 0, "quantity": 10, "status": 202}],
                                    "sent": [s for s in sent if s.channel == 0]}),
            "tier_rates": {"stamping (completed)": [(5.0, 2.0), (10.0, 3.0)]},
            "eta": eta_check(sent, [(f["began_s"], f["ended_s"]) for f in faults], biggest=0),
            "channels": channel_times(sent, SHARES), "plots": {}}


def test_the_verdict_and_the_report_say_what_held(tmp_path: Path):
    shape = phases(20, 40, 10)
    rng = random.Random(1)
    sent = [_sent(rng.uniform(0, 70), c % 4, took=rng.uniform(5, 15)) for c in range(3)]
    sent += [_sent(1.0, 1, status=None, outcome=None, eta=None, took=None)]   # unanswered, before any fault
    base = [Sent(s.t, s.phase, s.channel, status=200, latency_s=0.02) for s in sent]
    fault = {"kind": "worker_killed", "name": "stamping worker SIGKILLed", "began_s": 30.0, "ended_s": 35.0,
             "seen": True, "evidence": "pid 1 gone, pid 2 serving"}
    r = _result(sent, base, [fault], shape)
    v = verdict(r)
    assert v["every fault was seen"]
    assert v["every channel's orders reconcile (bubuh reconcile)"]
    assert not v["outside fault windows (+30 s), every request answered within 30 s"]   # the one at 1.0 s
    assert v["every accepted request ended, completed"]
    inside = _result([*sent[:-1], _sent(40.0, 1, status=None, outcome=None, eta=None, took=None)], base, [fault], shape)
    assert verdict(inside)["outside fault windows (+30 s), every request answered within 30 s"]
    unseen = _result(sent, base, [{**fault, "seen": False}], shape)
    assert not verdict(unseen)["every fault was seen"]
    assert not verdict(_result(sent, base, [], shape))["every fault was seen"]     # no fault is not a pass
    text = markdown({**r, "verdict": v})
    assert "stamping worker SIGKILLed" in text and "| ramp |" in text and "**NO**" in text

    r["plots"] = plot(r, {"sent": sent, "scrapes": Scrapes({})}, tmp_path, "surge")
    assert sorted(Path(p).name for p in r["plots"].values()) == sorted(f"surge-{n}.png" for n in PLOTS)
    for p in r["plots"].values():
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rounds_report_their_medians_the_median_round_in_full_and_a_check_held_only_if_it_held_in_each():
    """Issue 12: the figures hold as medians of 3 runs. Three days: the one in the middle by requests left
    unanswered is shown in full, every round's headline and their medians above it."""
    shape = phases(20, 40, 10)
    fault = {"kind": "worker_killed", "name": "stamping worker SIGKILLed", "began_s": 30.0, "ended_s": 35.0,
             "seen": True, "evidence": "pid 1 gone, pid 2 serving"}
    days = []
    for unanswered, rate in ((5, 30.0), (0, 34.0), (2, 32.0)):
        sent = [_sent(25.0 + i, i % 4, took=6.0) for i in range(8)]
        late = [_sent(1.0 + i, 1, status=None, outcome=None, eta=None, took=None) for i in range(unanswered)]
        for x in late:
            x.error = "no answer in 30 s"
        sent += late
        base = [Sent(x.t, x.phase, x.channel, status=200, latency_s=0.02) for x in sent]
        r = {**_result(sent, base, [fault], shape), "rate_per_s": rate}
        r["verdict"] = verdict(r)
        days.append(r)
    r = combine(days)
    assert r["median_round"] == 3 and r["rate_per_s"] == 32.0          # 2 unanswered: between 0 and 5
    assert [h["unanswered"] for h in r["rounds"]] == [5, 0, 2]
    assert r["medians"]["unanswered"] == 2 and r["medians"]["stamps_per_s"] == 32.0
    check = "outside fault windows (+30 s), every request answered within 30 s"
    assert days[1]["verdict"][check] and not r["verdict"][check]       # held in one round of three: not held
    assert r["verdict"]["every fault was seen"]
    text = markdown(r)
    assert "| **median** | 32.0 |" in text and "round 3 in full" in text and "| ramp |" in text


def test_open_requests_count_what_was_accepted_and_not_yet_seen_ended():
    sent = [_sent(1.0, 0, took=3.0), _sent(2.0, 1, took=1.0), _sent(5.0, 2, status=None, outcome=None, took=None)]
    times, counts = open_requests(sent)
    at = dict(zip(times, counts, strict=True))
    assert (at[0.0], at[1.0], at[2.0], at[3.0], at[4.0]) == (0, 1, 2, 1, 0)


async def test_a_client_that_gave_up_under_contention_can_still_send(monkeypatch):
    """The load generator's ``_send`` keeps the client's budget, and a request that gave up gives its
    connection back: with httpx a request cancelled while it waited for a pool connection could keep that
    slot for good (httpcore#1093), and the fourth run's resends then waited for slots that never came
    back. The generator's client is now ``load_client.LoadClient`` (aiohttp). Here twenty arrivals share
    two connections to a server slower than their budget; every one gives up within its budget, and the
    same client then gets answers again."""
    import asyncio
    import time

    from loadtests import deadline_day
    from loadtests.deadline_day import Sent, _send
    from loadtests.load_client import LoadClient

    monkeypatch.setattr(deadline_day, "TIMEOUT_S", 0.6)
    slow = True

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                if slow:
                    await asyncio.sleep(2.0)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gate = asyncio.Semaphore(20)
    async with server, LoadClient(f"http://127.0.0.1:{port}", max_connections=2) as client:
        def get(timeout_s: float, more: dict[str, str]):
            return client.get("/", headers=more, timeout_s=timeout_s)

        t0 = time.perf_counter()
        crowd = [Sent(0.0, "spike", 0) for _ in range(20)]
        answers = await asyncio.gather(*(_send(gate, t0, s, get) for s in crowd))
        assert answers == [None] * 20
        assert all(s.status is None and s.latency_s < 0.6 + 0.3 for s in crowd), [s.latency_s for s in crowd]
        slow = False
        t1 = time.perf_counter()
        later = [Sent(0.0, "drain", 0) for _ in range(6)]
        answers = await asyncio.gather(*(_send(gate, t1, s, get) for s in later))
        assert [r.status_code if r is not None else s.error for r, s in zip(answers, later, strict=True)] == [200] * 6


def test_each_round_states_its_closed_loop_as_a_share_of_the_engine_measured_beside_it():
    """Issue 12, point 1: the platform's stamps/s against the engine's at the same PAdES level, in the same run."""
    shape = phases(20, 40, 10)
    sent = [_sent(25.0 + i, i % 4, took=6.0) for i in range(8)]
    base = [Sent(x.t, x.phase, x.channel, status=200, latency_s=0.02) for x in sent]
    days = []
    for rate, engine in ((30.0, 600.0), (40.0, 400.0), (33.0, 110.0)):
        r = {**_result(sent, base, [], shape), "rate_per_s": rate, "of_engine": round(rate / engine, 3),
             "engine": {"level": "b-lt", "processes": 2, "stamps_per_s": engine, "cores_used": 1.9}}
        r["verdict"] = verdict(r)
        days.append(r)
    one = markdown(days[0])
    assert "B-LT" in one and "**600.0 stamps/s** with 2 processes" in one and "**5%** of it" in one
    assert ">= 30%: **no**" in one
    assert ">= 30%: yes" in markdown(days[2])                       # 33 of 110
    r = combine(days)
    assert [h["of_engine"] for h in r["rounds"]] == [0.05, 0.1, 0.3]
    assert r["medians"]["engine_stamps_per_s"] == 400.0 and r["medians"]["of_engine"] == 0.1
    assert "| **median** | 33.0 | 400.0, 10% |" in markdown(r)


def test_the_engine_alone_is_measured_at_the_platforms_level_with_its_key(tmp_path: Path, monkeypatch):
    """The engine's rate comes from real stamping with the platform's signer settings (B-B here: no TSA)."""
    from loadtests.deadline_day import engine_rate
    from services.kernel.settings import Settings
    from services.stamping.signing import dev_ca

    ca = dev_ca.dev_ca(str(tmp_path), "rsa2048")
    monkeypatch.setenv("BUBUH_PADES_LEVEL", "b-b")
    monkeypatch.setenv("BUBUH_SIGNING_P12_PATH", str(ca.p12_path))
    monkeypatch.setenv("BUBUH_SIGNING_P12_PASSWORD", ca.password)
    r = engine_rate(Settings(), 0.5)
    assert r["level"] == "b-b" and r["processes"] == 2
    assert r["stamps"] > 10 and r["stamps_per_s"] > 0


def test_each_stamp_needs_one_more_unit_than_its_channel_sent_before_it():
    day = schedule(phases(30, 60, 10), 20.0, SHARES, seed=7)
    need = units_needed(day, len(SHARES))
    for c in range(len(SHARES)):
        assert [n for a, n in zip(day, need, strict=True) if a.channel == c] == list(
            range(1, sum(a.channel == c for a in day) + 1))


class _Ledger:
    """The quota route as the generator reads it: ``credited`` rises as the purchase service confirms."""

    def __init__(self, credited: list[int]) -> None:
        self.credited = credited
        self.reads = 0

    async def get(self, path: str, headers: dict):
        self.reads += 1
        c = headers["c"]
        return Answer(200, {}, json.dumps({"credited": self.credited[c]}).encode())


async def test_a_stamp_waits_until_its_unit_is_credited_and_reads_only_while_short():
    ledger = _Ledger([10, 0])
    credits = Credits(ledger, [{"c": 0}, {"c": 1}], give_up_s=30, every_s=0.01)
    credits.buying(1)
    assert await credits.wait(0, 10) < 0.05 and ledger.reads == 1     # paid: one read, no wait
    assert await credits.wait(0, 3) < 0.01 and ledger.reads == 1      # known to be paid: no read at all
    waiting = asyncio.ensure_future(credits.wait(1, 1))
    await asyncio.sleep(0.1)
    assert not waiting.done()                                          # bought, not credited yet: held
    ledger.credited[1] = 10
    # held at least the 0.1 s slept above, less the event loop's clock resolution (CI once measured 0.0986)
    assert 0.08 <= await asyncio.wait_for(waiting, 1) < 0.5


async def test_a_stamp_whose_units_never_come_goes_once_its_channel_gave_up_buying():
    ledger = _Ledger([0])
    credits = Credits(ledger, [{"c": 0}], give_up_s=0.2, every_s=0.01)
    credits.buying(0)
    waiting = asyncio.ensure_future(credits.wait(0, 1))
    await asyncio.sleep(0.1)
    assert not waiting.done()                         # its purchase still being sent: held
    credits.bought(0)                                 # the purchase ended (refused, or never answered)
    assert 0.25 <= await asyncio.wait_for(waiting, 2) < 1.0     # then at most give_up_s more
