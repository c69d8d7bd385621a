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
