"""The held queue's measure of the estimate apart from the machine under it (loadtests/held_queue.py):
each first ETA against the time its wait would have taken at the pace the tier kept in the 15 s before
its 202."""

from __future__ import annotations

import datetime as dt

from loadtests import held_queue
from loadtests.held_queue import HELD_S, QUEUE_S, at_the_pace_before, sized
from loadtests.surge import eta_accuracy

T0 = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.UTC)


def _at(s: float) -> str:
    return (T0 + dt.timedelta(seconds=s)).isoformat()


def _tier(paces: list[tuple[float, float]]) -> list[float]:
    """Completion times of a tier that keeps each (pace per second, seconds) in turn."""
    out, t = [], 0.0
    for pace, seconds in paces:
        end = t + seconds
        while t < end - 1e-9:
            t += 1 / pace
            out.append(t)
    return out


def test_a_wait_the_machine_sped_up_is_held_to_the_pace_before_its_202_not_to_its_end():
    """10 stamps/s for 27 s, then 20/s: a request sent at 25 s with 100 ahead was rightly told 10 s; it
    took 6 s (20 at 10/s, then 80 at 20/s). Against its end it was 67% long; at the pace before, right."""
    ends = _tier([(10, 27), (20, 33)])
    results = [{"request_id": f"x{i}", "status": "completed", "accepted_at": _at(0), "finished_at": _at(t)}
               for i, t in enumerate(ends)]
    ahead = sum(1 for t in ends if 25 < t < 31)
    results.append({"request_id": "r", "status": "completed", "accepted_at": _at(25), "finished_at": _at(31)})
    first = {"r": {"eta": ahead / 10}}
    assert eta_accuracy({"r": ahead / 10}, results)["within_25_percent"] == 0.0
    f = at_the_pace_before(first, results)
    assert f["requests"] == 1 and f["within_25_percent"] == 1.0
    assert abs(f["actual_over_eta"]["median"] - 1.0) < 0.05
    # an estimate that read the pace wrong (all 100 ahead at 5/s: 20 s) is wrong at the pace before too
    assert at_the_pace_before({"r": {"eta": 20.0}}, results)["within_25_percent"] == 0.0


def test_requests_sent_before_the_run_had_15_seconds_of_pace_are_left_out():
    ends = _tier([(10, 40)])
    results = [{"request_id": f"x{i}", "status": "completed", "accepted_at": _at(0), "finished_at": _at(t)}
               for i, t in enumerate(ends)]
    results += [{"request_id": "early", "status": "completed", "accepted_at": _at(5), "finished_at": _at(10)},
                {"request_id": "late", "status": "completed", "accepted_at": _at(20), "finished_at": _at(25)},
                {"request_id": "lost", "status": "failed", "accepted_at": _at(20)}]
    f = at_the_pace_before({"early": {"eta": 5.0}, "late": {"eta": 5.0}, "lost": {"eta": 5.0}}, results)
    assert f["requests"] == 1 and f["within_25_percent"] == 1.0


def test_the_queue_is_sized_from_the_tiers_pace_so_the_check_applies_on_a_fast_tier_too():
    # two stamping workers signed 105-121 stamps/s on 5 December: a fixed 3 x 300 stood for 8 s of them
    depth, stamps = sized(120.0, 3)
    assert 3 * depth / 120.0 >= QUEUE_S >= 10.0            # the standing queue: the 10 s check applies
    assert 3 * (stamps - depth) / 120.0 >= HELD_S > 15.0   # the held phase outlasts the pace's 15 s window
    slow_depth, slow_stamps = sized(40.0, 3)
    assert slow_depth < depth and slow_stamps < stamps
    assert sized(1.0, 3) == (100, 250)                     # a crawling tier still gets a queue to measure
    assert sized(120.0, 3, depth=1000) == (1000, 3400)     # --depth alone: the held phase comes on top of it
    assert sized(120.0, 3, stamps=900) == (depth, 900)     # --stamps alone: as given


