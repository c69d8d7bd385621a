"""What the ledger decided, reflected in each request's status: refused, expired, and whether a signed
stamp may be released.

A light consumer of ``quota.events`` in its own group, apart from the workers, reading only the types
it acts on (``TYPES``). ``QuotaReserved`` is not one since 2 December: the worker's consumer shows a
request ``reserved`` in the transaction that puts it in the fair queue (``fair_queue.Enqueue``).

A signed stamp is released here and only here: ``QuotaCommitted`` (the unit is posted) makes the
request ``completed`` and publishes ``StampCompleted``. A poll's commits are released together: one
read and one transaction for the lot (issue 12: a read, a statement and a commit per stamp, one at a
time, made this hop the slowest of a small channel's request while a flood was being stamped). The
rarer outcomes are handled one by one, in order, before them. A refused commit (``QuotaRefused``: the
reservation was voided while the document was being signed) fails it with RESERVATION_EXPIRED,
voids its SN (the registry answers "not issued") and deletes the stamped file. A stamp is never free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg

from services.contracts.bubuh.v1 import quota_pb2, stamp_pb2
from services.kernel import errors, events, logs, outbox, topics
from services.kernel.events import Event
from services.kernel.processing.handler import Rejection
from services.kernel.settings import Settings
from services.stamping import NAME, store
from services.stamping.metrics import CHANNEL_COMPLETED, STAMP_OUTCOMES
from services.stamping.worker import finish_failed, terminal_event_id

log = logs.get(__name__)
CONSUMER = "stamping.tracker"
TYPES = frozenset(events.type_name(t) for t in (quota_pb2.QuotaRejected, quota_pb2.QuotaCommitted,
                                                quota_pb2.QuotaRefused, quota_pb2.QuotaReleased))


# Requests found by their ids, the status checked as ``IS NOT DISTINCT FROM``, not ``=``: the same test on a
# column that is never null, but one the planner cannot match to the partial indexes on status
# (``requests_open``, ``requests_on_quota``), so the rows come from the primary key, a few probes. With
# ``status = 'signed'`` it read the whole of ``requests_open`` and kept the ids asked for: that index's row
# count in ``pg_class`` is the one of the last vacuum or analyze, taken when the queue was empty, so the
# scan was costed as nothing. Under a surge it held every open request and the dead entries of those that
# had moved on: 22 ms for 4 ids beside 1,327 open requests (EXPLAIN ANALYZE, 1,735 buffers), 2.2 ms and
# 2.8 ms a call on average over a closed loop (pg_stat_statements), and a scan that grows with the backlog.
_SIGNED_ROWS = """
SELECT request_id, channel_id, account_id, sn, output_ref, output_sha256, rewritten_sha256 FROM requests
 WHERE request_id = ANY($1::text[]) AND status IS NOT DISTINCT FROM 'signed'
"""
_RELEASE = """
UPDATE requests SET status = 'completed', finished_at = now(), code = NULL, detail = NULL
 WHERE request_id = ANY($1::text[]) AND status IS NOT DISTINCT FROM 'signed'
