"""The expected time a 202 and a status read carry: the position over the tier's pace (or the wait for
a reservation, when longer) plus the stamp's own signing, with the pace measured over the seconds the
tier was busy (issue 12, point 4)."""

from __future__ import annotations

from types import SimpleNamespace

from services.stamping.queue import COLD_SECONDS_PER_STAMP, QueueFacts
from services.stamping.throughput import Throughput


def test_eta_is_the_queue_ahead_at_the_tiers_pace_plus_the_stamps_own_signing():
    assert QueueFacts(per_second=40.0, reserve_s=1.0, finish_s=0.5).eta_seconds(120) == 3.5
    assert QueueFacts(per_second=40.0, reserve_s=1.0, finish_s=0.5).eta_seconds(0) == 1.5
    # nothing measured yet: the cold pace
    assert QueueFacts(per_second=0.0).eta_seconds(10) == round(10 * COLD_SECONDS_PER_STAMP, 1)


def _table(counts: dict[tuple[str, int, float], int]) -> SimpleNamespace:
    """A windowed table's data as faust keeps it: (name|partition, (start, end)) -> count."""
    return SimpleNamespace(table=SimpleNamespace(data={(f"{n}|{p}", (t, t + 1.0)): v
                                                       for (n, p, t), v in counts.items()}))


def test_the_pace_is_counted_over_busy_seconds_not_the_quiet_ones_before_a_surge():
    now = 1_000.5
    counts = {("stamping", 0, 940.0): 4, ("stamping", 1, 941.0): 4}            # a warm-up a minute ago
    counts.update({("stamping", p, 990.0 + s): 25 for p in (0, 1) for s in range(10)})   # then 10 s at 50/s
    me = SimpleNamespace(window_s=60.0)
    sums, spans = Throughput._window_sums(me, _table(counts), {0, 1}, now)
    assert sums["stamping"] == 8 + 500
    assert spans["stamping"] == 12.0          # 2 busy seconds of warm-up + 10 of surge, not 60 (or 59)
    assert 40 < sums["stamping"] / spans["stamping"] <= 50
    # partitions this process does not own are not counted; the current second is still filling
    counts[("stamping", 2, 995.0)] = 999
    counts[("stamping", 0, 1000.0)] = 999
    assert Throughput._window_sums(me, _table(counts), {0, 1}, now)[0]["stamping"] == 508


def test_before_a_backlog_the_rate_comes_from_the_schema_unless_the_stream_is_asked_for(monkeypatch):
    """faust's windows cost about 3 ms of CPU a stamp on the API processes and the broker (README,
    "faust-streaming"), for the one number the schema's count gives as well: it runs on request only."""
    from services.kernel.settings import Settings
    from services.stamping.service import rates_from

    monkeypatch.delenv("BUBUH_STAMP_RATES_FROM", raising=False)     # the default, not this shell's choice
    assert rates_from(Settings()) == "database"
    monkeypatch.setenv("BUBUH_STAMP_RATES_FROM", "stream")
    assert rates_from(Settings()) == "stream"
