"""The stamping worker: a reserved unit in, a signed e-Meterai (or a refund) out.

Every accepted request ends in exactly one terminal state (invariant 2):
- completed: one SN, one stamped PDF stored, ``StampSigned`` -> the ledger posts the unit ->
  ``QuotaCommitted`` -> the tracker releases the stamp (``StampCompleted``, downloadable). A stamp is
  never delivered before its unit is posted; if the ledger refuses the commit (the reservation
  was voided while the document was being signed) the tracker fails the request with
  RESERVATION_EXPIRED, voids its SN and deletes the stamped file: never free;
- failed:    ``StampFailed`` (permanent) -> the ledger voids the unit.

Why the steps are in this order:
- The SN is issued and stored *before* signing, in a committed transaction. A worker killed
  mid-signing gets the request again and signs with the same SN: one SN, one charge.
- The same transaction counts deliveries. A document that takes its worker down again and again
  (``stamp_max_deliveries``) is poison: it fails with ``SIGNING_FAILED`` instead of looping.
- Terminal updates are guarded (``status NOT IN ('completed', 'failed')``) and publish through the
  outbox with ids derived from the request id, so redelivery changes nothing and publishes nothing new.
- Transient failures (storage, TSA, token busy) do not sleep here: the record is scheduled again on
  ``stamp.retry`` with exponential backoff (``kernel/retry.py``); after ``stamp_max_attempts`` it goes
  to ``stamp.dead-letter`` with its attempt history, keeping its unit reserved until ``bubuh replay``
  or the reservation's expiry. A stop of the worker itself mid-signing (its signing pool stopping) spends
  no attempt and goes nowhere: the fair queue's taker rolls its claim back, so the request stays queued
  at its place (``fair_queue.py``); five restarts in a row dead-letter nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
import uuid

import asyncpg

from services.contracts.bubuh.v1 import quota_pb2, stamp_pb2
from services.kernel import errors, events, logs, outbox, retry, topics
from services.kernel.events import Event, Outgoing
from services.kernel.processing.deadletter import dead_letter_headers
from services.kernel.processing.pipeline import HEADER_ATTEMPT, HEADER_REPLAY
from services.kernel.settings import Settings
from services.stamping import NAME, store
from services.stamping.metrics import SIGNING_CERT_REVOKED, STAGE_SECONDS, STAMP_OUTCOMES
from services.stamping.sandbox import Sandbox
from services.stamping.serial import SerialIssuer
from services.stamping.signing.engine import Stamped, StampingEngine
from services.stamping.signing.request import StampRequest

log = logs.get(__name__)
CONSUMER = "stamping.worker"
HEADER_DLQ_ATTEMPTS = "bubuh-dlq-attempts"
TERMINAL = ("completed", "failed")
DONE_HERE = (*TERMINAL, "signed")      # nothing left for a worker: signed waits for the ledger
_NS = uuid.UUID("5e0d8c1b-3f7a-4a51-8c8e-0f6b8f2d9a64")
# A delivery starts signing: counted ($3 replay: a fresh count), the SN kept or issued ($2), the row left
# alone if it is past signing or would pass $4 deliveries. waited_s: since reserved (null if just now).
_START = """
UPDATE requests SET status = 'stamping', sn = coalesce(sn, $2), code = NULL, started_at = now(),
       deliveries = CASE WHEN $3 THEN 1 ELSE deliveries + 1 END, reserved_at = coalesce(reserved_at, now())
 WHERE request_id = $1 AND status NOT IN ('signed', 'completed', 'failed')
   AND CASE WHEN $3 THEN 1 ELSE deliveries + 1 END <= $4
RETURNING sn, extract(epoch FROM now() - nullif(reserved_at, now()))::float8 AS waited_s
"""


def terminal_event_id(request_id: str, outcome: str) -> str:
    """Worker and tracker derive the same id for a request's one terminal event."""
    return str(uuid.uuid5(_NS, f"{request_id}\x1f{outcome}"))


