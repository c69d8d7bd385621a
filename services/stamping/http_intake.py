"""The door for stamp requests: check the document, store it, publish ``stamp.requested``, answer 202.

Order matters for "accepted means durable": the document and the request are stored (fsync) before
the event is published, and the event is acknowledged by Kafka (acks=all) before the 202. A bad
document is refused here with its code and never enters the queue, so it cannot block anyone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
import uuid
from dataclasses import dataclass

import asyncpg

from services.contracts.bubuh.v1 import stamp_pb2
from services.kernel import errors, events, failures, logs, topics
from services.kernel.channels import ChannelInfo
from services.kernel.producer import Producer
from services.kernel.settings import Settings
from services.stamping import NAME, store
from services.stamping.document import inspection
from services.stamping.document.budget import Budget
from services.stamping.metrics import INTAKE_REJECTED, INTAKE_STAGE_SECONDS
from services.stamping.pace import LATELY_AT_DOOR_S
from services.stamping.queue import AcceptedSince, QueueView
from services.stamping.sandbox import Sandbox

log = logs.get(__name__)
_NS = uuid.UUID("a3c1f1de-5d0e-4a8e-9a43-2b8f5b1e7c20")
# the row of a request refused after all, while still queued; found by its primary key, not by a scan of the
# open requests (tracker.py, ``_SIGNED_ROWS``)
FORGET = "DELETE FROM requests WHERE request_id = $1 AND status IS NOT DISTINCT FROM 'queued'"
# The queued row ($1-$7), and in the same statement the requests still open that any API process accepted
# since this process read the queue's order ($8; none when it has not) and before this one, per channel: its
# position counts them (queue.py, ``AcceptedSince``). The queue is read once a second per process, so without
# them a 202 counted only its own process's 202s since: a held queue's fill (three channels sending at once,
# two API processes) was told 0.71-0.78 of its place in its first two seconds, and took twice its first ETA.
# A range of the open requests' index over at most the seconds since the read: no statement of its own.
# With them, every API process's requests accepted in the LATELY_AT_DOOR_S before this one ("lately"): a burst at
# the door shows in it at once (queue.py, ``QueueView.facts``), another range of the same index.
RECORD = f"""
WITH recorded AS (INSERT INTO requests (request_id, channel_id, account_id, idempotency_key, idempotency_fingerprint,
                                        document_sha256, status, accepted_at)
                  VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7) ON CONFLICT (request_id) DO NOTHING RETURNING 1),
     since AS (SELECT channel_id, count(*) AS n FROM requests
                WHERE status IN ('queued', 'reserved', 'stamping')
                  AND accepted_at >= $8::timestamptz AND accepted_at < $7
                GROUP BY 1)
SELECT EXISTS (SELECT FROM recorded) AS recorded, ARRAY(SELECT channel_id FROM since ORDER BY 1) AS channels,
       ARRAY(SELECT n FROM since ORDER BY channel_id) AS counts,
       (SELECT count(*) FROM requests
         WHERE status IN ('queued', 'reserved', 'stamping', 'signed')
           AND accepted_at >= $7 - interval '{LATELY_AT_DOOR_S} s' AND accepted_at < $7) AS lately
"""


@dataclass(frozen=True)
class Recorded:
    row: bool                              # this call wrote the queued row
    before: AcceptedSince | None = None    # requests accepted before it since the queue's order was read
    came_lately: int | None = None         # requests accepted in the LATELY_AT_DOOR_S before it (None: not read)


@dataclass(frozen=True)
class StampMeta:
    account_id: str
    page: int
    llx: float
    lly: float
    urx: float
    ury: float
    doc_type: str = ""
    doc_number: str = ""
    doc_date: str = ""
    reason: str = "Meterai elektronik"
    location: str = "Indonesia"
    profile: str = ""
    email: str = ""


@dataclass(frozen=True)
class Accepted:
    request_id: str
    status: str
    position: int | None
    eta_seconds: float | None
    replayed: bool = False


class _StageClock:
    """Each stage of one intake into ``bubuh_stamp_intake_stage_seconds``, timed from the previous one's end."""

    _stages = {name: INTAKE_STAGE_SECONDS.labels(name)
               for name in ("inspect", "idempotency", "store", "record", "publish", "position")}

    def __init__(self) -> None:
        self._since = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self._stages[stage].observe(now - self._since)
        self._since = now


