"""The tracker's release of a signed stamp (``StatusTracker`` on ``QuotaCommitted``) on real PostgreSQL: the
request completed and ``StampCompleted`` queued with the signed row's SN and output, once, and only from
'signed'."""

from __future__ import annotations

import pytest

from services.contracts.bubuh.v1 import quota_pb2, stamp_pb2
from services.stamping import store
from services.stamping.tracker import StatusTracker
from services.stamping.worker import terminal_event_id
from tests.component import handler_support as hs


@pytest.fixture
async def pool(settings):
    async with hs.service_pool(settings, "stamping", max_size=2) as pool:
        yield pool


@pytest.fixture
async def tracker(settings, pool, tmp_path):
    documents = store.FilesystemStore(tmp_path)
    await documents.put(store.meta_key("r1"), stamp_pb2.StampRequested(request_id="r1", email="a@example.test")
                        .SerializeToString())
    return StatusTracker(settings, pool, documents)


async def _at(pool, rid: str, status: str) -> None:
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, sn, output_ref, "
                       "output_sha256) VALUES ($1, 'ch', 'acct', $2, '1SN', $3, 'cafe')",
                       rid, status, store.output_key(rid))


def _committed(rid: str):
    return hs.event(quota_pb2.QuotaCommitted(request_id=rid, channel_id="ch", account_id="acct"),
                    producer="quota", topic="quota.events")


async def test_a_committed_unit_releases_its_signed_stamp_once(pool, tracker):
    await _at(pool, "r1", "signed")
    await tracker.handle(_committed("r1"))
    await tracker.handle(_committed("r1"))                     # redelivered: nothing more
    row = await pool.fetchrow("SELECT status, finished_at FROM requests WHERE request_id = 'r1'")
    assert row["status"] == "completed" and row["finished_at"] is not None
    [(event_id, done)] = await hs.outbox(pool)
    assert event_id == terminal_event_id("r1", "completed")
    assert isinstance(done, stamp_pb2.StampCompleted)
    assert (done.sn, done.output_ref, done.output_sha256, done.channel_id, done.email, done.rewritten_sha256) == (
        "1SN", store.output_key("r1"), "cafe", "ch", "a@example.test", "")


async def test_the_release_names_the_rewrite_the_stamp_went_onto(pool, tracker):
    """A document rewritten before stamping (document/repair.py): ``StampCompleted`` carries the rewrite's
    hash, as the status read does, so a channel's webhook can tell its file does not begin with the upload."""
    await _at(pool, "r1", "signed")
    await pool.execute("UPDATE requests SET rewritten_sha256 = 'beef' WHERE request_id = 'r1'")
    await tracker.handle(_committed("r1"))
    [(_, done)] = await hs.outbox(pool)
    assert (done.output_sha256, done.rewritten_sha256) == ("cafe", "beef")


@pytest.mark.parametrize("status", ["stamping", "failed", "completed"])
async def test_only_a_signed_stamp_is_released(pool, tracker, status):
    await _at(pool, "r1", status)
    await tracker.handle(_committed("r1"))
    assert await pool.fetchval("SELECT status FROM requests WHERE request_id = 'r1'") == status
    assert await hs.outbox(pool) == []
