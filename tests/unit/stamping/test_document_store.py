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


def test_a_new_request_directory_is_synced_into_its_parents_before_put_all_returns(tmp_path: Path, monkeypatch) -> None:
    """A file synced in a directory that was just made is lost in a crash unless that directory's own
    entry is synced too: every directory put_all made is synced into its parent, up to the root."""
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", spy)
    docs = store.FilesystemStore(tmp_path)
    rid = "0123abcd-0000-4000-8000-000000000000"
    asyncio.run(docs.put_all([(store.input_key(rid), b"%PDF"), (store.meta_key(rid), b"record")]))
    request_dir, prefix_dir = tmp_path / rid[:2] / rid, tmp_path / rid[:2]
    assert {str(prefix_dir), str(tmp_path)} <= set(synced), synced      # the new ab/<id>/ and ab/ entries
    assert synced.count(str(request_dir)) == 1                          # the two files' directory, once

    synced.clear()
    other = "0123ffff-0000-4000-8000-000000000000"                      # ab/ exists now: only its new entry
    asyncio.run(docs.put(store.input_key(other), b"%PDF"))
    assert str(tmp_path) not in synced and str(prefix_dir) in synced, synced


def test_delete_all_removes_the_named_files_only_and_a_missing_one_is_no_error(tmp_path: Path) -> None:
    docs = store.FilesystemStore(tmp_path)
    a, b = "0123abcd-0000-4000-8000-00000000000a", "0123abcd-0000-4000-8000-00000000000b"
    asyncio.run(docs.put_all([(store.input_key(a), b"a"), (store.meta_key(a), b"ma"), (store.input_key(b), b"b")]))
    asyncio.run(docs.delete_all([store.input_key(a), store.input_key(b), store.input_key("ab-never-stored")]))
    assert sorted(p.name for p in (tmp_path / a[:2] / a).iterdir()) == ["request.pb"]
    assert list((tmp_path / b[:2] / b).iterdir()) == []


def test_a_delete_the_disk_refuses_is_storage_unavailable_naming_the_keys(tmp_path: Path) -> None:
    (tmp_path / "ab" / "r" / "input.pdf").mkdir(parents=True)     # a directory cannot be unlinked
    with pytest.raises(store.errors.BubuhError) as caught:
        asyncio.run(store.FilesystemStore(tmp_path).delete_all(["ab/r/input.pdf"]))
    assert caught.value.code.code == "STORAGE_UNAVAILABLE" and "ab/r/input.pdf" in caught.value.detail