async def finish_failed(conn: asyncpg.Connection, settings: Settings, *, request_id: str, channel_id: str,
                        account_id: str, code: str, detail: str, email: str = "", cause: Event | None = None) -> bool:
    """Mark a request failed and publish ``StampFailed`` once; False when it had already ended."""
    msg = stamp_pb2.StampFailed(request_id=request_id, channel_id=channel_id, account_id=account_id, code=code,
                                detail=detail[:2000], permanent=True, email=email)
    env = events.envelope(msg, producer=NAME, event_id=terminal_event_id(request_id, "failed"),
                          causation_id=cause.event_id if cause else "",
                          trace_id=cause.envelope.trace_id if cause else None)
    if not await outbox.add_if(
            conn, "UPDATE requests SET status = 'failed', code = $2, detail = $3, finished_at = now() "
                  "WHERE request_id = $1 AND status NOT IN ('completed', 'failed') RETURNING 1",
            [request_id, code, detail[:2000]],
            [events.outgoing(settings.topic(topics.STAMP_EVENTS.name), request_id, env)]):
        return False
    STAMP_OUTCOMES.labels("failed", code).inc()
    log.info("stamp failed", request_id=request_id, code=code, detail=detail[:300])
    return True


def sign(engine: StampingEngine, data: bytes, request: StampRequest) -> Stamped:
    """In the worker's signing child (``StampingEngine``, set up by services/stamping/service.py), within budget."""
    return engine.stamp_document(data, request)


