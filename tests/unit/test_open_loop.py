"""The open-loop front-door benchmark's schedule and checks (loadtests/open_loop.py)."""

from __future__ import annotations

import datetime as dt

from loadtests.open_loop import _last_completion, arrivals, figures, markdown, verdict, verdict_of


def test_arrivals_follow_each_phases_rate_and_stay_inside_it():
    plan = arrivals([("plateau", 40.0, 100.0), ("spike", 120.0, 20.0)], seed=7)
    plateau = [t for t, phase in plan if phase == "plateau"]
    spike = [t for t, phase in plan if phase == "spike"]
    assert all(0 < t < 100 for t in plateau) and all(100 <= t < 120 for t in spike)
    assert 3_600 <= len(plateau) <= 4_400          # 4,000 expected; a Poisson count within 10%
    assert 2_150 <= len(spike) <= 2_650            # 2,400 expected
    assert [t for t, _ in plan] == sorted(t for t, _ in plan)
    assert plan == arrivals([("plateau", 40.0, 100.0), ("spike", 120.0, 20.0)], seed=7)   # reproducible
    gaps = [b - a for a, b in zip(plateau, plateau[1:], strict=False)]
    assert max(gaps) > 3 * (100 / len(plateau))    # not evenly spaced: bursts and lulls, as arrivals come


def _run(plateau_post: float, plateau_get: float, spike_post: float, *, statuses=None, errors=0,
         max_position=40, completed=100, accepted=100) -> dict:
    def route(p99, st=None, err=0):
        st = st or {202: 10}     # as Route.summary counts them: each 5xx answer is kept among the errors too
        return {"p99_ms": p99, "statuses": st, "errors": err + sum(n for s, n in st.items() if s >= 500)}
    return {"latency": {"plateau": {"POST /v1/stamps": route(plateau_post), "GET /v1/stamps/{id}": route(plateau_get)},
                        "spike": {"POST /v1/stamps": route(spike_post, statuses, errors),
                                  "GET /v1/stamps/{id}": route(50)}},
            "spike_queue": {"max_position": max_position}, "outcomes": {"completed": completed},
            "accepted": accepted}


def _shown(r: dict, loadavg: list[float]) -> dict:
    """A round as ``play`` returns it, with what ``markdown`` reads beside the checked figures."""
    for phase in ("plateau", "spike", "drain"):
        for route in ("POST /v1/stamps", "GET /v1/stamps/{id}"):
            r["latency"].setdefault(phase, {}).setdefault(route, {"p99_ms": None, "statuses": {}, "errors": 0})
            r["latency"][phase][route].update(p50_ms=1.0, max_ms=2.0)
    r.update(phases=[{"name": "plateau", "arrivals_per_s": 36.0, "seconds": 600, "arrivals": 21600},
                     {"name": "spike", "arrivals_per_s": 135.0, "seconds": 60, "arrivals": 8100}],
             arrivals=29700, drained_after_s=120.0, completed_after_s=95.5, loadavg_at_start=loadavg,
             eta={"plateau": {}, "spike": {"requests": 10, "median_first_eta_s": 40.0, "within_25_percent": 0.3}})
    r["spike_queue"]["median_position"] = 20
    return r


def test_verdict_holds_each_target_on_its_own():
    assert all(verdict(_run(250, 90, 900)).values())
    assert not verdict(_run(301, 90, 900))["plateau: POST /v1/stamps p99 <= 300 ms"]
    assert not verdict(_run(250, 101, 900))["plateau: GET /v1/stamps/{id} p99 <= 100 ms"]
    assert not verdict(_run(250, 90, 1001))["spike: POST /v1/stamps p99 <= 1000 ms"]
    assert not verdict(_run(250, 90, 900, statuses={202: 9, 503: 1}))["spike: no 5xx, no transport error"]
    assert not verdict(_run(250, 90, 900, errors=1))["spike: no 5xx, no transport error"]
    assert not verdict(_run(250, 90, 900, max_position=0))["spike: the excess visible as queue"]
    assert not verdict(_run(250, 90, 900, completed=99))["drained: every accepted request completed"]


