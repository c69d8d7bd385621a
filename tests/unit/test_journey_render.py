"""How ``bubuh trace`` prints a journey: latencies from the previous step, where each event sits."""

from __future__ import annotations

import datetime as dt

from services.operator.journey.command import as_json, now_line, step_lines
from services.operator.journey.journey import Journey, Now, Step

T0 = dt.datetime(2026, 11, 30, 23, 0, 0, tzinfo=dt.UTC)


def journey() -> Journey:
    steps = [Step(T0, "stamping", "accepted (POST /v1/stamps)"),
             Step(T0 + dt.timedelta(milliseconds=25), "stamping", "published StampRequested", "stamp.requested", 2,
                  17, "stamping", rank=2),
             Step(T0 + dt.timedelta(seconds=12.5), "quota", "quota.ledger applied StampRequested",
                  "stamp.requested", 2, 17, rank=0)]
    return Journey("stamp", "rid-1", "ch", "acct", steps,
                   Now("waiting", since=steps[-1].at, summary="waiting at stamping: reserved, waiting for a worker"))


def test_each_step_shows_its_latency_from_the_previous_and_where_it_sits():
    lines = step_lines(journey().steps)
    assert lines[0].split() == ["23:00:00.000", "stamping", "accepted", "(POST", "/v1/stamps)"]
    assert "+25ms" in lines[1] and "stamp.requested[2]@17" in lines[1]
    assert "+12.5s" in lines[2] and "stamp.requested[2]@17" in lines[2]


def test_now_says_since_when_it_waits_and_json_carries_the_same():
    j = journey()
    assert now_line(j) == "now: waiting at stamping: reserved, waiting for a worker since 23:00:12"
    doc = as_json(j)
    assert [s["latency_ms"] for s in doc["steps"]] == [None, 25.0, 12475.0]
    assert doc["steps"][1] | {"at": None} == {"at": None, "service": "stamping", "step": "published StampRequested",
                                              "topic": "stamp.requested", "partition": 2, "offset": 17,
                                              "producer": "stamping", "detail": None, "latency_ms": 25.0}
    assert doc["now"]["state"] == "waiting" and not j.finished
