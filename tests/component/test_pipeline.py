"""The pipeline's failure policy (``processing/pipeline.py``'s docstring), on the in-memory broker
against real PostgreSQL: what lands, what is retried, what is dead-lettered, what is committed.

A tiny service stands in for a real one: it applies ``PurchaseConfirmed`` events as rows of
``effects`` through the inbox; ``Rig.fail`` makes its handler fail for chosen events the way a
database or a bug would. Rows of ``effects`` are never unique by design, so anything applied
twice shows up as a second row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.contracts.bubuh.v1 import purchase_pb2
from services.kernel import errors, events, inbox
from services.kernel.events import Event, Outgoing
from services.kernel.outbox import Relay
from services.kernel.processing.deadletter import DLQ_MARKER, DLQ_REASON, DLQ_SOURCE, DlqLimit
from services.kernel.processing.handler import PerRecord, Rejection, Transactional
from services.kernel.processing.memory import MemoryBroker, MemorySource
from services.kernel.processing.pipeline import HEADER_CRASH_ATTEMPT, HEADER_RETRY_FOR, ConsumerLoop
from services.kernel.processing.source import TopicPartition

EFFECTS = """
CREATE TABLE effects (event_id text NOT NULL, quantity bigint NOT NULL,
                      txid bigint NOT NULL DEFAULT txid_current());
"""

Fault = Callable[[int], BaseException | None]     # attempt number (1 = first) -> what to raise, if anything


def always(exc: Callable[[], BaseException]) -> Fault:
    return lambda _attempt: exc()


def first(n: int, exc: Callable[[], BaseException]) -> Fault:
    return lambda attempt: exc() if attempt <= n else None


def until(gate: asyncio.Event, exc: Callable[[], BaseException]) -> Fault:
    return lambda _attempt: None if gate.is_set() else exc()


@dataclass
class Member:
    loop: ConsumerLoop
    source: MemorySource
    stop: asyncio.Event
    task: asyncio.Task

    async def halt(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)

    async def kill(self) -> None:
        """SIGKILL: the open transaction is abandoned and the member leaves without committing."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.source.crash()


