"""``bubuh prune-uploads`` (stamping/uploads.py) on real PostgreSQL and a real directory: the uploads of
completed requests go, batch by batch with progress; everything else stays; a second run finds nothing."""

from __future__ import annotations

import pytest

from services.stamping import store, uploads
from tests.component import handler_support as hs

STATUSES = {"c1": "completed", "c2": "completed", "c3": "completed", "f1": "failed", "q1": "queued",
            "s1": "signed"}


@pytest.fixture
async def pool(settings):
    async with hs.service_pool(settings, "stamping", max_size=2) as pool:
        yield pool


async def test_only_completed_requests_uploads_are_deleted_and_a_second_run_finds_none(settings, pool, tmp_path):
    documents = store.FilesystemStore(tmp_path)
    for rid, status in STATUSES.items():
        await pool.execute("INSERT INTO requests (request_id, channel_id, account_id, status) "
                           "VALUES ($1, 'ch', 'acct', $2)", rid, status)
        await documents.put_all([(store.meta_key(rid), b"record"), (store.output_key(rid), b"stamped")]
                                + ([] if rid == "c2" else [(store.input_key(rid), b"upload")]))  # c2's already gone
    seen = []
    done = await uploads.prune(settings, documents, batch=2, progress=lambda *p: seen.append(p))
    assert done == uploads.Pruned(completed=3, deleted=2)
    assert seen == [(2, 3, 1), (3, 3, 2)]               # c1 and c2 (nothing to delete), then c3: batches of 2
    for rid in STATUSES:
        kept = {p.name for p in (tmp_path / store.meta_key(rid)).parent.iterdir()}
        assert kept == ({"request.pb", "stamped.pdf"} if STATUSES[rid] == "completed"
                        else {"request.pb", "stamped.pdf", "input.pdf"}), rid
    assert await uploads.prune(settings, documents) == uploads.Pruned(completed=3, deleted=0)
