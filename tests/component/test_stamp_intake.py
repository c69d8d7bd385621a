"""Stamp intake's own steps on real PostgreSQL: the queued row is written while the document is stored,
and a request the store refuses leaves no row behind.

The store is made to fail as a mount does that is not there: its root is a file, so every write ends in
``NotADirectoryError``. Kafka is not reached (nothing is published before the store and the row are done),
so the producer is the platform's own, never started.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from services.kernel import errors
from services.kernel.channels import ChannelInfo
from services.kernel.producer import Producer
from services.operator.walkthrough import sample_letter
from services.stamping import store
from services.stamping.http_intake import StampIntake, StampMeta
from services.stamping.queue import QueueView
from services.stamping.sandbox import ProcessLimits, Sandbox
from tests.component import handler_support as hs

CHANNEL = ChannelInfo("ch-intake", "Intake test", "active", "standard", "", 1)
META = StampMeta(account_id="acct-1", page=1, llx=400, lly=50, urx=500, ury=150)


@pytest.fixture(scope="module")
async def stamping():
    hs.postgres_up()
    s = hs.settings()
    async with hs.service_pool(s, "stamping", max_size=4) as pool:
        inspector = await Sandbox("intake", size=1, budget=ProcessLimits.of(10, 30, 512)).start()
        try:
            yield s, pool, inspector
        finally:
            await inspector.stop()


@contextlib.asynccontextmanager
async def _intake(stamping, root) -> AsyncIterator[StampIntake]:
    s, pool, inspector = stamping
    producer = Producer(s)
    try:
        yield StampIntake(s, producer, pool, store.FilesystemStore(root), QueueView(pool, 60.0), inspector)
    finally:
        await producer.stop()


async def test_a_request_the_store_refuses_is_storage_unavailable_and_leaves_no_queued_row(stamping, tmp_path):
    _, pool, _ = stamping
    root = tmp_path / "documents"
    root.write_bytes(b"not a directory")
    async with _intake(stamping, root) as intake:
        for key in (None, "retry-me"):
            with pytest.raises(errors.BubuhError) as refused:
                await intake.accept(CHANNEL, sample_letter(), META, key)
            assert refused.value.code is errors.STORAGE_UNAVAILABLE
    # the row's write ran beside the store's, and was undone before the refusal was raised
    assert await pool.fetchval("SELECT count(*) FROM requests WHERE channel_id = $1", CHANNEL.channel_id) == 0


async def test_a_202s_position_counts_what_another_api_process_accepted_since_the_queue_was_read(stamping, tmp_path):
    """Each API process reads the queue's order once a second and counts the 202s given since on top of it.
    Counting only its own, a process left out the other's: a held queue's fill (three channels at once, two
    API processes) was told 0.71-0.78 of its place in its first two seconds (make surge-eta, 7 December
    10:44). The statement that writes a request's row counts every process's accepted since the read."""
    import datetime as dt

    from services.contracts.bubuh.v1 import stamp_pb2
    from services.stamping.fair_queue import FairQueue

    s, pool, inspector = stamping
    await pool.execute("DELETE FROM requests")
    await pool.execute("DELETE FROM schedule")
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, accepted_at) "
                       "SELECT c || i, c, 'acct-1', 'queued', now() - interval '1 minute' "
                       "FROM generate_series(1, 10) AS i, unnest(ARRAY['a', 'b']) AS c")
    producer = Producer(s)                              # never started: nothing here publishes
    views = [QueueView(pool, 60.0, fair=FairQueue(), order_s=30.0) for _ in range(2)]   # one read serves
    here, there = (StampIntake(s, producer, pool, store.FilesystemStore(tmp_path / str(i)), view, inspector)
                   for i, view in enumerate(views))

    async def accepted(intake: StampIntake, view: QueueView, rid: str, channel: str) -> int:
        at = dt.datetime.now(dt.UTC)
        msg = stamp_pb2.StampRequested(request_id=rid, channel_id=channel, account_id="acct-1")
        recorded = await intake._record(msg, None, "fp", at)
        assert recorded.row
        return await view.position_for_new(channel, at, recorded.before)

    try:
        # a's 11th, its row written before this process read the queue: a's 10 and b's 10 (tags 0..9) ahead
        assert await accepted(here, views[0], "a11", "a") == 20
        for i in range(11, 16):                         # b's 11th to 15th, given by the other process
            await accepted(there, views[1], f"b{i}", "b")
        assert views[0].order_read_at is not None and not views[0]._new.get("b")   # none of them given here
        # a's 12th (tag 11): a's 11 and b's 12 with tags 0..11, the other process's five among them
        assert await accepted(here, views[0], "a12", "a") == 11 + 12
    finally:
        await producer.stop()
        await pool.execute("DELETE FROM requests")