class Rig:
    def __init__(self, settings, pool: asyncpg.Pool, broker: MemoryBroker, *, per_record: bool = False,
                 concurrency: int = 1, chain_key: Callable[[Event], object] | None = None) -> None:
        self.settings, self.pool, self.broker = settings, pool, broker
        self.name = f"rig-{uuid.uuid4().hex[:6]}"       # metrics are per process: a name per test
        self.topic = settings.topic("rig.events")
        self.dlq = settings.topic("rig.dead-letter")
        self.group = settings.group(self.name)
        self.per_record = per_record or concurrency > 1
        self.concurrency, self.chain_key = concurrency, chain_key
        self.producer = broker.producer()
        self.faults: dict[str, Fault] = {}
        self.attempts: Counter[str] = Counter()       # handler calls that reached the event, per event id
        self.delivered: Counter[str] = Counter()      # times the pipeline handed the event to the handler
        self.hold: asyncio.Event | None = None        # while set up and not released, first deliveries wait
        self.members: list[Member] = []
        self._stop = asyncio.Event()
        self._relay: asyncio.Task | None = None
        broker.create_topic(self.topic)

    async def setup(self) -> Rig:
        await self.pool.execute(EFFECTS)
        return self

    # --- the tiny service ------------------------------------------------------------------------
    def _fault(self, event: Event) -> None:
        self.attempts[event.event_id] += 1
        fault = self.faults.get(event.event_id)
        exc = fault(self.attempts[event.event_id]) if fault else None
        if exc is not None:
            raise exc

    async def _effect(self, conn: asyncpg.Connection, event: Event) -> None:
        if self.hold is not None and self.attempts[event.event_id] == 1:
            await self.hold.wait()
        await conn.execute("INSERT INTO effects (event_id, quantity) VALUES ($1, $2)",
                           event.event_id, event.payload.quantity)

    async def apply(self, conn: asyncpg.Connection, batch: list[Event]) -> None:
        for event in batch:
            self._fault(event)
            await self._effect(conn, event)

    async def apply_one(self, event: Event) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if not await inbox.claim(conn, self.name, event.event_id):
                return
            self._fault(event)
            await self._effect(conn, event)

    def handler(self):
        inner = (PerRecord(self.apply_one, concurrency=self.concurrency, chain_key=self.chain_key) if self.per_record
                 else Transactional(self.pool, self.name, self.apply))
        rig = self

        class Counted:
            batched = inner.batched

            def __init__(self) -> None:
                self.concurrency = getattr(inner, "concurrency", 1)
                self.chain_key = getattr(inner, "chain_key", None)

            async def process(self, batch):
                rig.delivered.update(e.event_id for e in batch)
                return await inner.process(batch)
        return Counted()

    # --- members, records, relay -----------------------------------------------------------------
    def member(self, *, limit: DlqLimit | None = None, exempt: frozenset[str] = frozenset(),
               settings=None, max_batch: int = 100, name: str | None = None) -> Member:
        """A member of the rig's group; ``name``: its consumer name in metrics (another process's series)."""
        source = self.broker.source(self.group, [self.topic], max_batch=max_batch)
        loop = ConsumerLoop(settings or self.settings, self.producer, name=name or self.name, topics=[self.topic],
                            handler=self.handler(), dead_letter_topic=self.dlq, pool=self.pool, max_batch=max_batch,
                            group_id=self.group, source=source, limit=limit, limit_exempt=exempt)
        stop = asyncio.Event()
        member = Member(loop, source, stop, asyncio.create_task(loop.run(stop)))
        self.members.append(member)
        return member

    def relay(self) -> None:
        """Publish the outbox (so durable retries that fall due) through the memory producer."""
        self._relay = asyncio.create_task(Relay(self.pool, self.producer, self.settings, "component").run(self._stop))

    async def close(self) -> None:
        self._stop.set()
        if self.hold is not None:
            self.hold.set()
        for m in self.members:
            m.stop.set()
        for task in [m.task for m in self.members] + ([self._relay] if self._relay else []):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 10)

    def key_on(self, partition: int, n: int = 0) -> bytes:
        """The ``n``-th key the producer sends to ``partition``."""
        found = (f"k{i}".encode() for i in range(10_000))
        matches = (k for k in found if self.broker.partition_for(self.topic, k) == partition)
        for _ in range(n):
            next(matches)
        return next(matches)

    def record(self, order: int, key: bytes) -> Outgoing:
        msg = purchase_pb2.PurchaseConfirmed(purchase_id=f"p{order}", channel_order_id=f"o{order}", quantity=order)
        return events.outgoing(self.topic, key, events.envelope(msg, producer="tests"))

    async def publish(self, *orders: int, key: bytes) -> list[Outgoing]:
        out = [self.record(o, key) for o in orders]
        await self.producer.publish_many(out)
        return out

    def tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.topic, partition)

    def offset_of(self, event_id: str) -> int:
        return next(r.offset for r in self.broker.records(self.topic)
                    if r.value and dict(r.headers).get(events.HEADER_EVENT_ID) == event_id.encode()
                    and HEADER_RETRY_FOR not in dict(r.headers))

    # --- what happened -----------------------------------------------------------------------------
    async def applied(self) -> list[str]:
        return [r["event_id"] for r in await self.pool.fetch("SELECT event_id FROM effects")]

    def dead_letters(self) -> list[tuple[dict[str, bytes], bytes | None]]:
        return [(dict(r.headers), r.value) for r in self.broker.records(self.dlq)]

    def retries(self) -> list[dict[str, bytes]]:
        return [dict(r.headers) for r in self.broker.records(self.topic) if HEADER_RETRY_FOR in dict(r.headers)]

    def all_committed(self) -> bool:
        ends = self.broker.end_offsets(self.topic)
        return all(self.broker.committed(self.group, tp) == end for tp, end in ends.items() if end)


