"""Where documents live between intake and worker, and where stamped outputs are kept.

An upload (``input_key``) is deleted once its stamp is completed (``tracker.py``): only the worker
reads it, and a completed request is never signed again. The stamped file and the request's record
stay (a status read, a download, ``bubuh renew-timestamps``), and so does the upload of a request that
did not complete (``bubuh replay`` of a dead-lettered record signs it again).

"Accepted means durable": intake answers 202 only after ``put`` returned, and ``put`` returns only
after the bytes are on disk (fsync of the file and of its directory). The interface is small so an
S3-compatible store can implement it (``put`` = PutObject, ``get`` = GetObject).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Protocol

from services.kernel import errors


class DocumentStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...
    async def put_all(self, items: list[tuple[str, bytes]]) -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def delete(self, key: str) -> None: ...
    async def delete_all(self, keys: list[str]) -> int: ...


class FilesystemStore:
    """A directory tree; keys are relative paths like ``<request id>/input.pdf``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        """The file of ``key``, a relative path of plain names. Decided from the key's text alone: a key
        can come from an event (``document_ref``), so ``..``, an absolute path, an empty or ``.`` part,
        a backslash or a NUL is refused; the store writes no links, so no name leads out of the root.
        (Resolving it on disk instead cost about 8% of the API process's CPU in a surge: py-spy.)"""
        parts = key.split("/")            # an empty or absolute key has an empty part
        if "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"key {key!r} leaves the store")
        return self.root.joinpath(*parts)

    async def put(self, key: str, data: bytes) -> None:
        await self.put_all([(key, data)])

    async def put_all(self, items: list[tuple[str, bytes]]) -> None:
        """Every item on disk when this returns, in one trip to a thread: each file synced, then each
        directory once (intake stores a request's document and its record side by side)."""
        paths = [(self._path(key), data) for key, data in items]
        try:
            await asyncio.to_thread(self._put_all, paths)
        except OSError as exc:
            keys = ", ".join(key for key, _ in items)
            raise errors.BubuhError(errors.STORAGE_UNAVAILABLE, f"cannot write {keys}: {exc}") from exc

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise errors.BubuhError(errors.STORAGE_UNAVAILABLE, f"cannot read {key}: {exc}") from exc

    async def delete(self, key: str) -> None:
        """Gone, or never there."""
        await self.delete_all([key])

    async def delete_all(self, keys: list[str]) -> int:
        """Each gone, or never there, in one trip to a thread: how many were there."""
        paths = [self._path(key) for key in keys]
        try:
            return await asyncio.to_thread(self._delete_all, paths)
        except OSError as exc:
            raise errors.BubuhError(errors.STORAGE_UNAVAILABLE, f"cannot delete {', '.join(keys)}: {exc}") from exc

    @staticmethod
    def _delete_all(paths: list[Path]) -> int:
        there = 0
        for path in paths:
            try:
                path.unlink()
                there += 1
            except FileNotFoundError:
                pass
        return there

    @staticmethod
    def _put_all(items: list[tuple[Path, bytes]]) -> None:
        """Each file written whole and synced, then each directory that gained an entry: the files'
        own, and the parent of every directory made here (a new ``<request id>/`` is only durable once
        its entry in ``ab/`` is, and a new ``ab/`` once its entry in the root is)."""
        changed: dict[Path, None] = {}
        for path, data in items:
            made = path.parent
            while not made.exists():
                changed[made.parent] = None
                made = made.parent
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)            # readers see the whole file or none
            changed[path.parent] = None
        for directory in changed:
            dir_fd = os.open(directory, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def input_key(request_id: str) -> str:
    return f"{request_id[:2]}/{request_id}/input.pdf"


def meta_key(request_id: str) -> str:
    return f"{request_id[:2]}/{request_id}/request.pb"


def accepted_key(request_id: str) -> str:
    """Marks a request accepted while its row could not be written (the database away at intake)."""
    return f"{request_id[:2]}/{request_id}/accepted"


def output_key(request_id: str) -> str:
    return f"{request_id[:2]}/{request_id}/stamped.pdf"
