"""Invariant 6 under a (small) surge: intake answers every request while the stamping tier is far
behind; the backlog shows as queue positions; every accepted stamp ends and the ledger agrees."""

from __future__ import annotations

import pytest

from loadtests import surge
from tests.platform import PlatformProcess, env_for

pytestmark = pytest.mark.slow


async def test_front_door_stays_up_while_stamping_lags(settings):
    front = await PlatformProcess(settings, api="all", workers="purchase,quota,notification", name="front").start()
    worker = await PlatformProcess(settings, api="none", workers="stamping", name="worker").start()
    try:
        # 12 applicants a channel, each buying and stamping 4 from its own account
        result = await surge.run(f"http://127.0.0.1:{settings.http_port}", channels=3, stamps_per_channel=48,
                                 concurrency=6, env=env_for(settings), applicants=12)
    finally:
        await worker.stop()
        await front.stop()
    for route, summary in result["routes"].items():
        assert summary["errors"] == 0, (route, summary["first_errors"])
        assert all(int(s) < 500 for s in summary["statuses"]), (route, summary["statuses"])
    assert result["stamps_accepted"] == 3 * 48
    assert result["outcomes"] == {"completed": 3 * 48}
    assert result["queue"]["max_position"] >= 2          # the backlog was visible as a queue
    assert result["queue"]["max_eta_seconds"] is not None
    assert result["routes"]["POST /v1/purchases"]["statuses"].get(202) == 3 * 12      # a purchase each
    for quota in result["ledger"]:       # each channel's 12 accounts, summed
        assert (quota["accounts"], quota["credited"], quota["committed"], quota["pending"]) == (12, 48, 48, 0)