def test_the_held_requests_are_broken_down_by_when_their_202_came():
    """Where in a round the misses are: 10 s buckets from the round's first request, each with its share
    within 25% and its took/ETA median; requests without a completion are left out."""
    from loadtests.held_queue import by_time

    results = [{"request_id": "a", "status": "completed", "accepted_at": _at(0), "finished_at": _at(10)},
               {"request_id": "b", "status": "completed", "accepted_at": _at(3), "finished_at": _at(13)},
               {"request_id": "c", "status": "completed", "accepted_at": _at(12), "finished_at": _at(18)},
               {"request_id": "d", "status": "completed", "accepted_at": _at(25), "finished_at": _at(35)},
               {"request_id": "e", "status": "failed", "accepted_at": _at(26)}]
    out = by_time({"b": 10.0, "c": 10.0, "d": 10.0, "e": 10.0}, results)     # "a" was the fill
    assert out == [{"from_s": 0, "requests": 1, "within_25_percent": 1.0, "took_over_eta_median": 1.0},
                   {"from_s": 10, "requests": 1, "within_25_percent": 0.0, "took_over_eta_median": 0.6},
                   {"from_s": 20, "requests": 1, "within_25_percent": 1.0, "took_over_eta_median": 1.0}]
    assert by_time({}, []) == []
    # the fill's, by the second: where its misses are (its first second or two, 7 December)
    assert [b["from_s"] for b in by_time({"a": 10.0, "b": 10.0}, results, bucket_s=1.0)] == [0, 3]


def test_the_report_shows_each_rounds_fill_and_held_requests_by_when_their_202_came():
    from loadtests.held_queue import markdown

    def phase(n: int) -> dict:
        return {"requests": n, "median_first_eta_s": 12.0, "within_25_percent": 0.9,
                "actual_over_eta": {"p10": 0.8, "median": 1.0, "p90": 1.2}}

    rnd = {"accepted": 30, "seconds": 10.0, "channels": 3, "depth": 5, "stamps_per_channel": 10,
           "eta": {"fill": phase(15), "held": phase(15), "run": phase(30)},
           "held_by_time": [{"from_s": 0, "requests": 15, "within_25_percent": 0.9, "took_over_eta_median": 1.0}],
           "fill_by_time": [{"from_s": 0, "requests": 9, "within_25_percent": 0.33, "took_over_eta_median": 1.6},
                            {"from_s": 1, "requests": 6, "within_25_percent": 1.0, "took_over_eta_median": 1.02}]}
    text = markdown({"rounds": [rnd], "median_round": 0, "verdict": {}, "generated_at": "now"})
    assert ("- Round 1, held, by when the 202 came (s into the round: within 25%, took/ETA median): "
            "0-10 s: 90%, 1.0.") in text
    assert ("- Round 1, fill, by when the 202 came (s into the round: within 25%, took/ETA median): "
            "0-1 s: 33%, 1.6; 1-2 s: 100%, 1.02.") in text


async def test_each_round_records_the_doors_cost_the_etas_counted():
    """The report shows the door's cost as an API process fitted it (stamping/pace.py), read from its /metrics."""
    from loadtests.load_client import Answer

    class Scrape:
        """The client's answer to the scrape, as LoadClient gives it."""

        def __init__(self, status: int, body: str) -> None:
            self.answer = Answer(status_code=status, headers={}, content=body.encode())

        async def get(self, path: str):
            assert path == "/metrics"
            return self.answer

    body = ("# HELP bubuh_stamp_pace_door_cost_ratio ...\n# TYPE bubuh_stamp_pace_door_cost_ratio gauge\n"
            "bubuh_stamp_pace_door_cost_ratio 0.2841517\nbubuh_stamp_queue_depth_requests 0.0\n")
    assert await held_queue._door_cost(Scrape(200, body)) == 0.284
    assert await held_queue._door_cost(Scrape(200, "bubuh_other 1.0\n")) is None
    assert await held_queue._door_cost(Scrape(503, "")) is None
