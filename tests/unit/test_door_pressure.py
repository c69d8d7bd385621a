"""The front door first only while it is busy (kernel/door_pressure.py): an API process marks the door busy past
half a route's admission bound, and a stamping worker's session runs at a lower priority while the mark is
fresh, and at its own again after."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
from fastapi import APIRouter

from services.kernel import door_pressure, http
from services.kernel.door_pressure import HOLD_S, DoorMark, DoorWatch, YieldToDoor, autogroup_nice


def test_the_door_is_marked_busy_only_past_half_its_bound_and_not_on_every_request(tmp_path, monkeypatch):
    mark = tmp_path / "door-busy"
    door = DoorMark(mark)
    for in_flight in range(1, 33):              # a flood sent 32 at a time, on a bound of 64: never busy
        door.busy(in_flight, 64)
    assert not mark.exists()
    door.busy(33, 64)
    assert mark.exists()
    first = mark.stat().st_mtime_ns
    os.utime(mark, ns=(first - 10**9, first - 10**9))
    door.busy(40, 64)                           # within MARK_EVERY_S of the last mark: not written again
    assert mark.stat().st_mtime_ns == first - 10**9
    monkeypatch.setattr(door_pressure, "MARK_EVERY_S", 0.0)
    door.busy(40, 64)
    assert mark.stat().st_mtime_ns > first - 10**9


def test_a_mark_is_busy_for_a_second_then_not(tmp_path):
    mark = tmp_path / "door-busy"
    watch = YieldToDoor(mark, 10)
    assert not watch.door_busy()                # no mark at all: not busy
    mark.touch()
    now = mark.stat().st_mtime
    assert watch.door_busy(now + HOLD_S / 2)
    assert not watch.door_busy(now + HOLD_S + 0.01)


def test_a_reader_of_the_pace_sees_each_stretch_the_tier_yielded_in_once(tmp_path):
    mark = tmp_path / "door-busy"
    watch = DoorWatch(mark)
    t0 = time.time()
    assert watch.yielded_since_last_look(t0 + 1) is None              # never marked
    mark.touch()
    marked = mark.stat().st_mtime
    os.utime(mark, (marked + 5, marked + 5))                            # a mark 5 s on: the tier yields till +6
    assert watch.yielded_since_last_look(marked + 5.5) == (marked + 4, marked + 5.5)
    assert watch.yielded_since_last_look(marked + 6.5) == (marked + 5.5, marked + 6)
    assert watch.yielded_since_last_look(marked + 7.5) is None        # the mark is older than HOLD_S: quiet


async def _post(app) -> int:
    """One POST /upload through the app at the ASGI level; its status."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    await app({"type": "http", "method": "POST", "path": "/upload", "raw_path": b"/upload", "headers": [],
               "query_string": b"", "client": ("127.0.0.1", 1), "server": ("t", 80), "scheme": "http",
               "root_path": "", "http_version": "1.1"}, receive, send)
    return sent[0]["status"]


async def test_requests_in_progress_past_half_the_bound_mark_the_door(tmp_path):
    mark = tmp_path / "door-busy"
    r = APIRouter()
    release = asyncio.Event()

    @r.post("/upload", openapi_extra=http.body_limit(1000, max_in_flight=4))
    async def upload():
        await release.wait()
        return {}

    app = http.create_app("t", [r], door_busy_file=str(mark))
    held = [asyncio.create_task(_post(app)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert not mark.exists()                    # 2 of 4 in progress: not past half
    held.append(asyncio.create_task(_post(app)))
    await asyncio.sleep(0.05)
    assert mark.exists()                        # 3 of 4
    release.set()
    assert await asyncio.gather(*held) == [200, 200, 200]


async def test_a_request_turned_away_at_the_bound_marks_the_door(tmp_path):
    """While callers hold queue tickets, newcomers get in only below half the bound: the spike waits in
    the line of tickets, not in progress, and only the turning away says the door is busy."""
    mark = tmp_path / "door-busy"
    r = APIRouter()
    release = asyncio.Event()

    @r.post("/upload", openapi_extra=http.body_limit(1000, max_in_flight=1))
    async def upload():
        await release.wait()
        return {}

    app = http.create_app("t", [r], door_busy_file=str(mark))
    first = asyncio.create_task(_post(app))
    await asyncio.sleep(0.05)
    mark.unlink(missing_ok=True)                # 1 of 1 in progress marked it: forget that mark
    door_pressure_marked_long_ago(app)
    assert await _post(app) == 503              # turned away at the bound
    assert mark.exists()
    release.set()
    assert await first == 200


def door_pressure_marked_long_ago(app) -> None:
    """The app's door mark, as if its last mark were long ago (marks are at most every MARK_EVERY_S)."""
    layer = app.middleware_stack
    while not isinstance(layer, http.BodyLimits):
        layer = layer.app
    layer._door._marked = float("-inf")


_CHILD = """
import asyncio, sys
from services.kernel.door_pressure import YieldToDoor
async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)
    await YieldToDoor(sys.argv[1], 10).run(stop)
asyncio.run(main())
"""


def _autogroup_becomes(pid: int, nice: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if autogroup_nice(pid) == nice:
            return True
        time.sleep(0.05)
    return autogroup_nice(pid) == nice


@pytest.mark.skipif(autogroup_nice(os.getpid()) is None, reason="no autogroups on this kernel")
def test_a_worker_session_yields_while_the_door_is_busy_and_takes_its_share_back_after(tmp_path):
    """In a session of its own (as `bubuh up` starts a worker): its autogroup, which weighs the session
    against the API's, goes to nice 10 while the mark is fresh and back to 0 within a second or two of the
    last mark; stopped while yielding, it puts the value back."""
    mark = tmp_path / "door-busy"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(mark)], stdin=subprocess.PIPE,
                             start_new_session=True, cwd=os.getcwd())
    try:
        time.sleep(0.5)
        assert autogroup_nice(child.pid) == 0
        until = time.monotonic() + 1.0
        while time.monotonic() < until:         # a door busy for a second: marked as an API process marks it
            mark.touch()
            time.sleep(0.2)
        assert autogroup_nice(child.pid) == 10
        assert _autogroup_becomes(child.pid, 0, HOLD_S + 1.5)
        mark.touch()
        assert _autogroup_becomes(child.pid, 10, 1.0)
        child.stdin.close()                     # stop while yielding
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0