class StampWorker:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, documents: store.DocumentStore,
                 signing: Sandbox, serials: SerialIssuer) -> None:
        self._settings = settings
        self._pool = pool
        self._store = documents
        self._signing = signing
        self._serials = serials
        self._backoff = retry.Backoff(base_s=settings.stamp_retry_base_s, max_s=settings.stamp_retry_max_s)
        self._retry_topic = settings.topic(topics.STAMP_RETRY.name)

    async def handle(self, event: Event) -> None:
        if isinstance(event.payload, quota_pb2.QuotaReserved):
            await self.stamp(event, event.payload)

    async def stamp(self, event: Event, reserved: quota_pb2.QuotaReserved) -> None:
        rid = reserved.request_id
        try:
            meta = stamp_pb2.StampRequested.FromString(await self._store.get(store.meta_key(rid)))
        except FileNotFoundError:
            async with self._pool.acquire() as conn, conn.transaction():
                await self._ensure_row(conn, rid, reserved.channel_id, reserved.account_id, "")
                await finish_failed(conn, self._settings, request_id=rid, channel_id=reserved.channel_id,
                                    account_id=reserved.account_id, code=errors.SIGNING_FAILED.code,
                                    detail="the stored request is missing", cause=event)
            return
        except errors.BubuhError as exc:
            await self._transient(event, meta=None, reserved=reserved, exc=exc)
            return

        started = await self.start_delivery(event, reserved, meta)
        if started is None:
            return
        sn = started
        try:
            data = await self._store.get(meta.document_ref)
            request = StampRequest(sn=sn, page=meta.placement.page,
                                   box=(meta.placement.llx, meta.placement.lly, meta.placement.urx, meta.placement.ury),
                                   reason=meta.reason or "Meterai elektronik", location=meta.location or "Indonesia")
            t0 = time.perf_counter()
            try:
                stamped = await self._signing.run(sign, data, request)
            except errors.BubuhError as exc:
                if exc.code is errors.PDF_TOO_COMPLEX:      # over the signing budget: this document, not us
                    raise errors.BubuhError(errors.SIGNING_FAILED, exc.detail) from exc
                raise
            STAGE_SECONDS.labels("signing").observe(time.perf_counter() - t0)
            SIGNING_CERT_REVOKED.set(0)
            await self._store.put(store.output_key(rid), stamped.pdf)
        except errors.BubuhError as exc:
            if exc.code is errors.SIGNING_CERT_REVOKED:
                # not this request's fault: every stamp waits (unit reserved) until a new key is installed
                SIGNING_CERT_REVOKED.set(1)
                log.error("signing certificate revoked: stamping stopped", request_id=rid, detail=exc.detail)
            if exc.code.retryable:
                await self._transient(event, meta=meta, reserved=reserved, exc=exc)
            else:
                async with self._pool.acquire() as conn, conn.transaction():
                    await finish_failed(conn, self._settings, request_id=rid, channel_id=meta.channel_id,
                                        account_id=meta.account_id, code=exc.code.code, detail=exc.detail,
                                        email=meta.email, cause=event)
            return
        await self._signed(event, meta, sn, stamped)

    async def start_delivery(self, event: Event, reserved: quota_pb2.QuotaReserved,
                     meta: stamp_pb2.StampRequested) -> str | None:
        """Record the delivery and issue the SN before any signing; None when there is nothing to sign.

        The usual delivery (the row is there, waiting, within its deadline and its deliveries) is one
        statement, its own transaction; anything else takes the full path, which says why not."""
        replay = HEADER_REPLAY in event.headers
        if reserved.deadline.ToDatetime(tzinfo=dt.UTC) > dt.datetime.now(dt.UTC):
            sn = await self._begin_signing(reserved.request_id, replay)
            if sn is not None:
                return sn
        return await self._start_or_end(event, reserved, meta, replay)

    async def _begin_signing(self, rid: str, replay: bool) -> str | None:
        """``_START``: the request's SN, or None when the row is not there to start."""
        while True:
            try:
                row = await self._pool.fetchrow(_START, rid, self._serials.next(), replay,
                                                self._settings.stamp_max_deliveries)
                break
            except asyncpg.UniqueViolationError:    # the new SN is another request's: draw again
                log.error("SN collision: two workers share a node id?", request_id=rid)
        if row is None:
            return None
        if row["waited_s"] is not None:
            STAGE_SECONDS.labels("reserved").observe(max(0.0, row["waited_s"]))
        return row["sn"]

    async def _start_or_end(self, event: Event, reserved: quota_pb2.QuotaReserved, meta: stamp_pb2.StampRequested,
                            replay: bool) -> str | None:
        """``start_delivery`` when its one statement did not apply: the row is missing (accepted while the database
        was away), the request is past signing, its reservation's deadline passed, or it stopped its worker
        too often. Each is decided on the locked row."""
        rid = reserved.request_id
        async with self._pool.acquire() as conn, conn.transaction():
            await self._ensure_row(conn, rid, meta.channel_id, meta.account_id, meta.document_sha256,
                                   meta.accepted_at.ToDatetime(tzinfo=dt.UTC))
            row = await conn.fetchrow("SELECT status, deliveries FROM requests WHERE request_id = $1 FOR UPDATE", rid)
            if row["status"] in DONE_HERE:
                return None
            deadline = reserved.deadline.ToDatetime(tzinfo=dt.UTC)
            if deadline <= dt.datetime.now(dt.UTC):
                # no SN is spent on a reservation the ledger is about to void (or has voided)
                await finish_failed(conn, self._settings, request_id=rid, channel_id=meta.channel_id,
                                    account_id=meta.account_id, code=errors.RESERVATION_EXPIRED.code,
                                    detail=f"reservation deadline {deadline.isoformat()} passed before stamping",
                                    email=meta.email, cause=event)
                return None
            deliveries = 1 if replay else row["deliveries"] + 1
            if deliveries > self._settings.stamp_max_deliveries:
                await finish_failed(conn, self._settings, request_id=rid, channel_id=meta.channel_id,
                                    account_id=meta.account_id, code=errors.SIGNING_FAILED.code,
                                    detail=f"the document stopped its worker {deliveries - 1} times",
                                    email=meta.email, cause=event)
                return None
        # the row is there now and may be started: the one statement does it (None only if it changed since)
        return await self._begin_signing(rid, replay)

    async def _signed(self, event: Event, meta: stamp_pb2.StampRequested, sn: str, stamped: Stamped) -> None:
        """Stored and signed: ask the ledger to post the unit; the tracker releases the stamp on its answer."""
        rid = meta.request_id
        digest = hashlib.sha256(stamped.pdf).hexdigest()
        if stamped.rewritten_sha256:
            log.info("stamped on a rewrite of the document", request_id=rid, document_sha256=meta.document_sha256,
                     rewritten_sha256=stamped.rewritten_sha256, reason=stamped.rewrite_reason)
        msg = stamp_pb2.StampSigned(request_id=rid, channel_id=meta.channel_id, account_id=meta.account_id,
                                    sn=sn, output_ref=store.output_key(rid), output_sha256=digest, email=meta.email)
        env = events.envelope(msg, producer=NAME, event_id=terminal_event_id(rid, "signed"),
                              causation_id=event.event_id, trace_id=event.envelope.trace_id)
        async with self._pool.acquire() as conn:
            if not await outbox.add_if(
                    conn,
                    "UPDATE requests SET status = 'signed', output_ref = $2, output_sha256 = $3, "
                    "rewritten_sha256 = $4, code = NULL, detail = NULL "
                    "WHERE request_id = $1 AND status NOT IN ('signed', 'completed', 'failed') RETURNING 1",
                    [rid, store.output_key(rid), digest, stamped.rewritten_sha256],
                    [events.outgoing(self._settings.topic(topics.STAMP_EVENTS.name), rid, env)]):
                return
        log.info("stamp signed; waiting for the ledger to post its unit", request_id=rid, sn=sn,
                 channel_id=meta.channel_id)

    async def _transient(self, event: Event, *, meta: stamp_pb2.StampRequested | None,
                         reserved: quota_pb2.QuotaReserved, exc: errors.BubuhError) -> None:
        rid = reserved.request_id
        attempt = int(event.headers.get(HEADER_ATTEMPT, b"1"))
        # this worker stopping (its signing pool stopped mid-task: `bubuh down`, a pod's SIGTERM) is no attempt
        # of the request's: taken again with the same attempt number, however often workers stop
        spent = not (exc.code is errors.UNAVAILABLE and self._signing.stopping)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._ensure_row(conn, rid, reserved.channel_id, reserved.account_id, "")
            if spent:
                await conn.execute("INSERT INTO attempts (request_id, attempt, code, detail) VALUES ($1, $2, $3, $4) "
                                   "ON CONFLICT DO NOTHING", rid, attempt, exc.code.code, exc.detail[:2000])
            # a transient failure is not a crash: it does not count toward the crash guard
            await conn.execute("UPDATE requests SET deliveries = greatest(deliveries - 1, 0), status = 'reserved', "
                               "code = $2, detail = $3 "
                               "WHERE request_id = $1 AND status NOT IN ('signed', 'completed', 'failed')",
                               rid, exc.code.code, exc.detail[:2000])
            outcome = await self._schedule_again(conn, event, rid, attempt, exc) if spent else "requeued"
        STAMP_OUTCOMES.labels(outcome, exc.code.code).inc()
        if not spent:
            # raised to the fair queue's taker, which rolls its claim back (an outage of the worker's own): the
            # request stays queued at its place for this worker's next start or another member, rather than
            # going round stamp.retry and joining its channel's line again at the back
            log.info("worker stopping mid-signing; the request keeps its place in the fair queue", request_id=rid,
                     code=exc.code.code)
            raise exc
        if outcome == "dead_lettered":
            log.warning("stamp dead-lettered; its unit stays reserved until replay or expiry", request_id=rid,
                        code=exc.code.code, attempts=attempt)

    async def _schedule_again(self, conn: asyncpg.Connection, event: Event, rid: str, attempt: int,
                              exc: errors.BubuhError) -> str:
        """``stamp.retry`` with the next attempt number, or ``stamp.dead-letter`` after the last one."""
        headers = [(k, v) for k, v in event.headers.items() if k not in (HEADER_ATTEMPT, HEADER_REPLAY)]
        if attempt < self._settings.stamp_max_attempts:
            delay = self._backoff.delay(attempt)
            await retry.schedule(conn, Outgoing(self._retry_topic, rid.encode(), event.raw,
                                                headers + [(HEADER_ATTEMPT, str(attempt + 1).encode())],
                                                event.event_id), delay)
            log.info("stamp retry scheduled", request_id=rid, attempt=attempt, code=exc.code.code,
                     delay_s=round(delay, 2))
            return "retried"
        history = [dict(attempt=r["attempt"], at=r["at"].isoformat(), code=r["code"], detail=r["detail"])
                   for r in await conn.fetch("SELECT * FROM attempts WHERE request_id = $1 ORDER BY attempt", rid)]
        await conn.execute("UPDATE requests SET status = 'dead_lettered' WHERE request_id = $1 "
                           "AND status NOT IN ('signed', 'completed', 'failed')", rid)
        dlq = Outgoing(self._settings.topic(topics.STAMP_DLQ.name), rid.encode(), event.raw,
                       dead_letter_headers(headers, code=exc.code.code, detail=exc.detail,
                                           source=f"{self._retry_topic}/-1/-1", consumer=CONSUMER,
                                           extra=[(HEADER_DLQ_ATTEMPTS, json.dumps(history).encode())]),
                       event.event_id)
        await outbox.add(conn, [dlq])
        return "dead_lettered"

    @staticmethod
    async def _ensure_row(conn: asyncpg.Connection, rid: str, channel_id: str, account_id: str, sha256: str,
                          accepted_at: dt.datetime | None = None) -> None:
        await conn.execute(
            "INSERT INTO requests (request_id, channel_id, account_id, document_sha256, status, accepted_at) "
            "VALUES ($1, $2, $3, $4, 'reserved', COALESCE($5, now())) ON CONFLICT (request_id) DO NOTHING",
            rid, channel_id, account_id, sha256, accepted_at)
