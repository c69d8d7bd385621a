"""One journey: what happened to a stamp request or a purchase, step by step, and where it is now.

The steps come from where the platform records them, each with its own clock:
- a Kafka record: its envelope's ``occurred_at`` and ``producer``, and where it sits (topic, partition,
  offset); dead letters add their ``bubuh-dlq-*`` reason, retries their attempt number;
- an inbox row: when a consumer applied that event, and the topic, partition and offset it read it at;
- the ledger's transfers, the stamping request row and its failed attempts, the purchase row;
- the notification deliveries of the journey's events, every webhook attempt, the emails.
All reads are read-only, each in the owning service's schema.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import asyncpg

from services.kernel import events
from services.kernel.processing.deadletter import DLQ_AT, DLQ_CONSUMER, DLQ_DETAIL, DLQ_REASON, DLQ_SOURCE
from services.kernel.settings import Settings
from services.operator.journey.keyed_records import KeyedReader, KeyedRecord

# where to start reading Kafka before the first thing the databases know (clocks of different hosts)
MARGIN = dt.timedelta(minutes=2)
STAMP_TOPICS = ["stamp.requested", "quota.events", "stamp.events", "stamp.retry", "stamp.dead-letter",
                "quota.dead-letter", "notification.dead-letter"]
PURCHASE_TOPICS = ["purchase.submitted", "purchase.dead-letter", "purchase.events", "quota.events",
                   "quota.dead-letter", "notification.dead-letter"]
TERMINAL = ("completed", "failed", "dead-lettered")
# the record that ends each journey on Kafka (--follow waits for it), and how long it may lag the database
LAST_RECORD = {("stamp", "completed"): ("published StampCompleted",),
               ("stamp", "failed"): ("published StampFailed", "published QuotaRejected"),
               ("stamp", "dead-lettered"): ("dead-lettered ",),
               ("purchase", "completed"): ("published QuotaCredited",),
               ("purchase", "failed"): ("published PurchaseRejected", "dead-lettered ")}
SETTLE_LIMIT = dt.timedelta(seconds=30)


class NotFound(Exception):
    pass


@dataclass(frozen=True)
class Step:
    at: dt.datetime
    service: str
    step: str
    topic: str = ""
    partition: int | None = None
    offset: int | None = None
    producer: str = ""
    detail: str = ""
    # at one instant (a transaction's now()), reading an event comes before its effects, and they before
    # what the transaction published
    rank: int = 1

    @property
    def where(self) -> str:
        if not self.topic:
            return ""
        return f"{self.topic}[{self.partition}]@{self.offset}" if self.offset is not None else self.topic

    @property
    def identity(self) -> tuple:
        return (self.service, self.step, self.topic, self.partition, self.offset, self.at)


@dataclass
class Now:
    state: str          # completed | failed | dead-lettered | waiting
    code: str = ""
    since: dt.datetime | None = None
    summary: str = ""
    settled: bool = True    # the record that says so is on Kafka too


@dataclass
class Journey:
    kind: str           # stamp | purchase
    id: str
    channel_id: str
    account_id: str
    steps: list[Step] = field(default_factory=list)
    now: Now = field(default_factory=lambda: Now("waiting"))

    @property
    def finished(self) -> bool:
        """Terminal in the database and its last record on Kafka (the outbox relays it a moment later)."""
        return self.now.state in TERMINAL and self.now.settled


def _q(settings: Settings, service: str, table: str) -> str:
    return f'"{settings.schema(service)}".{table}'


def _short(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


class Tracer:
    """Finds the id, then gathers its steps; ``gather`` again (``--follow``) reads only new records."""

    def __init__(self, settings: Settings, conn: asyncpg.Connection) -> None:
        self.s = settings
        self.conn = conn
        self._reader: KeyedReader | None = None
        self._records: dict[tuple, KeyedRecord] = {}
        self._pending: list = []

    async def close(self) -> None:
        if self._reader:
            await self._reader.stop()

    async def identify(self, text: str) -> Journey:
        """A stamp request id, an SN, or a purchase id (all unambiguous: SNs are not UUIDs)."""
        from services.stamping import serial
        text = text.strip()
        requests = _q(self.s, "stamping", "requests")
        if serial.is_valid(text.upper()):
            row = await self.conn.fetchrow(f"SELECT request_id, channel_id, account_id FROM {requests} WHERE sn = $1",
                                           text.upper())
            if row:
                return Journey("stamp", row["request_id"], row["channel_id"], row["account_id"])
            raise NotFound(f"no stamp with SN {text}")
        row = await self.conn.fetchrow(f"SELECT channel_id, account_id FROM {requests} WHERE request_id = $1", text)
        if row:
            return Journey("stamp", text, row["channel_id"], row["account_id"])
        row = await self.conn.fetchrow(
            f"SELECT channel_id, account_id FROM {_q(self.s, 'purchase', 'purchases')} WHERE purchase_id = $1", text)
        if row:
            return Journey("purchase", text, row["channel_id"], row["account_id"])
        # a request the ledger saw but stamping did not record (published by another intake)
        row = await self.conn.fetchrow(
            f"SELECT channel_id, account_id, kind FROM {_q(self.s, 'quota', 'transfers')} WHERE id = $1", text)
        if row:
            return Journey("purchase" if row["kind"] == "credit" else "stamp", text, row["channel_id"],
                           row["account_id"])
        raise NotFound(f"no stamp request, purchase or SN {text!r}")

    async def gather(self, j: Journey) -> Journey:
        steps: list[Step] = []
        if j.kind == "stamp":
            row = await self.conn.fetchrow(f"SELECT * FROM {_q(self.s, 'stamping', 'requests')} WHERE request_id = $1",
                                           j.id)
            steps += self._stamp_rows(row)
            steps += [Step(a["at"], "stamping", f"attempt {a['attempt']} failed", detail=f"{a['code']}: {a['detail']}")
                      for a in await self.conn.fetch(f"SELECT * FROM {_q(self.s, 'stamping', 'attempts')} "
                                                     "WHERE request_id = $1 ORDER BY attempt", j.id)]
            transfers = await self.conn.fetch(
                f"SELECT * FROM {_q(self.s, 'quota', 'transfers')} WHERE id = $1 OR pending_id = $1", j.id)
            began = row["accepted_at"] if row else min((t["created_at"] for t in transfers), default=None)
        else:
            row = await self.conn.fetchrow(
                f"SELECT * FROM {_q(self.s, 'purchase', 'purchases')} WHERE purchase_id = $1", j.id)
            steps += self._purchase_rows(row)
            transfers = await self.conn.fetch(f"SELECT * FROM {_q(self.s, 'quota', 'transfers')} WHERE id = $1", j.id)
            began = row["accepted_at"] if row else min((t["created_at"] for t in transfers), default=None)
        steps += [self._transfer(t) for t in transfers]

        records = await self._read_kafka(j, began or dt.datetime.now(dt.UTC))
        event_ids: dict[str, str] = {}          # event id -> its type, of the journey's own records
        inbox_keys: dict[str, str] = {}         # inbox key -> event id (purchase.confirmation keys by content)
        for r in records:
            step, event_id, type_name = self._record_step(r, self.s.topic_prefix)
            steps.append(step)
            if event_id and r.topic not in ("stamp.dead-letter", "quota.dead-letter", "purchase.dead-letter",
                                            "stamp.retry"):
                event_ids[event_id] = type_name
                inbox_keys[event_id] = event_id
                if r.topic == "purchase.submitted":
                    from services.kernel.inbox import by_content
                    inbox_keys[by_content(_as_event(r))] = event_id
        steps += await self._applied(inbox_keys, event_ids)
        steps += await self._notifications(list(event_ids), event_ids)
        steps.sort(key=lambda s: (s.at, s.rank))
        j.steps = steps
        j.now = self._now(j, row, transfers, steps)
        return j

    # -- the rows ---------------------------------------------------------------------------------

    @staticmethod
    def _stamp_rows(row) -> list[Step]:
        if row is None:
            return []
        out = [Step(row["accepted_at"], "stamping", "accepted (POST /v1/stamps)")]
        if row["started_at"]:
            out.append(Step(row["started_at"], "stamping", "worker started signing",
                            detail=f"SN {row['sn']}, delivery {row['deliveries']}"))
        if row["finished_at"]:
            out.append(Step(row["finished_at"], "stamping", f"request {row['status']}",
                            detail=" ".join(x for x in (row["code"] or "", row["sn"] or "") if x)))
        return out

    @staticmethod
    def _purchase_rows(row) -> list[Step]:
        if row is None:
            return []
        out = [Step(row["accepted_at"], "purchase", "accepted",
                    detail=f"order {row['channel_order_id']}, {row['quantity']} units")]
        if row["decided_at"]:
            out.append(Step(row["decided_at"], "purchase", f"purchase {row['status']}", detail=row["code"] or ""))
        return out

    @staticmethod
    def _transfer(t) -> Step:
        detail = f"id {t['id']}, amount {t['amount']}" + (f", {t['code']}" if t["code"] else "")
        return Step(t["created_at"], "quota", f"ledger transfer {t['kind']}", detail=detail)

    # -- Kafka ------------------------------------------------------------------------------------

    async def _read_kafka(self, j: Journey, began: dt.datetime) -> list[KeyedRecord]:
        if self._reader is None:
            account = events.account_key(j.channel_id, j.account_id)
            keys = {j.id, account, j.channel_id}
            topics = STAMP_TOPICS if j.kind == "stamp" else PURCHASE_TOPICS
            self._reader = KeyedReader(self.s, topics, keys, began - MARGIN)
            await self._reader.start()
        new = await self._reader.read_new()
        # a notification's dead letter names the event it was about: those of the journey come first
        for r in sorted(new, key=lambda r: r.topic == "notification.dead-letter"):
            if self._belongs(j, r):
                self._records[(r.topic, r.partition, r.offset)] = r
        return list(self._records.values())

    def _belongs(self, j: Journey, r: KeyedRecord) -> bool:
        """Whether a record under one of the journey's keys is about this journey (an account key is shared)."""
        try:
            _, payload = events.decode(r.value)
        except Exception:  # noqa: BLE001 - a dead letter of an undecodable record: about nobody we can tell
            return False
        if r.topic == "notification.dead-letter":
            return payload.event_id in self._known_event_ids()
        for name in ("request_id", "purchase_id"):
            if getattr(payload, name, None) == j.id:
                return True
        return False

    def _known_event_ids(self) -> set[str]:
        out = set()
        for r in self._records.values():
            try:
                out.add(events.decode(r.value)[0].event_id)
            except Exception:  # noqa: BLE001
                pass
        return out

    @staticmethod
    def _record_step(r: KeyedRecord, prefix: str) -> tuple[Step, str, str]:
        env, _ = events.decode(r.value)
        h = {k: v.decode(errors="replace") for k, v in r.headers.items()}
        kind = _short(env.type)
        if DLQ_REASON in h:
            at = dt.datetime.fromisoformat(h[DLQ_AT]) if h.get(DLQ_AT) else _utc(r.timestamp_ms)
            step = Step(at, h.get(DLQ_CONSUMER, "").split(".")[0] or "?", f"dead-lettered {kind}: {h[DLQ_REASON]}",
                        r.topic, r.partition, r.offset, h.get(DLQ_CONSUMER, ""),
                        f"by {h.get(DLQ_CONSUMER, '?')} (read at {h.get(DLQ_SOURCE, '?').removeprefix(prefix)}): "
                        f"{h.get(DLQ_DETAIL, '')}")
        elif r.topic == "stamp.retry":
            step = Step(_utc(r.timestamp_ms), "stamping", f"retry {kind} (attempt {h.get('bubuh-attempt', '?')})",
                        r.topic, r.partition, r.offset, env.producer)
        else:
            detail = ""
            _, payload = events.decode(r.value)
            if getattr(payload, "code", ""):
                detail = payload.code
            elif getattr(payload, "sn", ""):
                detail = f"SN {payload.sn}"
            step = Step(events.utc_datetime(env.occurred_at), env.producer.split(":")[0],
                        f"published {kind}", r.topic, r.partition, r.offset, env.producer, detail, rank=2)
        return step, env.event_id, env.type

    # -- where events were applied, and what the channel was told ---------------------------------

    async def _applied(self, inbox_keys: dict[str, str], types: dict[str, str]) -> list[Step]:
        out = []
        for service in ("purchase", "quota", "notification"):
            rows = await self.conn.fetch(
                'SELECT consumer, event_id, topic, "partition", "offset", applied_at '
                f'FROM {_q(self.s, service, "inbox")} '
                "WHERE event_id = ANY($1::text[])", list(inbox_keys))
            prefix = len(self.s.topic_prefix)
            for r in rows:
                kind = _short(types.get(inbox_keys[r["event_id"]], "event"))
                out.append(Step(r["applied_at"], service, f"{r['consumer']} applied {kind}",
                                (r["topic"] or "")[prefix:], r["partition"], r["offset"], rank=0))
        return out

    async def _notifications(self, event_ids: list[str], types: dict[str, str]) -> list[Step]:
        out = []
        deliveries = await self.conn.fetch(
            f"SELECT * FROM {_q(self.s, 'notification', 'deliveries')} WHERE event_id = ANY($1::text[])", event_ids)
        for d in deliveries:
            out.append(Step(d["created_at"], "notification", f"webhook queued ({d['event_type']})",
                            detail=d["url"] or "no callback URL"))
            for a in await self.conn.fetch(
                    f"SELECT * FROM {_q(self.s, 'notification', 'delivery_attempts')} WHERE delivery_id = $1 "
                    "ORDER BY id", d["delivery_id"]):
                answer = f"HTTP {a['status_code']}" if a["status_code"] else (a["error"] or "")
                out.append(Step(a["started_at"], "notification", f"webhook attempt {a['attempt']} {a['outcome']}",
                                detail=f"{answer}, {a['duration_ms']:.0f} ms"))
        for e in await self.conn.fetch(
                f"SELECT * FROM {_q(self.s, 'notification', 'emails')} WHERE event_id = ANY($1::text[])", event_ids):
            out.append(Step(e["created_at"], "notification", f"email queued ({e['event_type']})"))
            if e["sent_at"]:
                out.append(Step(e["sent_at"], "notification", "email sent"))
        self._pending = [d for d in deliveries if d["status"] == "pending"]
        return out

    # -- now --------------------------------------------------------------------------------------

    def _now(self, j: Journey, row, transfers, steps: list[Step]) -> Now:
        last = steps[-1].at if steps else None
        kinds = {t["kind"]: t for t in transfers}
        if j.kind == "stamp":
            now = self._stamp_now(j, row, kinds, last)
        else:
            now = self._purchase_now(row, kinds, last)
        if now.state in TERMINAL:
            told = [s.step for s in steps if s.topic]
            now.settled = any(t.startswith(LAST_RECORD[(j.kind, now.state)]) for t in told) or (
                now.since is not None and dt.datetime.now(dt.UTC) - now.since > SETTLE_LIMIT)
        if now.state in TERMINAL and self._pending:
            d = self._pending[0]
            now.summary += (f"; webhook still pending ({d['attempts']} attempts"
                            + (f", last {d['last_error'] or d['last_status_code']}" if d["attempts"] else "") + ")")
        return now

    @staticmethod
    def _stamp_now(j: Journey, row, kinds: dict, last) -> Now:
        status = row["status"] if row else None
        if status == "completed":
            return Now("completed", since=row["finished_at"], summary=f"completed, SN {row['sn']}, unit posted"
                       if "post" in kinds else f"completed, SN {row['sn']}")
        if status == "failed":
            released = ", unit released" if "void" in kinds else (", no unit reserved" if "pending" not in kinds
                                                                  else "")
            return Now("failed", row["code"] or "", row["finished_at"],
                       f"failed with {row['code']}{released}")
        if status == "dead_lettered":
            return Now("dead-lettered", row["code"] or "", last,
                       f"dead-lettered with {row['code']}; its unit stays reserved until "
                       f"`bubuh replay stamp.dead-letter --key {j.id}` or the reservation expires")
        waiting = {None: ("quota", "the ledger has not seen the request"),
                   "queued": ("quota", "waiting for a reservation"),
                   "reserved": ("stamping", "reserved, waiting for a worker" + (" (retry scheduled)"
                                                                                 if row and row["code"] else "")),
                   "stamping": ("stamping", "a worker is signing it"),
                   "signed": ("quota", "signed, waiting for the ledger to post its unit")}
        if "rejected" in kinds and status in (None, "queued"):
            return Now("failed", kinds["rejected"]["code"] or "", kinds["rejected"]["created_at"],
                       f"failed with {kinds['rejected']['code']} (the ledger refused the reservation)")
        where, what = waiting.get(status, ("?", status or "unknown"))
        return Now("waiting", since=last, summary=f"waiting at {where}: {what}")

    @staticmethod
    def _purchase_now(row, kinds: dict, last) -> Now:
        status = row["status"] if row else None
        if status == "rejected":
            return Now("failed", row["code"] or "", row["decided_at"], f"failed with {row['code']}")
        if "credit" in kinds:
            t = kinds["credit"]
            return Now("completed", since=t["created_at"], summary=f"completed, {t['amount']} units credited")
        if status == "confirmed":
            return Now("waiting", since=last, summary="waiting at quota: confirmed, not credited yet")
        return Now("waiting", since=last, summary="waiting at purchase: not confirmed yet")


def _as_event(r: KeyedRecord) -> events.Event:
    env, payload = events.decode(r.value)
    return events.Event(env, payload, r.topic, r.partition, r.offset, r.key, r.headers, r.value)