async def eventually(probe: Callable[[], Awaitable[object] | object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def rig(settings, pool, broker):
    r = await Rig(settings, pool, broker).setup()
    yield r
    await r.close()


@pytest.fixture(params=["transactional", "per_record"])
async def any_rig(request, settings, pool, broker):
    r = await Rig(settings, pool, broker, per_record=request.param == "per_record").setup()
    yield r
    await r.close()


# --- batches, the inbox, redelivery -----------------------------------------------------------------

async def test_a_polls_partitions_are_one_transaction_and_the_inbox_records_where_each_event_was_read(rig):
    k0, k1 = rig.key_on(0), rig.key_on(1)
    await rig.publish(*range(1, 7), key=k0)
    await rig.publish(*range(7, 13), key=k1)
    rig.member()
    await eventually(lambda: rig.all_committed(), what="both partitions committed")
    rows = await rig.pool.fetch('SELECT i.event_id, i.topic, i."partition", i."offset", e.txid FROM inbox i '
                                "JOIN effects e USING (event_id) WHERE i.consumer = $1", rig.name)
    assert len(rows) == 12
    where = {(r.topic, r.partition, r.offset): dict(r.headers)[events.HEADER_EVENT_ID].decode()
             for r in rig.broker.records(rig.topic)}
    assert {(r["topic"], r["partition"], r["offset"]): r["event_id"] for r in rows} == where
    txids = {p: {r["txid"] for r in rows if r["partition"] == p} for p in (0, 1)}
    assert txids[0] == txids[1] and len(txids[0]) == 1, f"one poll took several transactions: {txids}"
    assert rig.delivered == Counter({e: 1 for e in where.values()}), "handed over more than once"


async def test_a_polls_batch_takes_the_topics_in_the_consumers_order_each_partition_in_order(settings, pool, broker):
    """The quota ledger names credits and outcomes before reservations: a reservation sees the units
    they free in the same poll. The batch follows the ``topics`` list, not the order of the fetch."""
    rig = await Rig(settings, pool, broker).setup()
    later = settings.topic("rig.first")
    broker.create_topic(later)
    batches: list[list[tuple[str, int, int]]] = []

    async def apply(conn, batch):
        batches.append([(e.topic, e.partition, e.payload.quantity) for e in batch])
        await rig.apply(conn, batch)

    source = broker.source(rig.group, [rig.topic, later], max_batch=100)
    loop = ConsumerLoop(settings, rig.producer, name=rig.name, topics=[later, rig.topic],
                        handler=Transactional(pool, rig.name, apply), dead_letter_topic=rig.dlq, pool=pool,
                        group_id=rig.group, source=source)
    try:
        await rig.publish(1, 2, key=rig.key_on(1))
        await rig.publish(3, key=rig.key_on(0))
        first = [dataclasses.replace(rig.record(q, rig.key_on(2)), topic=later) for q in (4, 5)]
        await rig.producer.publish_many(first)
        stop = asyncio.Event()
        rig.members.append(Member(loop, source, stop, asyncio.create_task(loop.run(stop))))
        await eventually(lambda: sum(map(len, batches)) == 5, what="five records applied")
        assert len(batches) == 1, f"one poll, several batches: {batches}"
        part = broker.partition_for(later, rig.key_on(2))
        assert batches[0] == [(later, part, 4), (later, part, 5), (rig.topic, 0, 3), (rig.topic, 1, 1),
                              (rig.topic, 1, 2)]
    finally:
        await rig.close()


async def test_a_poll_batch_that_fails_is_redone_partition_by_partition_and_only_its_partition_waits(rig):
    """A bug in one record's effect fails the poll's batch: the other partition lands as its own batch,
    and the failing one goes the record-by-record way (its neighbours land, the record is retried)."""
    healthy = await rig.publish(1, 2, key=rig.key_on(1))
    sick = await rig.publish(3, 4, key=rig.key_on(0))
    rig.faults[sick[0].event_id] = always(lambda: ZeroDivisionError("a bug"))
    rig.member()
    await eventually(lambda: rig.all_committed(), what="both partitions committed")
    applied = await rig.applied()
    assert sorted(applied) == sorted(r.event_id for r in healthy + [sick[1]]), "lost or applied twice"
    assert rig.delivered[healthy[0].event_id] == 2, "not redone on its own after the poll's batch failed"
    assert rig.delivered[sick[1].event_id] == 3, "not redone record by record after its partition's batch"
    # counted each time it failed: in the poll's batch, its partition's batch, and on its own
    assert metric("bubuh_failures_total", component=rig.name, kind="crash", sqlstate="") == 3
    assert await rig.pool.fetchval("SELECT count(*) FROM outbox") == 1, "the crash was not scheduled for a retry"
    assert rig.dead_letters() == []


async def test_a_record_the_handler_rejects_in_a_polls_batch_is_dead_lettered_from_its_own_partition(rig):
    """A handler's rejection (a forgery, say) in a poll's batch: the rest of the poll lands in the one
    transaction, the rejected record is dead-lettered once, with where it was read, and not claimed."""
    batches: list[int] = []

    async def apply(conn, batch):
        batches.append(len(batch))
        keep = [e for e in batch if e.payload.quantity != 12]
        await rig.apply(conn, keep)
        return [Rejection(e, errors.BubuhError(errors.EVENT_MALFORMED, "rejected by the handler"))
                for e in batch if e.payload.quantity == 12]

    sent = await rig.publish(10, 11, key=rig.key_on(0)) + await rig.publish(12, 13, key=rig.key_on(1))
    source = rig.broker.source(rig.group, [rig.topic], max_batch=100)
    loop = ConsumerLoop(rig.settings, rig.producer, name=rig.name, topics=[rig.topic],
                        handler=Transactional(rig.pool, rig.name, apply), dead_letter_topic=rig.dlq,
                        pool=rig.pool, group_id=rig.group, source=source)
    stop = asyncio.Event()
    rig.members.append(Member(loop, source, stop, asyncio.create_task(loop.run(stop))))
    await eventually(rig.all_committed, what="every record committed")
    assert batches == [4], f"not one batch for the poll: {batches}"
    assert sorted(await rig.applied()) == sorted(r.event_id for r in sent if r is not sent[2])
    ((dead, value),) = rig.dead_letters()
    assert value == sent[2].value and dead[DLQ_REASON] == errors.EVENT_MALFORMED.code.encode()
    assert dead[DLQ_SOURCE] == f"{rig.topic}/1/{rig.offset_of(sent[2].event_id)}".encode()
    claimed = {r["event_id"] for r in await rig.pool.fetch("SELECT event_id FROM inbox WHERE consumer = $1", rig.name)}
    assert sent[2].event_id not in claimed and len(claimed) == 3


async def test_redelivery_after_a_rebalance_applies_nothing_twice(rig):
    rig.hold = asyncio.Event()          # the first member's transactions stay open ...
    sent = []
    for p in range(4):
        sent += await rig.publish(*range(10 * p, 10 * p + 5), key=rig.key_on(p))
    first = rig.member()
    await eventually(lambda: len(rig.delivered) == 20, what="all delivered to the first member")
    second = rig.member()               # ... while a second member joins and re-reads half the partitions
    await eventually(lambda: second.source.assignment(), what="the second member joined")
    assert len(first.source.assignment()) == 2
    await asyncio.sleep(0.2)            # the second member's claims wait on the first's open transactions
    rig.hold.set()
    await eventually(lambda: rig.all_committed(), what="everything committed")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in sent), "an event applied twice, or lost"
    assert any(n > 1 for n in rig.delivered.values()), "nothing was delivered again: the test proves nothing"


async def test_a_member_killed_mid_batch_loses_nothing_and_the_survivor_applies_nothing_twice(rig):
    rig.hold = asyncio.Event()
    sent = []
    for p in range(4):
        sent += await rig.publish(*range(10 * p, 10 * p + 5), key=rig.key_on(p))
    doomed = rig.member()
    await eventually(lambda: len(rig.delivered) == 20, what="all delivered to the first member")
    survivor = rig.member()
    await eventually(lambda: survivor.source.assignment(), what="the survivor joined")
    await doomed.kill()                 # its open transactions roll back; nothing of it was committed
    assert survivor.source.assignment() == set(rig.broker.partitions_of(rig.topic))
    rig.hold.set()
    await eventually(lambda: rig.all_committed(), what="the survivor committed everything")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in sent)