RETURNING request_id
"""


class StatusTracker:
    """The tracker's consumer handler (batched: a poll's records at once; the pipeline redoes a failed
    batch record by record). Idempotent without an inbox: every change is guarded by the status."""

    batched = True
    types = TYPES

    def __init__(self, settings: Settings, pool: asyncpg.Pool, documents: store.DocumentStore) -> None:
        self._settings = settings
        self._pool = pool
        self._documents = documents

    async def process(self, batch: Sequence[Event]) -> list[Rejection]:
        committed = []
        for event in batch:
            if isinstance(event.payload, quota_pb2.QuotaCommitted):
                committed.append(event)
            else:
                await self._other(event)
        await self._release_stamps(committed)
        return []

    async def _other(self, event: Event) -> None:
        m = event.payload
        if isinstance(m, quota_pb2.QuotaRejected):
            await self._fail(event, m, m.code or errors.QUOTA_INSUFFICIENT.code, m.detail or "no available unit")
        elif isinstance(m, quota_pb2.QuotaRefused) and m.operation == "commit":
            await self._withhold_stamp(event, m)
        elif isinstance(m, quota_pb2.QuotaReleased) and m.code == errors.RESERVATION_EXPIRED.code:
            # only requests still waiting (queued, or dead-lettered) end here; one being signed ends in the worker
            await self._fail(event, m, m.code, "the reservation expired before the stamp was made",
                             only_waiting=True)

    async def _fail(self, event: Event, m, code: str, detail: str, only_waiting: bool = False) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO requests (request_id, channel_id, account_id, status) VALUES ($1, $2, $3, 'queued') "
                "ON CONFLICT (request_id) DO NOTHING", m.request_id, m.channel_id, m.account_id)
            status = await conn.fetchval("SELECT status FROM requests WHERE request_id = $1 FOR UPDATE", m.request_id)
            if only_waiting and status not in ("queued", "reserved", "dead_lettered"):
                return
            await finish_failed(conn, self._settings, request_id=m.request_id, channel_id=m.channel_id,
                                account_id=m.account_id, code=code, detail=detail, cause=event)

    async def _release_stamps(self, committed: list[Event]) -> None:
        """The units are posted: the signed stamps become the channels' (idempotent: only from 'signed').

        What each ``StampCompleted`` says is read first: a signed row's SN and output never change (from
        'signed' a request only ends). Then one transaction releases every stamp still signed and queues
        the events of those it released, and only those."""
        if not committed:
            return
        ids = list(dict.fromkeys(e.payload.request_id for e in committed))
        rows = await self._pool.fetch(_SIGNED_ROWS, ids)
        if not rows:
            return
        cause = {e.payload.request_id: e for e in committed}
        emails = await asyncio.gather(*(self._email(r["request_id"]) for r in rows))
        outgoing = {}
        for row, email in zip(rows, emails, strict=True):
            rid = row["request_id"]
            msg = stamp_pb2.StampCompleted(request_id=rid, channel_id=row["channel_id"],
                                           account_id=row["account_id"], sn=row["sn"], output_ref=row["output_ref"],
                                           output_sha256=row["output_sha256"],
                                           rewritten_sha256=row["rewritten_sha256"] or "", email=email)
            env = events.envelope(msg, producer=NAME, event_id=terminal_event_id(rid, "completed"),
                                  causation_id=cause[rid].event_id, trace_id=cause[rid].envelope.trace_id)
            outgoing[rid] = events.outgoing(self._settings.topic(topics.STAMP_EVENTS.name), rid, env)
        async with self._pool.acquire() as conn, conn.transaction():
            released = [r["request_id"] for r in await conn.fetch(_RELEASE, list(outgoing))]
            # in the order the ledger posted them: the relay publishes rows in id order
            released_set = set(released)
            await outbox.add(conn, [outgoing[rid] for rid in ids if rid in released_set])
        by_id = {r["request_id"]: r for r in rows}
        await self._drop_uploads(released)
        STAMP_OUTCOMES.labels("completed", "").inc(len(released))
        for rid in released:
            row = by_id[rid]
            CHANNEL_COMPLETED.labels(row["channel_id"]).inc()
            log.info("stamp completed", request_id=rid, sn=row["sn"], channel_id=row["channel_id"],
                     trace_id=cause[rid].envelope.trace_id)

    async def _drop_uploads(self, completed: list[str]) -> None:
        """The uploads of stamps just completed are deleted (store.py says why that is safe). After the
        commit, and only by the transaction that completed them: a redelivery releases nothing and
        deletes nothing. A store that fails here, or a crash between the commit and the delete, leaves the
        files behind (the failure logged): the stamps are done either way."""
        if not completed:
            return
        try:
            await self._documents.delete_all([store.input_key(rid) for rid in completed])
        except errors.BubuhError as exc:
            log.warning("uploads of completed stamps not deleted", count=len(completed), detail=exc.detail)

    async def _withhold_stamp(self, event: Event, m: quota_pb2.QuotaRefused) -> None:
        """The ledger refused to post the unit of a signed stamp: the stamp is withheld, its SN void.

        The file goes first: a crash after it leaves the request 'signed', and the redelivered
        refusal finishes the job; a crash before it changes nothing yet.
        """
        row = await self._pool.fetchrow("SELECT status, sn, output_ref FROM requests WHERE request_id = $1",
                                        m.request_id)
        if row is None or row["status"] != "signed":
            return
        if row["output_ref"]:
            await self._documents.delete(row["output_ref"])
        email = await self._email(m.request_id)
        detail = (f"the reservation was voided ({m.code}) while the document was being signed: the stamp "
                  f"{row['sn']} was withheld and its SN voided; submit the document again")
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval("SELECT status FROM requests WHERE request_id = $1 FOR UPDATE", m.request_id)
            if status != "signed":
                return
            # the SN stays on the failed row (the column is unique: never issued again); the registry
            # vouches only for completed requests' SNs, so verification answers "unknown" for it
            await finish_failed(conn, self._settings, request_id=m.request_id, channel_id=m.channel_id,
                                account_id=m.account_id, code=errors.RESERVATION_EXPIRED.code, detail=detail,
                                email=email, cause=event)
        log.warning("signed stamp withheld: its unit was not posted", request_id=m.request_id, sn=row["sn"],
                    code=m.code)

    async def _email(self, request_id: str) -> str:
        try:
            meta = stamp_pb2.StampRequested.FromString(await self._documents.get(store.meta_key(request_id)))
        except (FileNotFoundError, errors.BubuhError):
            return ""
        return meta.email
