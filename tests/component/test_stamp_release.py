"""The tracker's release of a signed stamp (``StatusTracker`` on ``QuotaCommitted``) on real PostgreSQL: the
request completed and ``StampCompleted`` queued with the signed row's SN and output, once, and only from
'signed'; then its upload deleted."""

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
    await documents.put(store.input_key("r1"), b"%PDF- the upload")
    return StatusTracker(settings, pool, documents)


async def _at(pool, rid: str, status: str) -> None:
    await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status, sn, output_ref, "
                       "output_sha256) VALUES ($1, 'ch', 'acct', $2, $4, $3, 'cafe')",
                       rid, status, store.output_key(rid), "1SN" if rid == "r1" else f"1SN-{rid}")


def _committed(rid: str):
    return hs.event(quota_pb2.QuotaCommitted(request_id=rid, channel_id="ch", account_id="acct"),
                    producer="quota", topic="quota.events")


async def test_a_committed_unit_releases_its_signed_stamp_once(pool, tracker, tmp_path):
    await _at(pool, "r1", "signed")
    await tracker.process([_committed("r1")])
    await tracker.process([_committed("r1")])                     # redelivered: nothing more
    row = await pool.fetchrow("SELECT status, finished_at FROM requests WHERE request_id = 'r1'")
    assert row["status"] == "completed" and row["finished_at"] is not None
    [(event_id, done)] = await hs.outbox(pool)
    assert event_id == terminal_event_id("r1", "completed")
    assert isinstance(done, stamp_pb2.StampCompleted)
    assert (done.sn, done.output_ref, done.output_sha256, done.channel_id, done.email, done.rewritten_sha256) == (
        "1SN", store.output_key("r1"), "cafe", "ch", "a@example.test", "")
    # the upload is gone (only the worker reads it); the request's record stays
    assert not (tmp_path / store.input_key("r1")).exists()
    assert (tmp_path / store.meta_key("r1")).exists()


async def test_a_store_that_cannot_delete_the_upload_does_not_hold_the_release_back(pool, tracker, tmp_path):
    (tmp_path / store.input_key("r1")).unlink()
    (tmp_path / store.input_key("r1")).mkdir()                      # cannot be unlinked: STORAGE_UNAVAILABLE
    await _at(pool, "r1", "signed")
    await tracker.process([_committed("r1")])
    assert await pool.fetchval("SELECT status FROM requests WHERE request_id = 'r1'") == "completed"
    assert len(await hs.outbox(pool)) == 1


async def test_the_release_names_the_rewrite_the_stamp_went_onto(pool, tracker):
    """A document rewritten before stamping (document/repair.py): ``StampCompleted`` carries the rewrite's
    hash, as the status read does, so a channel's webhook can tell its file does not begin with the upload."""
    await _at(pool, "r1", "signed")
    await pool.execute("UPDATE requests SET rewritten_sha256 = 'beef' WHERE request_id = 'r1'")
    await tracker.process([_committed("r1")])
    [(_, done)] = await hs.outbox(pool)
    assert (done.output_sha256, done.rewritten_sha256) == ("cafe", "beef")


@pytest.mark.parametrize("status", ["stamping", "failed", "completed"])
async def test_only_a_signed_stamp_is_released(pool, tracker, status, tmp_path):
    await _at(pool, "r1", status)
    await tracker.process([_committed("r1")])
    assert await pool.fetchval("SELECT status FROM requests WHERE request_id = 'r1'") == status
    assert await hs.outbox(pool) == []
    assert (tmp_path / store.input_key("r1")).exists()          # a request not completed here keeps it


async def test_a_polls_commits_are_released_in_one_transaction_each_signed_stamp_once(pool, tracker):
    """The tracker takes a poll's records as one batch: the commits of signed stamps are released together
    (one ``now()``: one transaction), in the order the ledger posted them; a commit for a stamp that is
    not signed, or one delivered twice in the batch, releases nothing more."""
    for rid in ("r3", "r1", "r2"):
        await _at(pool, rid, "signed")
    await _at(pool, "r4", "stamping")
    batch = [_committed(r) for r in ("r3", "r4", "r1", "r3", "r2")]
    assert tracker.batched
    await tracker.process(batch)
    rows = await pool.fetch("SELECT request_id, status, finished_at FROM requests ORDER BY request_id")
    assert {r["request_id"]: r["status"] for r in rows} == {"r1": "completed", "r2": "completed", "r3": "completed",
                                                            "r4": "stamping"}
    assert len({r["finished_at"] for r in rows if r["status"] == "completed"}) == 1, "not one transaction"
    queued = await hs.outbox(pool)
    assert [e for e, _ in queued] == [terminal_event_id(r, "completed") for r in ("r3", "r1", "r2")]
    assert [m.email for _, m in queued] == ["", "a@example.test", ""]
    await tracker.process(batch)                                 # the poll read again: nothing more
    assert len(await hs.outbox(pool)) == 3


async def test_a_refusal_in_a_batch_is_handled_beside_the_commits(pool, tracker):
    await _at(pool, "r1", "signed")
    rejected = hs.event(quota_pb2.QuotaRejected(request_id="r9", channel_id="ch", account_id="acct",
                                                code="QUOTA_INSUFFICIENT", detail="no available unit"),
                        producer="quota", topic="quota.events")
    await tracker.process([rejected, _committed("r1")])
    status = dict(await pool.fetch("SELECT request_id, status FROM requests"))
    assert status == {"r1": "completed", "r9": "failed"}
    assert [type(m).__name__ for _, m in await hs.outbox(pool)] == ["StampFailed", "StampCompleted"]