# --- bad input ------------------------------------------------------------------------------------

async def test_an_undecodable_record_and_stretch_are_dead_lettered_and_the_records_behind_them_land(rig):
    key = rig.key_on(2)
    good = await rig.publish(1, key=key)
    await rig.producer.publish(Outgoing(rig.topic, key, b"\x00not an envelope"))
    start, end = rig.broker.inject_undecodable(rig.topic, 2, 3, "UnsupportedCodecError: zstd")
    good += await rig.publish(2, 3, key=key)
    rig.member()
    await eventually(lambda: rig.all_committed(), what="partition 2 committed to its end")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in good)
    dead = rig.dead_letters()            # on two partitions of the dead-letter topic: no order between them
    ((malformed, value),) = [d for d in dead if DLQ_MARKER not in d[0]]
    ((marker, marker_value),) = [d for d in dead if DLQ_MARKER in d[0]]
    assert malformed[DLQ_REASON] == errors.EVENT_MALFORMED.code.encode()
    assert malformed[DLQ_SOURCE] == f"{rig.topic}/2/1".encode()
    assert value == b"\x00not an envelope"
    assert marker[DLQ_MARKER] == b"1"
    assert marker[DLQ_REASON] == b"EVENT_UNDECODABLE"
    assert marker[DLQ_SOURCE] == f"{rig.topic}/2/{start}-{end - 1}".encode()
    assert not marker_value


