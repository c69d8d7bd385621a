"""Several relays on one outbox (a tier's members) publish each key's events in the order written: one leads
(kernel/leadership.py), the others stand by and take over when it ends; each publish holds the outbox's
publish lock, so two never overlap. On real PostgreSQL, with the in-memory broker's producer taking a
random moment to acknowledge, as Kafka does."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import asyncpg

from services.kernel import database, outbox
from services.kernel.events import Outgoing
from services.kernel.metrics import LEADING
from services.kernel.outbox import Relay
from services.kernel.processing.memory import MemoryBroker
from tests.component.leadership_watch import sole_leader

TOPIC = "ordered"
KEYS = [f"k{i}".encode() for i in range(5)]


class AckingProducer:
    """The in-memory producer, acknowledging each batch after a random 0-20 ms; notes who published what."""

    def __init__(self, broker: MemoryBroker, name: str, log: list[tuple[str, bytes, int]]) -> None:
        self._inner = broker.producer()
        self._name = name
        self._log = log

    async def publish(self, record: Outgoing) -> None:
        await self.publish_many([record])

    async def publish_many(self, records: list[Outgoing]) -> None:
        await asyncio.sleep(random.uniform(0, 0.02))
        await self._inner.publish_many(records)
        self._log.extend((self._name, r.key, int(r.value)) for r in records)


class Member:
    def __init__(self, pool, settings, broker: MemoryBroker, name: str, log: list) -> None:
        self.name = name
        self.relay = Relay(pool, AckingProducer(broker, name, log), settings, "component")
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.relay.run(self.stop))

    @property
    def leadership(self):
        return self.relay.leadership

    async def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)


async def _write(pool, sequence: dict[bytes, int], transactions: int, turn: asyncio.Lock) -> None:
    """``transactions`` commits of 1-3 events each, keys at random, each key's values counting up in the
    order of the commits (``turn``: as the row lock of an account orders a service's writes for it)."""
    for _ in range(transactions):
        async with turn, pool.acquire() as conn, conn.transaction():
            records = []
            for _ in range(random.randint(1, 3)):
                key = random.choice(KEYS)
                sequence[key] += 1
                records.append(Outgoing(TOPIC, key, str(sequence[key]).encode(), [],
                                        f"{key.decode()}-{sequence[key]}"))
            await outbox.add(conn, records)
        await asyncio.sleep(random.uniform(0, 0.004))


async def _drained(pool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while await pool.fetchval("SELECT count(*) FROM outbox"):
        assert time.monotonic() < deadline, "the outbox was not drained"
        await asyncio.sleep(0.05)


def _in_order(broker: MemoryBroker, sequence: dict[bytes, int]) -> None:
    """Each key's events on the topic are 1, 2, 3, ... exactly once, in that order."""
    seen: dict[bytes, list[int]] = {k: [] for k in KEYS}
    for r in broker.records(TOPIC):
        seen[r.key].append(int(r.value))
    for key in KEYS:
        assert seen[key] == list(range(1, sequence[key] + 1)), (key, seen[key][:40])


async def test_two_relays_publish_each_keys_events_in_order_and_one_of_them_publishes(pool, settings, broker):
    log: list[tuple[str, bytes, int]] = []
    members = [Member(pool, settings, broker, name, log) for name in ("a", "b")]
    try:
        leader = await sole_leader(members)
        sequence = dict.fromkeys(KEYS, 0)
        turn = asyncio.Lock()
        await asyncio.gather(*(_write(pool, sequence, 60, turn) for _ in range(4)))   # four writers
        await _drained(pool)
        _in_order(broker, sequence)
        assert {name for name, _, _ in log} == {leader.name}       # the standby published nothing
        assert LEADING.labels(leader.leadership.name)._value.get() == 1
    finally:
        for m in members:
            await m.close()


async def test_a_standby_takes_over_when_the_leaders_session_ends_and_order_holds(pool, settings, broker):
    """The leader's lock session ended by the server (as a SIGKILLed member's is): the standby leads
    within moments and publishes what follows, and what the old leader still had in flight comes first."""
    log: list[tuple[str, bytes, int]] = []
    members = [Member(pool, settings, broker, name, log) for name in ("a", "b")]
    try:
        leader = await sole_leader(members)
        standby = next(m for m in members if m is not leader)
        sequence = dict.fromkeys(KEYS, 0)
        turn = asyncio.Lock()
        writing = asyncio.gather(*(_write(pool, sequence, 80, turn) for _ in range(3)))
        await asyncio.sleep(0.2)
        # the fault: the session holding the lead is terminated, as PostgreSQL ends a dead client's
        ended = await pool.fetchval(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = hashtext($1)::bigint",
            leader.leadership.name)
        assert ended is True                                            # the fault happened
        taken = time.monotonic()
        while not standby.leadership.leading.is_set():
            assert time.monotonic() - taken < 3, "the standby did not take over"
            await asyncio.sleep(0.02)
        await writing
        await _drained(pool)
        _in_order(broker, sequence)
        assert {name for name, _, _ in log} == {"a", "b"}               # both published: one, then the other
        assert not leader.leadership.leading.is_set()             # the old leader noticed, and stands by
    finally:
        for m in members:
            await m.close()


async def test_a_publish_waits_for_none_while_another_holds_the_outbox(pool, settings, broker):
    """publish_due takes the outbox's publish lock or publishes nothing: two publishes never overlap."""
    relay = Relay(pool, broker.producer(), settings, "component")
    async with pool.acquire() as conn:
        await outbox.add(conn, [Outgoing(TOPIC, b"k0", b"1", [], "k0-1")])
    holder: asyncpg.Connection
    async with pool.acquire() as holder, holder.transaction():
        assert await holder.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))",
                                     f"outbox publish {settings.schema('component')}")
        started = time.monotonic()
        assert await relay.publish_due() == 0
        assert time.monotonic() - started < 1                           # it did not wait for the lock
        assert broker.records(TOPIC) == []
    assert await relay.publish_due() == 1
    assert [r.value for r in broker.records(TOPIC)] == [b"1"]


