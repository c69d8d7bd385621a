"""The document store on a real directory: what a key may name, and what ``put_all`` leaves on disk."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from services.stamping import store


@pytest.mark.parametrize("key", ["../outside.pdf", "ab/../../outside.pdf", "/etc/passwd", "ab//input.pdf",
                                 "ab/./input.pdf", "ab/..", "", "ab\\..\\x", "ab/in\x00put.pdf", "ab/"])
def test_a_key_that_could_leave_the_root_is_refused_before_any_file_is_touched(tmp_path: Path, key: str) -> None:
    root = tmp_path / "documents"
    docs = store.FilesystemStore(root)
    for call in (docs.put(key, b"x"), docs.get(key), docs.delete(key)):
        with pytest.raises(ValueError, match="leaves the store"):
            asyncio.run(call)
    assert list(tmp_path.iterdir()) == []


def test_put_all_leaves_every_file_whole_and_no_temporary_one(tmp_path: Path) -> None:
    docs = store.FilesystemStore(tmp_path)
    rid = "0123abcd-0000-4000-8000-000000000000"
    pdf, meta = os.urandom(300_000), b"request record"
    asyncio.run(docs.put_all([(store.input_key(rid), pdf), (store.meta_key(rid), meta)]))
    assert asyncio.run(docs.get(store.input_key(rid))) == pdf
    assert asyncio.run(docs.get(store.meta_key(rid))) == meta
    assert sorted(p.name for p in (tmp_path / rid[:2] / rid).iterdir()) == ["input.pdf", "request.pb"]


def test_a_write_the_disk_refuses_is_storage_unavailable_naming_the_keys(tmp_path: Path) -> None:
    (tmp_path / "ab").write_bytes(b"a file where a directory must go")
    docs = store.FilesystemStore(tmp_path)
    with pytest.raises(store.errors.BubuhError) as caught:
        asyncio.run(docs.put_all([("ab/r/input.pdf", b"x"), ("ab/r/request.pb", b"y")]))
    assert caught.value.code.code == "STORAGE_UNAVAILABLE"
    assert "ab/r/input.pdf, ab/r/request.pb" in caught.value.detail


def test_a_missing_document_reads_as_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        asyncio.run(store.FilesystemStore(tmp_path).get("ab/nothing/input.pdf"))