async def test_a_poll_with_a_record_to_dead_letter_decodes_each_record_once(rig, monkeypatch):
    """A poll of two partitions goes to the batched handler as one batch unless a partition holds a record
    to dead-letter; that partition then takes its own path. It was decoded up to that record for the
    batch, then all over again on its own path: every record before a poison one, twice."""
    from services.kernel.processing import pipeline

    decoded: Counter[bytes] = Counter()
    real = pipeline.events.decode

    def counting(value, *a, **kw):
        decoded[bytes(value or b"")] += 1
        return real(value, *a, **kw)

    monkeypatch.setattr(pipeline.events, "decode", counting)
    k0, k1 = rig.key_on(0), rig.key_on(1)
    good = await rig.publish(1, 2, 3, key=k0)
    await rig.producer.publish(Outgoing(rig.topic, k0, b"\x00not an envelope"))
    good += await rig.publish(4, key=k0)
    good += await rig.publish(5, 6, key=k1)
    rig.member()
    await eventually(lambda: rig.all_committed(), what="both partitions committed")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in good)
    assert len(rig.dead_letters()) == 1
    ours = {r.value: decoded[r.value] for r in good}
    assert set(ours.values()) == {1}, f"decoded more than once: {sorted(ours.values())}"


async def test_a_stretch_behind_a_record_waiting_out_an_outage_is_dead_lettered_once_after_it(rig):
    healed = asyncio.Event()
    key = rig.key_on(1)
    before = await rig.publish(1, 2, key=key)
    rig.broker.inject_undecodable(rig.topic, 1, 2, "CorruptRecordException")
    after = await rig.publish(3, key=key)
    rig.faults[before[1].event_id] = until(healed, lambda: asyncpg.exceptions.ReadOnlySQLTransactionError("ro"))
    rig.member()
    await eventually(lambda: rig.attempts[before[1].event_id] >= 2, what="the record before the stretch waits")
    assert rig.dead_letters() == [], "the stretch was dead-lettered before the records in front of it"
    healed.set()
    await eventually(lambda: rig.all_committed(), what="committed past the stretch")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in before + after)
    ((marker, _),) = rig.dead_letters()
    assert marker[DLQ_SOURCE] == f"{rig.topic}/1/2-3".encode()


# --- a handler that raises ------------------------------------------------------------------------

async def test_a_crashing_record_lets_its_batch_land_then_is_retried_durably_then_dead_lettered(any_rig):
    rig = any_rig
    sent = await rig.publish(1, 2, 3, 4, 5, key=rig.key_on(1))
    bad = sent[2]
    rig.faults[bad.event_id] = always(lambda: RuntimeError("a bug"))
    rig.member()
    await eventually(lambda: rig.all_committed(), what="the batch committed past the crashing record")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in sent if r is not bad)
    (row,) = await rig.pool.fetch("SELECT event_id, topic, headers FROM outbox")
    headers = dict(json.loads(row["headers"]))
    assert (row["event_id"], row["topic"]) == (bad.event_id, rig.topic)
    assert headers[HEADER_RETRY_FOR] == rig.name and headers[HEADER_CRASH_ATTEMPT] == "1"
    assert rig.dead_letters() == []

    rig.relay()
    await eventually(lambda: rig.dead_letters(), what="dead-lettered after the retries")
    assert [h[HEADER_CRASH_ATTEMPT] for h in rig.retries()] == [b"1", b"2"]   # consumer_crash_retries = 2
    ((dead, value),) = rig.dead_letters()
    assert dead[DLQ_REASON] == errors.HANDLER_CRASHED.code.encode()
    assert value == bad.value, "the dead letter is not the original record"
    await eventually(lambda: rig.all_committed(), what="the retries committed")
    # the relay deletes a row after the producer acknowledged it, which may be after the consumer read it
    await eventually(lambda: rig.pool.fetchval("SELECT count(*) = 0 FROM outbox"), what="the outbox drained")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in sent if r is not bad)