async def test_a_woken_relay_lingers_so_commits_close_together_go_out_in_one_publish(pool, settings, broker):
    """Woken by a commit's NOTIFY, the relay waits ``outbox_linger_ms`` before it publishes: five commits
    within the linger go out in one publish (each publish is five round trips whatever it carries), the
    first of them no sooner than the linger after its commit; without a linger, each commit has its own."""
    async def publishes(linger_ms: float) -> tuple[list[int], float, float]:
        sizes: list[int] = []
        first_out = asyncio.get_running_loop().create_future()

        class Counting(AckingProducer):
            async def publish_many(self, records: list[Outgoing]) -> None:
                sizes.append(len(records))
                if not first_out.done():
                    first_out.set_result(time.monotonic())
                await self._inner.publish_many(records)

        relay = Relay(pool, Counting(broker, "a", []), settings.model_copy(update={"outbox_linger_ms": linger_ms,
                                                                              "outbox_idle_poll_s": 5.0}),
                      "component")
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        try:
            await asyncio.wait_for(relay.leadership.leading.wait(), 5)
            # the listener is up (its start wakes the relay once, for what it may have missed, and that linger
            # has passed): each commit's NOTIFY wakes the relay, and nothing else does (the idle poll, which
            # publishes what is due at once, is 5 s away)
            await asyncio.sleep(linger_ms / 1000 + 0.2)
            committed = time.monotonic()
            for i in range(5):
                async with pool.acquire() as conn, conn.transaction():
                    await outbox.add(conn, [Outgoing(TOPIC, b"k", str(i).encode(), [], f"e-{linger_ms}-{i}")])
                await asyncio.sleep(0.015)
            wrote_s = time.monotonic() - committed
            await _drained(pool)
            return sizes, await first_out - committed, wrote_s
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    lingering, waited, wrote_s = await publishes(1000.0)
    assert wrote_s < 1.0                              # the five commits landed within the linger (fsync each)
    assert lingering == [5]                           # one publish carried all five
    assert waited >= 1.0                              # not before the linger had passed
    at_once, _, _ = await publishes(0.0)
    assert len(at_once) >= 4                          # each commit (nearly) its own publish
    assert sum(at_once) == 5


async def test_a_leaders_own_process_wakes_it_without_a_notify_and_others_still_notify(pool, settings, broker):
    """Only an outbox's relay leader listens to its channel, so a commit in the leader's own process wakes it
    with a call, not a NOTIFY (a round trip to PostgreSQL and back through the LISTEN connection). With no
    leader in the process, the commit's NOTIFY goes out as before; a relay that stops leading takes its
    in-process wake-up with it."""
    heard: list[str] = []
    spy = await database.connect(settings)                 # a second listener: it hears every NOTIFY sent
    channel = settings.schema("component") + "_outbox"
    await spy.add_listener(channel, lambda *args: heard.append(args[3]))

    async def commit(n: int) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, [Outgoing(TOPIC, b"k", str(n).encode(), [], f"wake-{n}")])

    async def heard_one() -> None:
        deadline = time.monotonic() + 3
        while not heard:
            assert time.monotonic() < deadline, "no NOTIFY"
            await asyncio.sleep(0.02)

    stop = asyncio.Event()
    task: asyncio.Task | None = None
    try:
        await commit(1)                                    # no relay in this process: a NOTIFY
        await heard_one()
        await pool.execute("DELETE FROM outbox")
        heard.clear()
        relay = Relay(pool, AckingProducer(broker, "a", []), settings.model_copy(update={"outbox_idle_poll_s": 5.0}),
                      "component")
        task = asyncio.create_task(relay.run(stop))
        await asyncio.wait_for(relay.leadership.leading.wait(), 5)
        await asyncio.sleep(0.3)                           # its start's own wake-up and linger have passed
        started = time.monotonic()
        await commit(2)
        await _drained(pool, timeout=3)
        assert time.monotonic() - started < 1.0            # woken (the idle poll is 5 s away)
        await asyncio.sleep(0.2)
        assert heard == []                                 # and no NOTIFY went out for it
        stop.set()
        await asyncio.wait_for(task, 10)
        await commit(3)                                    # the relay stopped: NOTIFY again
        await heard_one()
        await pool.execute("DELETE FROM outbox")
    finally:
        stop.set()                                         # a failed assertion does not leave the relay running
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        await spy.close()
