"""``loadtests/eta_replay.py``: the forecast in the working tree, replayed over a held-queue run's requests
from the times the stamping schema keeps."""

from __future__ import annotations

import json

import pytest

from loadtests.eta_replay import Registry, Stamp, facts_at, markdown, replay

T0 = 1_800_000_000.0


def _steady(seconds: int, per_second: int) -> list[Stamp]:
    """A tier signing ``per_second`` stamps a second from a standing queue (each waited 2 s in it), the door
    taking as many: accepted 10 s before it finished, reserved at once, started 0.3 s before the end."""
    out = []
    for at in range(seconds):
        for i in range(per_second):
            end = T0 + at + (i + 0.5) / per_second
            out.append(Stamp(end - 10.0, end - 9.8, end - 0.3, end, "completed"))
    return out


def test_a_read_at_a_202_gives_the_pace_the_tier_kept_and_the_latest_hop_times():
    registry = Registry(_steady(60, 50))
    facts = facts_at(registry, T0 + 60.0)
    assert facts.per_second == pytest.approx(50.0, abs=0.5)
    assert facts.reserve_s == pytest.approx(0.2) and facts.finish_s == pytest.approx(0.3)
    assert facts.eta_seconds(500) == pytest.approx(10.0 + 0.3, abs=0.2)
    assert facts_at(Registry([]), T0) is None                   # nothing ended yet: no read to replay


def test_each_round_and_phase_holds_the_told_etas_and_the_replayed_ones_against_the_time_taken():
    registry = Registry(_steady(60, 50))
    requests = [
        # told 10.3 s, took 10.3 s; replayed 10.3 s
        {"round": 1, "phase": "held", "position": 500, "eta": 10.3, "status": "completed",
         "accepted_at": T0 + 60.0, "finished_at": T0 + 70.3},
        # told 5 s (half its wait), took 10.3 s; replayed 10.3 s
        {"round": 1, "phase": "held", "position": 500, "eta": 5.0, "status": "completed",
         "accepted_at": T0 + 60.2, "finished_at": T0 + 70.5},
        {"round": 1, "phase": "fill", "position": 250, "eta": 5.3, "status": "completed",
         "accepted_at": T0 + 60.0, "finished_at": T0 + 65.3},
        {"round": 1, "phase": "held", "position": 10, "eta": 1.0, "status": "failed",     # not completed: left out
         "accepted_at": T0 + 60.0, "finished_at": T0 + 61.0},
    ]
    rows = {(r["round"], r["phase"]): r for r in replay(registry, requests)}
    assert list(rows) == [(1, "fill"), (1, "held"), (1, "run")]
    held = rows[(1, "held")]
    assert held["told"] == {"requests": 2, "within_25_percent": 0.5,
                            "took_over_eta_median": pytest.approx(1.5, abs=0.1)}
    assert held["replayed"]["requests"] == 2 and held["replayed"]["within_25_percent"] == 1.0
    assert rows[(1, "run")]["told"]["requests"] == 3
    table = markdown(list(rows.values()))
    assert "| 1 | held | 2 | 50%, " in table and "| 1 | fill | 1 | 100%, 1.0 | 100%, " in table


def test_a_held_queue_run_writes_each_requests_first_eta_and_times_for_the_replay(tmp_path):
    from loadtests.held_queue import _requests, write_requests

    first = {"a": {"eta": 12.5, "position": 400, "phase": "held"}, "b": {"eta": 2.0, "position": 10, "phase": "fill"}}
    results = [{"request_id": "a", "status": "completed", "accepted_at": "2026-12-07T20:00:00+00:00",
                "finished_at": "2026-12-07T20:00:12+00:00"},
               {"request_id": "b", "status": "failed", "accepted_at": "2026-12-07T20:00:01+00:00"}]
    rows = _requests(first, results)
    path = tmp_path / "results" / "requests.jsonl"
    write_requests([{"round": 1, **q} for q in rows], path)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written[0] == {"round": 1, "request_id": "a", "phase": "held", "position": 400, "eta": 12.5,
                          "status": "completed", "accepted_at": 1796673600.0, "finished_at": 1796673612.0}
    assert written[1]["status"] == "failed" and written[1]["finished_at"] is None