def request_fingerprint(data: bytes, meta: StampMeta) -> str:
    h = hashlib.sha256(data)
    h.update(repr(sorted(vars(meta).items())).encode())
    return h.hexdigest()


def inspect_upload(_state, data: bytes, profile: str, page: int, box, budget: Budget) -> inspection.DocumentFacts:
    """In an intake child of the sandbox (within its CPU and memory budget, and the document budgets)."""
    return inspection.inspect(data, profile, page, box, budget)


class StampIntake:
    def __init__(self, settings: Settings, producer: Producer, pool: asyncpg.Pool, documents: store.DocumentStore,
                 queue: QueueView, inspector: Sandbox) -> None:
        self._topic = settings.topic(topics.STAMP_REQUESTED.name)
        self._budget = Budget.from_settings(settings)
        self._publish_timeout_s = settings.intake_publish_timeout_s
        self._inspector = inspector
        self._producer = producer
        self._pool = pool
        self._store = documents
        self._queue = queue

    async def accept(self, channel: ChannelInfo, data: bytes, meta: StampMeta,
                     idempotency_key: str | None) -> Accepted:
        profile = meta.profile or channel.default_profile or "standard"
        clock = _StageClock()
        try:
            facts = await self._inspector.run(inspect_upload, data, profile, meta.page,
                                              (meta.llx, meta.lly, meta.urx, meta.ury), self._budget)
        except errors.BubuhError as exc:
            INTAKE_REJECTED.labels(exc.code.code).inc()
            raise
        clock.lap("inspect")
        fingerprint = request_fingerprint(data, meta)
        request_id = (str(uuid.uuid5(_NS, f"{channel.channel_id}\x1f{idempotency_key}")) if idempotency_key
                      else str(uuid.uuid4()))
        msg = stamp_pb2.StampRequested(
            request_id=request_id, channel_id=channel.channel_id, account_id=meta.account_id,
            document_ref=store.input_key(request_id), document_sha256=facts.sha256,
            placement=stamp_pb2.Placement(page=meta.page, llx=meta.llx, lly=meta.lly, urx=meta.urx, ury=meta.ury),
            doc_type=meta.doc_type, doc_number=meta.doc_number, doc_date=meta.doc_date, reason=meta.reason,
            location=meta.location, profile=profile, email=meta.email)
        if idempotency_key:
            earlier = await self._earlier(request_id)
            if earlier is not None:
                # a row without a fingerprint was written by the stamping tier from this key's own event:
                # its first attempt was answered 503 (and its row removed), yet the event reached the
                # broker all the same; it is the same request when what that attempt stored is this one
                same = (earlier["idempotency_fingerprint"] == fingerprint if earlier["idempotency_fingerprint"]
                        else await self._same_as_stored(msg, earlier["document_sha256"]))
                if not same:
                    raise errors.BubuhError(errors.IDEMPOTENCY_MISMATCH,
                                            f"Idempotency-Key {idempotency_key!r} was used with another request")
                if earlier["status"] != "queued":
                    position = await self._queue.position_of(request_id, channel.channel_id, earlier["status"],
                                                             earlier["accepted_at"])
                    facts = await self._queue.facts()
                    eta = facts.eta_seconds(position, reserved=True) if facts and position is not None else None
                    return Accepted(request_id, earlier["status"], position, eta, True)
            clock.lap("idempotency")
        self._producer.refuse_while_away()     # before storing anything: it would be refused after all
        accepted_at = dt.datetime.now(dt.UTC)
        msg.accepted_at.FromDatetime(accepted_at)
        # the queued row is written while the document and the request are fsynced: the two waits overlap
        # (a 202 waited for the sum, about 28 + 19 ms). Nothing is published before both are done.
        recording = asyncio.ensure_future(self._record(msg, idempotency_key, fingerprint, accepted_at))
        try:
            await self._store.put_all([(store.input_key(request_id), data),
                                       (store.meta_key(request_id), msg.SerializeToString())])
            clock.lap("store")
            recorded = await asyncio.shield(recording)
        except BaseException:       # not stored (503), or the caller went away: no row is left behind
            await asyncio.shield(self._undo_record(recording, request_id))
            raise
        clock.lap("record")
        env = events.envelope(msg, producer=NAME, event_id=str(uuid.uuid5(_NS, f"{request_id}\x1frequested")))
        try:
            # within the intake's budget: without Kafka's acknowledgement the request is not accepted (503, retry)
            # keyed by account, as its credits on purchase.events: one partition holds an account's
            # reservations in the order accepted, so one quota member makes them (topics.STAMP_REQUESTED)
            await self._producer.publish(events.outgoing(self._topic, events.account_key(msg.channel_id,
                                                                                         msg.account_id), env),
                                         timeout_s=self._publish_timeout_s)
        except BaseException:       # not accepted (503), or the caller went away (the task cancelled)
            if recorded.row:
                await self._forget(request_id)
            raise
        if not recorded.row:
            await self._mark_accepted(request_id)
        clock.lap("publish")
        facts_now = await self._queue.facts(recorded.came_lately)
        position = await self._queue.position_for_new(channel.channel_id, accepted_at, recorded.before)
        clock.lap("position")
        log.info("stamp accepted", request_id=request_id, channel_id=channel.channel_id, account_id=meta.account_id,
                 profile=profile, bytes=len(data), position=position)
        return Accepted(request_id, "queued", position,
                        facts_now.eta_seconds(position) if facts_now and position is not None else None)

    async def _same_as_stored(self, msg: stamp_pb2.StampRequested, row_sha256: str | None) -> bool:
        """Is ``msg`` (not yet given its acceptance time) what the key's first attempt stored beside its
        document before publishing? Without that record, the row's document hash decides, when the row
        has one (a row written from a quota event alone does not)."""
        try:
            stored = stamp_pb2.StampRequested.FromString(await self._store.get(store.meta_key(msg.request_id)))
        except FileNotFoundError:
            return row_sha256 in (None, "", msg.document_sha256)
        stored.ClearField("accepted_at")
        return stored == msg

    async def _earlier(self, request_id: str) -> asyncpg.Record | None:
        try:
            return await asyncio.wait_for(self._pool.fetchrow(
                "SELECT status, idempotency_fingerprint, document_sha256, accepted_at FROM requests "
                "WHERE request_id = $1", request_id), 0.5)
        except Exception as exc:  # noqa: BLE001 - without the database the key still yields the same id
            if failures.classify(exc).waits:
                return None
            raise

    async def _record(self, msg: stamp_pb2.StampRequested, idempotency_key: str | None, fingerprint: str,
                      accepted_at: dt.datetime) -> Recorded:
        """The queued row makes the request readable at once; the worker creates it if this could not. With
        it, the requests every API process accepted before it since this one read the queue (``RECORD``)."""
        read_at = self._queue.order_read_at
        try:
            row = await asyncio.wait_for(self._pool.fetchrow(
                RECORD, msg.request_id, msg.channel_id, msg.account_id, idempotency_key, fingerprint,
                msg.document_sha256, accepted_at, read_at), 0.5)
        except Exception as exc:  # noqa: BLE001
            if not failures.classify(exc).waits:
                raise
            log.warning("stamp request not recorded yet (database away)", request_id=msg.request_id)
            return Recorded(False)
        return Recorded(row["recorded"], AcceptedSince(read_at, dict(zip(row["channels"], row["counts"], strict=True)))
                        if read_at is not None else None, row["lately"])

    async def _undo_record(self, recording: asyncio.Future[Recorded], request_id: str) -> None:
        """Once the row's write has ended, the row of a request refused before publishing is removed."""
        try:
            recorded = await recording
        except BaseException:  # noqa: BLE001 - its failure is the caller's to report, if it reports one
            return
        if recorded.row:
            await self._forget(request_id)

    async def _mark_accepted(self, request_id: str) -> None:
        """Without its row, a status read would call the request unknown until the stamping tier writes
        the row from the event; the mark beside the stored request says it was accepted
        (``RequestStatus``)."""
        try:
            await self._store.put(store.accepted_key(request_id), b"")
        except errors.BubuhError as exc:     # the 202 stands: reads say not found until the row exists
            log.warning("accepted without a row or a mark", request_id=request_id, error=exc.detail)

    async def _forget(self, request_id: str) -> None:
        """The queued row of a request that was not accepted after all. Left, it said 'queued' forever: in
        the queue depth, the oldest-open-request age and the count behind every position. Should the event
        reach the broker later all the same, the stamping tier writes the row again as it moves on."""
        try:
            await asyncio.shield(asyncio.wait_for(self._pool.execute(FORGET, request_id), 0.5))
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - the refusal stands either way
            log.warning("queued row of a refused request not removed", request_id=request_id, error=repr(exc))
