"""A channel's stamp requests as ``GET /v1/stamps/{id}`` and ``GET /v1/stamps/{id}/document`` answer them:
the status (with the queue position and expected wait while it waits), and the stamped PDF once completed.
A channel reads only its own requests; someone else's id is not found.
"""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from services.contracts.bubuh.v1 import stamp_pb2
from services.kernel import errors
from services.kernel.settings import Settings
from services.stamping import store
from services.stamping.queue import STATUS_ROW, QueueView

# dead-lettered waits for a replay with its unit reserved; signed waits for the ledger to post the unit
_SHOWN_AS = {"dead_lettered": "reserved", "signed": "stamping"}


class RequestStatus:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, documents: store.DocumentStore,
                 queue: QueueView) -> None:
        self._settings, self._pool, self._documents, self._queue = settings, pool, documents, queue

    async def status(self, channel_id: str, request_id: str) -> dict:
        row = await self._pool.fetchrow(STATUS_ROW, request_id, channel_id)
        if row is None:
            return await self._accepted_without_row(channel_id, request_id)
        status = _SHOWN_AS.get(row["status"], row["status"])
        out = {"request_id": request_id, "status": status, "account_id": row["account_id"],
               "accepted_at": row["accepted_at"].isoformat(), "document_sha256": row["document_sha256"]}
        if row["rewritten_sha256"]:   # the stamp went onto a rewrite of the document (document/repair.py)
            out["rewritten_sha256"] = row["rewritten_sha256"]
        if row["sn"] and row["status"] == "completed":
            out["sn"] = row["sn"]
            out["document_url"] = f"{self._settings.public_url}/v1/stamps/{request_id}/document"
        if row["code"]:
            out["code"], out["detail"] = row["code"], row["detail"]
        if row["finished_at"]:
            out["finished_at"] = row["finished_at"].isoformat()
        if status in ("queued", "reserved", "stamping"):
            position = await self._queue.position_of(request_id, channel_id, row["status"], row["accepted_at"],
                                                      waiting=row)
            facts = await self._queue.facts()
            out["position"] = position
            out["eta_seconds"] = (facts.eta_seconds(position, reserved=row["status"] != "queued")
                                  if facts and position is not None else None)
        return out

    async def _accepted_without_row(self, channel_id: str, request_id: str) -> dict:
        """A request accepted while the database was away has no row until the stamping tier writes it
        from the event; intake marked it beside the stored request, so it reads as queued meanwhile
        (position and ETA unknown), never as not found."""
        not_found = errors.BubuhError(errors.NOT_FOUND, f"no stamp request {request_id} for this channel")
        try:
            uuid.UUID(request_id)
            await self._documents.get(store.accepted_key(request_id))
            meta = stamp_pb2.StampRequested.FromString(await self._documents.get(store.meta_key(request_id)))
        except (ValueError, FileNotFoundError):
            raise not_found from None
        if meta.channel_id != channel_id:
            raise not_found
        return {"request_id": request_id, "status": "queued", "account_id": meta.account_id,
                "accepted_at": meta.accepted_at.ToDatetime(tzinfo=dt.UTC).isoformat(),
                "document_sha256": meta.document_sha256, "position": None, "eta_seconds": None}

    async def document(self, channel_id: str, request_id: str) -> tuple[bytes, str]:
        """The stamped PDF and its SN, once completed."""
        row = await self._pool.fetchrow("SELECT status, output_ref, sn FROM requests WHERE request_id = $1 AND "
                                        "channel_id = $2", request_id, channel_id)
        if row is None or row["status"] != "completed":
            raise errors.BubuhError(errors.NOT_FOUND, f"no stamped document for {request_id} (yet)")
        return await self._documents.get(row["output_ref"]), row["sn"]