@pytest.mark.parametrize("outage", [
    lambda: asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    lambda: asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
], ids=["read_only", "connection_lost"])
async def test_an_outage_pauses_only_that_partition_and_resumes_the_same_record(any_rig, outage):
    rig = any_rig
    healed = asyncio.Event()
    stuck = await rig.publish(1, 2, 3, key=rig.key_on(0))
    other = await rig.publish(4, 5, 6, key=rig.key_on(3))
    victim = stuck[1]
    rig.faults[victim.event_id] = until(healed, outage)
    rig.member()
    await eventually(lambda: rig.broker.committed(rig.group, rig.tp(3)) == 3, what="the healthy partition")
    await asyncio.sleep(1.0)
    assert rig.attempts[victim.event_id] <= 8, "not paused: retried in a hot loop"
    applied = await rig.applied()
    assert victim.event_id not in applied and stuck[2].event_id not in applied
    assert {r.event_id for r in other} <= set(applied)
    # nothing past the failing record is committed (a batch is rewound to its first record)
    assert rig.broker.committed(rig.group, rig.tp(0)) == (rig.offset_of(victim.event_id) if rig.per_record else None)
    healed.set()
    await eventually(lambda: rig.all_committed(), what="resumed after the outage")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in stuck + other)
    assert rig.dead_letters() == [] and rig.retries() == []
    if not rig.per_record:
        where = await rig.pool.fetchval('SELECT "offset" FROM inbox WHERE event_id = $1', victim.event_id)
        assert where == rig.offset_of(victim.event_id), "not the same record"
    assert metric("bubuh_consumer_outage_pauses_total", consumer=rig.name) >= 1


async def test_a_member_stops_exporting_the_lag_of_a_partition_it_gave_up_in_a_rebalance(rig):
    """Partition 1 is held up by an outage (its lag stays above 0); a second member joins and takes it.
    The first member's series for it is gone, the second's carries the lag: before, the first kept its
    last value for as long as it lived, and the lag alerts' `sum by (consumer)` counted both."""
    healed = asyncio.Event()
    stuck = await rig.publish(1, 2, 3, key=rig.key_on(1))
    rig.faults[stuck[0].event_id] = until(healed, lambda: asyncpg.exceptions.ReadOnlySQLTransactionError("read-only"))
    first = rig.member()
    lag = "bubuh_consumer_lag_records"

    def series(name: str) -> float | None:
        return REGISTRY.get_sample_value(lag, {"consumer": name, "topic": rig.topic, "partition": "1"})

    await eventually(lambda: (series(rig.name) or 0) > 0, what="the first member reports partition 1's lag")
    second = rig.member(name=f"{rig.name}-b")         # another process's series, as in production
    await eventually(lambda: rig.tp(1) in second.source.assignment(), what="the second member took partition 1")
    assert rig.tp(1) not in first.source.assignment()
    await eventually(lambda: (series(f"{rig.name}-b") or 0) > 0, what="the second member reports its lag")
    await eventually(lambda: series(rig.name) is None, timeout=3.0,
                     what="the first member's series for the partition it gave up removed")
    assert REGISTRY.get_sample_value(lag, {"consumer": rig.name, "topic": rig.topic, "partition": "0"}) is not None, \
        "the first member's own partitions are still reported"
    healed.set()
    await eventually(lambda: rig.all_committed(), what="resumed after the outage")
    await eventually(lambda: series(f"{rig.name}-b") == 0, what="the drained partition reads 0")


async def test_a_serialization_failure_is_retried_in_place(rig):
    sent = await rig.publish(1, 2, 3, key=rig.key_on(1))
    rig.faults[sent[1].event_id] = first(2, lambda: asyncpg.exceptions.SerializationError("could not serialize"))
    rig.member()
    await eventually(lambda: rig.all_committed(), what="committed")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in sent)
    assert rig.attempts[sent[1].event_id] == 3
    txids = {r["txid"] for r in await rig.pool.fetch("SELECT txid FROM effects")}
    assert len(txids) == 1, "the batch was not retried as a whole (in place)"
    assert metric("bubuh_consumer_outage_pauses_total", consumer=rig.name) == 0
    assert rig.dead_letters() == [] and rig.retries() == []