def test_three_rounds_are_checked_at_their_medians_and_the_drain_in_every_round():
    rounds = [_run(250, 90, 900), _run(400, 120, 1400, statuses={202: 9, 503: 174}), _run(280, 95, 950)]
    median, checks = verdict_of(rounds)
    assert median["plateau: POST /v1/stamps p99 ms"] == 280 and median["plateau: GET /v1/stamps/{id} p99 ms"] == 95
    assert median["spike: POST /v1/stamps p99 ms"] == 950 and median["spike: 5xx"] == 0
    assert figures(rounds[1])["spike: 5xx"] == 174 and figures(rounds[1])["spike: transport errors"] == 0
    assert figures(_run(250, 90, 900, statuses={202: 9, 503: 2}, errors=3))["spike: transport errors"] == 3
    assert all(checks.values())                     # one bad round of three does not decide it
    two_bad = [_run(250, 90, 900), _run(400, 120, 1400, statuses={503: 174}), _run(310, 101, 950, statuses={503: 3})]
    median, checks = verdict_of(two_bad)
    assert median["plateau: POST /v1/stamps p99 ms"] == 310 and median["spike: 5xx"] == 3
    assert verdict_of(two_bad[:2])[0]["plateau: POST /v1/stamps p99 ms"] == 325      # an even count: the middle two
    assert not checks["plateau: POST /v1/stamps p99 <= 300 ms"]
    assert not checks["plateau: GET /v1/stamps/{id} p99 <= 100 ms"]
    assert not checks["spike: no 5xx, no transport error"]
    assert checks["spike: POST /v1/stamps p99 <= 1000 ms"]
    # the queue and the drain are not medians: a round that lost a request fails the run
    assert not verdict_of([_run(250, 90, 900), _run(250, 90, 900, completed=99), _run(250, 90, 900)])[1][
        "drained: every accepted request completed"]
    assert not verdict_of([_run(250, 90, 900, max_position=0), _run(250, 90, 900), _run(250, 90, 900)])[1][
        "spike: the excess visible as queue"]


def test_the_report_shows_each_round_the_medians_and_the_median_plateau_round_phase_by_phase():
    rounds = [_shown(_run(250, 90, 900), [1.0]), _shown(_run(400, 120, 1400, statuses={202: 9, 503: 174}), [2.0]),
              _shown(_run(280, 95, 950), [3.0])]
    median, checks = verdict_of(rounds)
    text = markdown({"rounds": rounds, "median": median, "verdict": checks, "rate_sustainable_per_s": 45.0,
                     "rate_source": "given with --rate", "pause_s": 30.0, "machine": {"cores": 2}})
    assert "| 2 | 1.0 / 400 | 120 | 1.0 / 1400 | 174 of 8100 / 0 | 40.0, 30% | 95.5 / 120.0 |" in text
    assert "| **median** | 280 (p99) | 95 | 950 (p99) | 0 / 0 | | |" in text
    assert "Round 3 (the median plateau), phase by phase:" in text
    assert "- plateau: POST /v1/stamps p99 <= 300 ms (at the rounds' median): met" in text
    assert "- drained: every accepted request completed (in every round): met" in text
    assert "load average at each round's start: [1.0], [2.0], [3.0]." in text


def test_the_drain_is_timed_by_the_servers_last_completion_not_by_the_last_read():
    bodies = [{"status": "completed", "finished_at": "2026-12-07T01:00:10+00:00"},
              {"status": "completed", "finished_at": "2026-12-07T01:01:40.5+00:00"}, {"status": "failed"}]
    spike_end = dt.datetime(2026, 12, 7, 1, 0, 0, tzinfo=dt.UTC).timestamp()
    assert _last_completion(bodies, spike_end) == 100.5
    assert _last_completion([{"status": "failed"}], spike_end) is None
