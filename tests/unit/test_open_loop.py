"""The open-loop front-door benchmark's schedule and checks (loadtests/open_loop.py)."""

from __future__ import annotations

from loadtests.open_loop import arrivals, verdict


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
        return {"p99_ms": p99, "statuses": st or {202: 10}, "errors": err}
    return {"latency": {"plateau": {"POST /v1/stamps": route(plateau_post), "GET /v1/stamps/{id}": route(plateau_get)},
                        "spike": {"POST /v1/stamps": route(spike_post, statuses, errors),
                                  "GET /v1/stamps/{id}": route(50)}},
            "spike_queue": {"max_position": max_position}, "outcomes": {"completed": completed},
            "accepted": accepted}


def test_verdict_holds_each_target_on_its_own():
    assert all(verdict(_run(250, 90, 900)).values())
    assert not verdict(_run(301, 90, 900))["plateau: POST /v1/stamps p99 <= 300 ms"]
    assert not verdict(_run(250, 101, 900))["plateau: GET /v1/stamps/{id} p99 <= 100 ms"]
    assert not verdict(_run(250, 90, 1001))["spike: POST /v1/stamps p99 <= 1000 ms"]
    assert not verdict(_run(250, 90, 900, statuses={202: 9, 503: 1}))["spike: no 5xx, no transport error"]
    assert not verdict(_run(250, 90, 900, errors=1))["spike: no 5xx, no transport error"]
    assert not verdict(_run(250, 90, 900, max_position=0))["spike: the excess visible as queue"]
    assert not verdict(_run(250, 90, 900, completed=99))["drained: every accepted request completed"]