async def test_a_query_cancel_that_persists_on_a_healthy_database_is_a_crash(rig):
    settings = rig.settings.model_copy(update={"consumer_crash_retries": 0, "consumer_suspect_retries": 2})
    sent = await rig.publish(1, 2, 3, key=rig.key_on(2))
    bad = sent[0]
    rig.faults[bad.event_id] = always(lambda: asyncpg.exceptions.QueryCanceledError("canceling statement due to "
                                                                                    "statement timeout"))
    rig.member(settings=settings)
    await eventually(lambda: rig.all_committed(), what="committed past the cancelled record")
    ((dead, _),) = rig.dead_letters()
    assert dead[DLQ_REASON] == errors.HANDLER_CRASHED.code.encode()
    assert b"QueryCanceledError" in dead["bubuh-dlq-detail"]
    assert sorted(await rig.applied()) == sorted(r.event_id for r in sent[1:])
    # the batch try, then the record alone: once and twice more in place (suspect retries), then the crash
    assert rig.attempts[bad.event_id] == 1 + 1 + 2


async def test_a_query_cancel_while_the_database_is_unhealthy_is_waited_out(rig, monkeypatch):
    from services.kernel.processing import pipeline
    healed = asyncio.Event()

    async def probe(_pool):
        return False        # unhealthy all along: once the query passes, nobody asks (no race with healing)
    monkeypatch.setattr(pipeline, "healthy", probe)
    sent = await rig.publish(1, key=rig.key_on(0))
    rig.faults[sent[0].event_id] = until(healed, lambda: asyncpg.exceptions.QueryCanceledError("canceled"))
    rig.member()
    await eventually(lambda: rig.attempts[sent[0].event_id] >= 4, what="a few attempts")
    assert rig.dead_letters() == [] and rig.retries() == []
    healed.set()
    await eventually(lambda: rig.all_committed(), what="applied once the database is back")
    assert await rig.applied() == [sent[0].event_id]


# --- the dead-letter limit ----------------------------------------------------------------------------

async def _poison_stream(rig: Rig) -> tuple[list[Outgoing], list[Outgoing], list[Outgoing]]:
    key = rig.key_on(1)
    head = await rig.publish(1, key=key)
    poison = [Outgoing(rig.topic, key, b"\x00bad %d" % i) for i in range(5)]
    await rig.producer.publish_many(poison)
    tail = await rig.publish(2, key=key)
    return head, poison, tail


async def test_the_dead_letter_limit_stops_the_consumer_and_commits_nothing_past_it(rig):
    head, _poison, _tail = await _poison_stream(rig)
    member = rig.member(limit=DlqLimit(max_consecutive=3, max_ratio=0))
    await asyncio.wait_for(member.task, 10)      # it stops by itself
    assert member.loop.stopped_reason and "4 dead letters in a row" in member.loop.stopped_reason
    assert len(rig.dead_letters()) == 3
    assert rig.broker.committed(rig.group, rig.tp(1)) == 1 + 3, "committed past the record that stopped it"
    assert await rig.applied() == [head[0].event_id]
    assert metric("bubuh_consumer_stopped", consumer=rig.name, reason="dead_letter_limit") == 1


async def test_exempted_codes_do_not_count_towards_the_dead_letter_limit(rig):
    head, poison, tail = await _poison_stream(rig)
    member = rig.member(limit=DlqLimit(max_consecutive=3, max_ratio=0),
                        exempt=frozenset({errors.EVENT_MALFORMED.code}))
    await eventually(lambda: rig.all_committed(), what="committed to the end")
    assert member.loop.stopped_reason is None and not member.task.done()
    assert [v for _, v in rig.dead_letters()] == [p.value for p in poison]
    assert sorted(await rig.applied()) == sorted(r.event_id for r in head + tail)


async def test_event_types_the_handler_does_not_act_on_are_skipped_unread_and_unclaimed(rig):
    wanted = frozenset({events.type_name(purchase_pb2.PurchaseConfirmed)})
    source = rig.broker.source(rig.group, [rig.topic], max_batch=100)
    loop = ConsumerLoop(rig.settings, rig.producer, name=rig.name, topics=[rig.topic],
                        handler=Transactional(rig.pool, rig.name, rig.apply, wanted), dead_letter_topic=rig.dlq,
                        pool=rig.pool, group_id=rig.group, source=source)
    stop = asyncio.Event()
    rig.members.append(Member(loop, source, stop, asyncio.create_task(loop.run(stop))))
    key = rig.key_on(0)
    other = purchase_pb2.PurchaseRejected(purchase_id="p-x", code="AMOUNT_MISMATCH")   # no quantity: applying it fails
    skipped = events.outgoing(rig.topic, key, events.envelope(other, producer="tests"))
    kept = await rig.publish(1, key=key)
    await rig.producer.publish_many([skipped])
    kept += await rig.publish(2, key=key)
    await eventually(rig.all_committed, what="every record committed")
    assert sorted(await rig.applied()) == sorted(r.event_id for r in kept)
    claimed = {r["event_id"] for r in await rig.pool.fetch("SELECT event_id FROM inbox WHERE consumer = $1", rig.name)}
    assert claimed == {r.event_id for r in kept}             # no inbox row for the skipped type
    assert rig.dead_letters() == []
    assert metric("bubuh_consumer_records_total", consumer=rig.name, topic=rig.topic, outcome="skipped") == 1


