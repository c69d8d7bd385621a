"""The consumer every service runs: source -> decode -> handler -> failure policy -> commit.

Why it looks like this:
- Offsets are committed only after the records before them were handled, so a killed process
  re-reads, and the inbox turns the re-read into a no-op.
- Back-pressure is the fetch itself: the next poll happens only when the current one is done, so at
  most ``max_batch`` records are in memory, whatever the lag. A paused partition is not fetched.
- The records of one partition are handled in order. A batched handler gets a poll's partitions as
  one batch (one transaction for a ``Transactional`` handler), each partition's records in order and
  the partitions in the order of the consumer's ``topics``; a partition holding a record to
  dead-letter, or any poll whose batch fails, is handled partition by partition, concurrently, one
  batch each, so a failure holds up only its own partition. A ``PerRecord`` handler may
  declare ``concurrency``: then records of different chains (``chain_key``) run at once, at most that
  many in the whole consumer, and each chain in order. A partition rewound after an outage is rewound
  to its earliest unfinished record, so later records that did finish are handled again: only for
  handlers that are idempotent per record (the stamping worker).
- The failure policy (README, "Failure policy") follows ``failures.classify``:
  * undecodable, forged or invalid (``bad``): dead-lettered at once with its code; the partition
    moves on (invariant 5). A batch the client cannot decode at all becomes a marker entry;
  * an ``outage``: that partition is rewound to the record and paused with backoff (0.2 s doubling
    to 5 s), and resumes at the same record; nothing is dead-lettered;
  * ``transient`` (serialization failure, deadlock): retried in place at once, a few times;
  * ``suspect`` (statement timeout or cancel, client timeout, protocol error): retried in place a
    few times; still failing while the database's health probe succeeds, it counts as a crash;
  * ``crash``: scheduled again through the durable retry path (an outbox row with a due time that
    publishes the record to its own topic, marked for this consumer alone) up to
    ``consumer_crash_retries`` times, then dead-lettered as ``HANDLER_CRASHED``.
- A batch that fails for any reason but an outage is redone record by record, so the others land.
- ``DlqLimit``: dead-lettering too much in a row, or too large a share of a window, stops this
  consumer (``bubuh_consumer_stopped``) before it drains a healthy topic because of a bug; codes a
  consumer expects from hostile input can be exempted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Sequence

import asyncpg

from services.kernel import errors, events, failures, logs, retry, tracing
from services.kernel.database import healthy
from services.kernel.events import HEADER_TYPE, Event, Outgoing
from services.kernel.failures import Kind
from services.kernel.metrics import (
    BATCH_RECORDS,
    CONSUMED,
    CONSUMER_STOPPED,
    CRASH_RETRIES,
    DEAD_LETTERED,
    HANDLE_SECONDS,
    LAG,
    OUTAGE_PAUSES,
    PAUSED_PARTITIONS,
    UNDECODABLE,
)
from services.kernel.processing.deadletter import (
    UNDECODABLE as UNDECODABLE_CODE,
)
from services.kernel.processing.deadletter import (
    DlqLimit,
    DlqWatch,
    dead_letter_record,
    marker_record,
)
from services.kernel.processing.handler import Handler, Rejection
from services.kernel.processing.kafka_source import KafkaSource
from services.kernel.processing.source import Record, Source, TopicPartition, Undecodable
from services.kernel.producer import Producer
from services.kernel.settings import Settings
from services.kernel.waiting import Pause

log = logs.get(__name__)

HEADER_CRASH_ATTEMPT = "bubuh-crash-attempt"   # how often this record's handler crashed before
HEADER_RETRY_FOR = "bubuh-retry-for"           # a durable retry meant for one consumer; the others skip it
HEADER_ATTEMPT = "bubuh-attempt"               # a handler's own count of its durable retries (a TSA, an HSM away)
HEADER_REPLAY = "bubuh-replay"                 # sent again by `bubuh replay`: attempt counts start over

# a record as the loop decoded it: its event, None when this consumer skips it, or why it is dead-lettered
Decoded = Event | errors.BubuhError | None


# which consumer loop of this process last set each lag series: a loop removes only its own (two members
# of one group can share a process, in tests and in the shared local layout)
_LAG_SET_BY: dict[tuple[str, str, str], int] = {}


class _Halt(Exception):
    """Stop this partition at ``offset``: an outage (wait and resume there) or the dead-letter limit."""

    def __init__(self, offset: int, why: str, cause: BaseException | str) -> None:
        super().__init__(f"{why} at {offset}: {cause!r}")
        self.offset, self.why, self.cause = offset, why, cause


class ConsumerLoop:
    def __init__(self, settings: Settings, producer: Producer, *, name: str, topics: list[str], handler: Handler,
                 dead_letter_topic: str, pool: asyncpg.Pool | None = None, max_batch: int | None = None,
                 group_id: str | None = None, source: Source | None = None, limit: DlqLimit | None = None,
                 limit_exempt: frozenset[str] = frozenset()) -> None:
        self.name = name
        self._settings = settings
        self._producer = producer
        self._topics = topics
        self._handler = handler
        self._types: frozenset[str] | None = getattr(handler, "types", None)   # None: every type
        self._concurrency: int = getattr(handler, "concurrency", 1)
        self._chain_key = getattr(handler, "chain_key", None) or (lambda event: event.key)
        self._gate = asyncio.Semaphore(self._concurrency)   # records of this consumer in its handler at once
        self._dlq = dead_letter_topic
        self._pool = pool
        self._max_batch = max_batch or settings.consumer_max_batch
        self._group = group_id or settings.group(name)
        self._source = source
        self._watch = DlqWatch(limit or DlqLimit.from_settings(settings))
        self._exempt = limit_exempt
        self._crash_backoff = retry.Backoff(base_s=settings.consumer_crash_retry_base_s, max_s=600.0)
        self._paused: dict[TopicPartition, float] = {}     # partition -> monotonic time to resume
        self._pauses: dict[TopicPartition, Pause] = {}     # partition -> its pause while a dependency is away
        self._retry_for = name.encode()
        self.ready = asyncio.Event()   # set once the group assigned this member its partitions
        self.stopped_reason: str | None = None

    # --- the loop -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        source = self._source or KafkaSource(self._settings, self._topics, group_id=self._group,
                                             client_id=f"bubuh-{self.name}", max_batch=self._max_batch)
        await source.start()
        CONSUMER_STOPPED.labels(self.name, "dead_letter_limit").set(0)
        OUTAGE_PAUSES.labels(self.name)        # at 0 from the start: "no pause yet" is not "not reported"
        log.info("consumer started", consumer=self.name, topics=self._topics, group=self._group)
        try:
            while not stop.is_set() and self.stopped_reason is None:
                self._resume_due(source)
                polled = await source.poll(0.3, self._max_batch)
                if source.assignment():
                    self.ready.set()
                if polled:
                    await self._handle_poll(source, polled.records, polled.undecodable)
                await self._report_lag(source)
        finally:
            await source.stop()
            log.info("consumer stopped", consumer=self.name, reason=self.stopped_reason or "shutdown")

    async def _handle_poll(self, source: Source, records: dict[TopicPartition, list[Record]],
                           undecodable: list[Undecodable]) -> None:
        commits: dict[TopicPartition, int] = {}
        halts: dict[TopicPartition, _Halt] = {}
        tps = list(records)
        decoded = {tp: self._decoded(records[tp]) for tp in tps}     # once, whichever path a partition takes
        outcome = await self._together(decoded) if self._handler.batched and len(tps) > 1 else {}
        rest = [tp for tp in tps if tp not in outcome]
        results = await asyncio.gather(*(self._partition(records[tp], decoded[tp]) for tp in rest),
                                       return_exceptions=True)
        outcome.update(zip(rest, results, strict=True))
        for tp in tps:
            result = outcome[tp]
            first = records[tp][0].offset
            if isinstance(result, _Halt):
                halts[tp] = result
                if result.offset > first:
                    commits[tp] = result.offset
            elif isinstance(result, BaseException):
                raise result          # a bug in the pipeline itself: let the process say so
            else:
                commits[tp] = records[tp][-1].offset + 1
                self._pauses.pop(tp, None)
        # an undecodable stretch comes after the records the source delivered before it
        for stretch in undecodable:
            if stretch.tp in halts:
                continue              # rewound to an earlier record: the stretch is met again later
            try:
                await self._dead_letter(marker_record(stretch, self._dlq, self.name, UNDECODABLE_CODE),
                                        UNDECODABLE_CODE, stretch.start, stretch.reason)
                UNDECODABLE.labels(self.name, stretch.tp.topic).inc()
                commits[stretch.tp] = stretch.end
            except _Halt as halt:
                halts[stretch.tp] = halt
        await source.commit(commits)
        outage = False
        for tp, halt in halts.items():
            source.seek(tp, halt.offset)
            if halt.why == "limit":
                self._stop_for_limit(str(halt.cause))
            else:
                outage = True
                wait = self._pauses.setdefault(tp, Pause()).next()
                self._paused[tp] = time.monotonic() + wait
                source.pause([tp])
                log.warning("dependency outage: partition paused", consumer=self.name, topic=tp.topic,
                            partition=tp.partition, offset=halt.offset, pause_s=wait, error=repr(halt.cause))
        if outage:
            OUTAGE_PAUSES.labels(self.name).inc()
        PAUSED_PARTITIONS.labels(self.name).set(len(self._paused))

    def _resume_due(self, source: Source) -> None:
        if not self._paused:
            return
        now = time.monotonic()
        due = [tp for tp, at in self._paused.items() if at <= now]
        for tp in due:
            del self._paused[tp]
        if due:
            source.resume(due)
            PAUSED_PARTITIONS.labels(self.name).set(len(self._paused))

    def _stop_for_limit(self, why: str) -> None:
        if self.stopped_reason is None:
            self.stopped_reason = why
            CONSUMER_STOPPED.labels(self.name, "dead_letter_limit").set(1)
            log.error("consumer stopped by its dead-letter limit: fix the cause, then restart; nothing past "
                      "this point was committed", consumer=self.name, why=why)

    # --- a poll's partitions, as one batch --------------------------------------------------------
    async def _together(self, decoded: dict[TopicPartition, list[Decoded]]) -> dict[TopicPartition, _Halt | None]:
        """The partitions of a poll whose records all decode, handed to a batched handler as one batch:
        one transaction for the poll instead of one per partition. Issue 12: a flooding channel's
        account was in every partition's batch of the quota ledger, so a poll's batches took turns, a
        commit each, and a small channel's event waited for all of them. Each partition's records stay
        in order, and the partitions follow the order of the consumer's ``topics`` (the quota ledger
        names credits and stamp outcomes before new reservations, so a reservation sees the units they
        free). Returns each partition it handled (None, or the ``_Halt`` of a dead-letter that could not
        be written); if the batch fails for any reason, nothing is returned and every partition takes
        its own path, so a failure still holds up only its own partition."""
        runs: dict[TopicPartition, list[Event]] = {}
        skipped: dict[TopicPartition, int] = {}
        rank = {t: i for i, t in enumerate(self._topics)}
        for tp in sorted(decoded, key=lambda tp: (rank.get(tp.topic, len(rank)), tp.topic, tp.partition)):
            if any(isinstance(d, errors.BubuhError) for d in decoded[tp]):
                continue                  # a record to dead-letter in its place: the partition's own path
            runs[tp] = [d for d in decoded[tp] if isinstance(d, Event)]
            skipped[tp] = sum(1 for d in decoded[tp] if d is None)
        batch = [e for run in runs.values() for e in run]
        if sum(1 for run in runs.values() if run) < 2:
            return {}
        started = time.perf_counter()
        try:
            rejected = await self._attempt(batch)
        except Exception as exc:  # noqa: BLE001 - redone partition by partition, where the policy applies
            failure = failures.observe(self.name, exc)
            log.info("poll batch failed; redoing it partition by partition", consumer=self.name,
                     partitions=len(runs), records=len(batch), kind=failure.kind.value, error=repr(exc)[:300])
            return {}
        self._observe(batch, time.perf_counter() - started)
        outcome: dict[TopicPartition, _Halt | None] = {}
        for tp, run in runs.items():
            mine = [r for r in rejected if (r.event.topic, r.event.partition) == (tp.topic, tp.partition)]
            try:
                await self._settle(run, mine)
                outcome[tp] = None
            except _Halt as halt:
                outcome[tp] = halt
            if skipped[tp]:
                CONSUMED.labels(self.name, tp.topic, "skipped").inc(skipped[tp])
        return outcome

    def _decoded(self, records: list[Record]) -> list[Decoded]:
        """Each of a partition's records decoded, once: its event, None when this consumer skips it (another
        consumer's retry, a type its handler does not act on), or the error of a record to dead-letter."""
        out: list[Decoded] = []
        for record in records:
            if self._skip(record):
                out.append(None)
                continue
            try:
                event = self._decode(record)
            except errors.BubuhError as exc:
                out.append(exc)
                continue
            out.append(None if self._types is not None and event.type not in self._types else event)
        return out

    def _skip(self, record: Record) -> bool:
        return self._foreign_retry(record) or (self._types is not None and self._other_type(record, self._types))

    # --- one partition's records, in order ----------------------------------------------------
    async def _partition(self, records: list[Record], decoded: list[Decoded]) -> None:
        run: list[Event] = []
        skipped = 0
        for record, d in zip(records, decoded, strict=True):
            if d is None:
                skipped += 1
            elif isinstance(d, Event):
                run.append(d)
            else:
                await self._run(run)
                run = []
                await self._dead_letter(dead_letter_record(record, self._dlq, self.name, d.code.code, d.detail),
                                        d.code.code, record.offset, d.detail)
                CONSUMED.labels(self.name, record.topic, "dead_lettered").inc()
        await self._run(run)
        if skipped:
            CONSUMED.labels(self.name, records[0].topic, "skipped").inc(skipped)

    @staticmethod
    def _other_type(record: Record, types: frozenset[str]) -> bool:
        for k, v in record.headers:
            if k == HEADER_TYPE:
                return v.decode(errors="replace") not in types
        return False          # no header: decode it and look

    def _foreign_retry(self, record: Record) -> bool:
        for k, v in record.headers:
            if k == HEADER_RETRY_FOR:
                return v != self._retry_for
        return False

    @staticmethod
    def _decode(record: Record) -> Event:
        env, payload = events.decode(record.value)
        return Event(envelope=env, payload=payload, topic=record.topic, partition=record.partition,
                     offset=record.offset, key=record.key, headers=dict(record.headers), raw=record.value or b"",
                     appended_at_ms=record.appended_at_ms)

    async def _run(self, run: list[Event]) -> None:
        if not run:
            return
        if self._handler.batched and len(run) > 1:
            started = time.perf_counter()
            try:
                rejected = await self._attempt(run)
            except Exception as exc:  # noqa: BLE001 - classified: an outage halts, anything else is redone alone
                failure = failures.observe(self.name, exc)
                if failure.kind is Kind.OUTAGE:
                    raise _Halt(run[0].offset, "outage", exc) from exc
                log.info("batch failed; redoing it record by record", consumer=self.name, records=len(run),
                         kind=failure.kind.value, error=repr(exc)[:300])
            else:
                self._observe(run, time.perf_counter() - started)
                await self._settle(run, rejected)
                return
        if self._concurrency > 1 and len(run) > 1:
            await self._chains(run)
            return
        for event in run:
            await self._one(event)

    async def _chains(self, run: list[Event]) -> None:
        """``run`` as chains of one ``chain_key`` each, in offset order within a chain, up to
        ``concurrency`` records of the consumer at once; a halt is raised at the earliest record that
        halted, once every chain has stopped (the others' records are done or will be redone)."""
        gate = self._gate
        chains: dict[object, list[Event]] = {}
        for event in run:
            chains.setdefault(self._chain_key(event), []).append(event)

        async def chain(events_: list[Event]) -> None:
            for event in events_:
                async with gate:
                    await self._one(event)

        results = await asyncio.gather(*(chain(c) for c in chains.values()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, _Halt):
                raise result
        halts = [r for r in results if isinstance(r, _Halt)]
        if halts:
            raise min(halts, key=lambda h: h.offset)

    async def _attempt(self, run: Sequence[Event]) -> list[Rejection]:
        """The handler, with in-place retries of a transaction that lost a race."""
        token = tracing.bind(run[0].envelope.trace_id) if len(run) == 1 else None
        try:
            for attempt in range(self._settings.consumer_transient_retries + 1):
                try:
                    return await self._handler.process(run)
                except Exception as exc:
                    failure = failures.classify(exc)
                    if failure.kind is not Kind.TRANSIENT or attempt == self._settings.consumer_transient_retries:
                        raise
                    failures.observe(self.name, exc)
                    await asyncio.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
            raise AssertionError("unreachable")
        finally:
            if token is not None:
                tracing.reset(token)

    async def _one(self, event: Event) -> None:
        suspect = 0
        while True:
            started = time.perf_counter()
            try:
                rejected = await self._attempt([event])
            except Exception as exc:  # noqa: BLE001 - the failure policy
                failure = failures.observe(self.name, exc)
                if failure.kind in (Kind.OUTAGE, Kind.TRANSIENT):
                    raise _Halt(event.offset, "outage", exc) from exc
                if failure.kind is Kind.BAD:
                    bad = exc if isinstance(exc, errors.BubuhError) else errors.BubuhError(
                        errors.EVENT_MALFORMED, f"text the database cannot store: {exc}"[:300])
                    await self._settle([event], [Rejection(event, bad)])
                    return
                if failure.kind is Kind.SUSPECT:
                    suspect += 1
                    if suspect <= self._settings.consumer_suspect_retries:
                        await asyncio.sleep(0.1 * 2 ** (suspect - 1))
                        continue
                    if self._pool is not None and not await healthy(self._pool):
                        raise _Halt(event.offset, "outage", exc) from exc
                await self._crashed(event, exc)
                return
            self._observe([event], time.perf_counter() - started)
            await self._settle([event], rejected)
            return

    def _observe(self, run: Sequence[Event], seconds: float) -> None:
        BATCH_RECORDS.labels(self.name).observe(len(run))
        each = seconds / len(run)
        for topic, n in Counter(e.topic for e in run).items():
            child = HANDLE_SECONDS.labels(self.name, topic)
            for _ in range(n):
                child.observe(each)

    async def _settle(self, run: Sequence[Event], rejected: list[Rejection]) -> None:
        """Count what landed; dead-letter what the handler rejected."""
        bad = {r.event.event_id for r in rejected}
        landed = [e for e in run if e.event_id not in bad]
        self._watch.handled(len(landed))
        for topic, n in Counter(e.topic for e in landed).items():
            CONSUMED.labels(self.name, topic, "handled").inc(n)
        for r in rejected:
            e = r.event
            await self._dead_letter(dead_letter_record(_record_of(e), self._dlq, self.name, r.error.code.code,
                                                       r.error.detail), r.error.code.code, e.offset, r.error.detail)
            CONSUMED.labels(self.name, e.topic, "dead_lettered").inc()

    async def _crashed(self, event: Event, exc: BaseException) -> None:
        attempt = int(event.headers.get(HEADER_CRASH_ATTEMPT, b"0") or 0) + 1
        detail = f"{type(exc).__name__}: {exc}"
        if attempt <= self._settings.consumer_crash_retries and self._pool is not None:
            delay = self._crash_backoff.delay(attempt)
            headers = [(k, v) for k, v in event.headers.items() if k not in (HEADER_CRASH_ATTEMPT, HEADER_RETRY_FOR)]
            headers += [(HEADER_CRASH_ATTEMPT, str(attempt).encode()), (HEADER_RETRY_FOR, self._retry_for)]
            again = Outgoing(event.topic, event.key, event.raw, headers, event.event_id)
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await retry.schedule(conn, again, delay)
            except Exception as exc2:  # noqa: BLE001 - cannot even schedule: wait and redo the record
                failures.observe(self.name, exc2)
                raise _Halt(event.offset, "outage", exc2) from exc2
            CRASH_RETRIES.labels(self.name).inc()
            CONSUMED.labels(self.name, event.topic, "retry_scheduled").inc()
            log.warning("handler crashed; retry scheduled", consumer=self.name, event_id=event.event_id,
                        type=event.type, attempt=attempt, delay_s=round(delay, 2), error=detail[:500])
            return
        log.error("handler crashed; dead-lettered", consumer=self.name, event_id=event.event_id, type=event.type,
                  attempts=attempt, error=detail[:500])
        await self._dead_letter(dead_letter_record(_record_of(event), self._dlq, self.name,
                                                   errors.HANDLER_CRASHED.code, detail),
                                errors.HANDLER_CRASHED.code, event.offset, detail)
        CONSUMED.labels(self.name, event.topic, "dead_lettered").inc()

    async def _dead_letter(self, out: Outgoing, code: str, offset: int, detail: str) -> None:
        counted = code not in self._exempt
        if counted:
            why = self._watch.would_exceed()
            if why is not None:
                raise _Halt(offset, "limit", why)
        try:
            await self._producer.publish(out)
        except Exception as exc:  # noqa: BLE001 - Kafka away: the record is read again once it is back
            failures.observe(self.name, exc)
            raise _Halt(offset, "outage", exc) from exc
        if counted:
            self._watch.dead_lettered()
        DEAD_LETTERED.labels(self.name, code).inc()
        log.warning("dead-lettered", consumer=self.name, reason=code, detail=detail[:300], offset=offset)

    async def _report_lag(self, source: Source) -> None:
        """The lag of each partition this member holds, and none of those it gave up: a member that lost a
        partition in a rebalance kept exporting its last lag for it, so `sum by (consumer)` (the lag
        alerts' rule) counted a backlog another member had drained, for as long as the process lived."""
        held = {(self.name, tp.topic, str(tp.partition)): lag for tp, lag in (await source.lag()).items()}
        for labels, lag in held.items():
            LAG.labels(*labels).set(lag)
            _LAG_SET_BY[labels] = id(self)
        for labels in [labels for labels, loop in _LAG_SET_BY.items() if loop == id(self) and labels not in held]:
            del _LAG_SET_BY[labels]
            LAG.remove(*labels)


def _record_of(event: Event) -> Record:
    return Record(event.topic, event.partition, event.offset, event.key, event.raw, tuple(event.headers.items()))
