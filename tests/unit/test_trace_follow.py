"""``bubuh trace --follow`` ends on where the request stands, even when its last record lands after the database
says so (the outbox relays the dead-letter record a moment after the row is marked)."""

import datetime as dt

from services.operator.journey.command import follow_journey
from services.operator.journey.journey import Journey, Now, Step

T0 = dt.datetime(2026, 12, 1, 21, 32, 38, tzinfo=dt.UTC)


class Replay:
    """Each gather reveals the next (steps, now) the platform would show."""

    def __init__(self, frames):
        self.frames = list(frames)

    async def gather(self, j: Journey) -> None:
        steps, now = self.frames.pop(0)
        j.steps = j.steps + steps
        j.now = now


def step(seconds: float, what: str) -> Step:
    return Step(T0 + dt.timedelta(seconds=seconds), "stamping", what)


async def test_the_last_line_is_the_end_even_when_the_ending_record_comes_after_the_row():
    j = Journey("stamp", "r1", "ch", "acct", steps=[step(0, "accepted (POST /v1/stamps)")],
                now=Now("waiting", since=T0, summary="waiting at stamping: reserved"))
    ended = Now("dead-lettered", "TSA_UNAVAILABLE", T0, "dead-lettered with TSA_UNAVAILABLE", settled=False)
    settled = Now("dead-lettered", "TSA_UNAVAILABLE", T0, "dead-lettered with TSA_UNAVAILABLE", settled=True)
    tracer = Replay([([step(7, "attempt 2 failed")], ended),
                     ([step(8, "dead-lettered QuotaReserved: TSA_UNAVAILABLE")], settled)])
    lines: list[str] = []
    await follow_journey(tracer, j, lines.append, interval=0)
    assert lines[0].startswith("now: waiting at stamping")
    assert lines[-1] == "now: dead-lettered with TSA_UNAVAILABLE", lines
    assert sum(line.startswith("now: dead-lettered") for line in lines) == 1, lines
    assert "dead-lettered QuotaReserved" in lines[-2]


async def test_a_change_of_waiting_is_said_as_it_happens_and_the_end_once():
    j = Journey("stamp", "r2", "ch", "acct", now=Now("waiting", since=T0, summary="waiting at quota"))
    tracer = Replay([([step(1, "published QuotaReserved")], Now("waiting", since=T0, summary="waiting at stamping")),
                     ([], Now("waiting", since=T0, summary="waiting at stamping")),
                     ([step(2, "published StampCompleted")], Now("completed", since=T0, summary="completed, SN X"))])
    lines: list[str] = []
    await follow_journey(tracer, j, lines.append, interval=0)
    nows = [line for line in lines if line.startswith("now: ")]
    assert [n.split(" since")[0] for n in nows] == ["now: waiting at quota", "now: waiting at stamping",
                                                    "now: completed, SN X"]
    assert lines[-1] == "now: completed, SN X"