# --- chains: records of different chains at once (PerRecord concurrency, the stamping worker's) ----------

def _chain_of(event: Event) -> int:
    return event.payload.quantity % 3


async def test_records_of_different_chains_run_at_once_each_chain_in_order(settings, pool, broker):
    rig = await Rig(settings, pool, broker, concurrency=4, chain_key=_chain_of).setup()
    running, peak, order = set(), [0], {0: [], 1: [], 2: []}
    plain_effect = rig._effect

    async def slow_effect(conn, event):
        running.add(event.event_id)
        peak[0] = max(peak[0], len(running))
        order[_chain_of(event)].append(event.payload.quantity)
        await asyncio.sleep(0.05)
        await plain_effect(conn, event)
        running.discard(event.event_id)

    rig._effect = slow_effect
    try:
        sent = await rig.publish(*range(1, 13), key=rig.key_on(0))       # one partition, three chains
        rig.member()
        await eventually(lambda: rig.all_committed(), what="committed")
        assert sorted(await rig.applied()) == sorted(r.event_id for r in sent)   # each once
        assert peak[0] == 3, f"{peak[0]} at once: three chains should run side by side"
        assert order == {c: sorted(q for q in range(1, 13) if q % 3 == c) for c in range(3)}, order
    finally:
        await rig.close()


async def test_the_concurrency_bounds_the_records_in_the_handler_across_partitions(settings, pool, broker):
    rig = await Rig(settings, pool, broker, concurrency=2, chain_key=lambda e: e.event_id).setup()
    running, peak = set(), [0]
    plain_effect = rig._effect

    async def slow_effect(conn, event):
        running.add(event.event_id)
        peak[0] = max(peak[0], len(running))
        await asyncio.sleep(0.05)
        await plain_effect(conn, event)
        running.discard(event.event_id)

    rig._effect = slow_effect
    try:
        sent = [r for p in range(4) for r in await rig.publish(*range(10 * p, 10 * p + 5), key=rig.key_on(p))]
        rig.member()
        await eventually(lambda: rig.all_committed(), what="committed")
        assert sorted(await rig.applied()) == sorted(r.event_id for r in sent)
        assert peak[0] == 2, f"{peak[0]} records in the handler at once, the limit is 2"
    finally:
        await rig.close()


async def test_an_outage_in_one_chain_rewinds_to_it_and_what_ran_past_it_is_not_applied_twice(settings, pool, broker):
    def outage():
        return asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction")

    rig = await Rig(settings, pool, broker, concurrency=4, chain_key=_chain_of).setup()
    try:
        healed = asyncio.Event()
        sent = await rig.publish(*range(1, 10), key=rig.key_on(2))
        victim = sent[1]                       # quantity 2: chain 2, the second record of the partition
        rig.faults[victim.event_id] = until(healed, outage)
        rig.member()
        others = [r.event_id for q, r in enumerate(sent, start=1) if q % 3 != 2]
        behind = [sent[4].event_id, sent[7].event_id]          # quantities 5 and 8: chain 2, after the victim
        await asyncio.sleep(1.0)
        applied = await rig.applied()
        assert victim.event_id not in applied and not set(behind) & set(applied), "ran past it in its own chain"
        assert set(others) <= set(applied), "the other chains waited for the outage"
        assert rig.broker.committed(rig.group, rig.tp(2)) == rig.offset_of(victim.event_id), \
            "committed past the record waiting out the outage"
        healed.set()
        await eventually(lambda: rig.all_committed(), what="resumed after the outage")
        assert sorted(await rig.applied()) == sorted(r.event_id for r in sent), "lost or applied twice"
        assert rig.dead_letters() == [] and rig.retries() == []
        past = [e for e in others if rig.offset_of(e) > rig.offset_of(victim.event_id)]
        assert past and all(rig.delivered[e] >= 2 for e in past), \
            "the records past the outage were not handed over again: the rewind was not seen"
    finally:
        await rig.close()
