"""The faust throughput app (services/stamping/throughput.py) against the real broker: windowed
completion rate per tier, accepted rate per channel, poison on the way, and a rebalance between two
members with changelog recovery."""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.contracts.bubuh.v1 import stamp_pb2
from services.kernel import events, topics
from services.kernel.producer import Producer
from services.stamping.throughput import Throughput

WINDOW_S = 30.0


async def _producer(settings) -> Producer:
    p = Producer(settings, client_id="test-throughput")
    await p.start()
    return p


async def _publish_completed(settings, first: int, n: int) -> None:
    """``n`` StampCompleted on stamp.events, request ids from ``first``."""
    p = await _producer(settings)
    try:
        await p.publish_many([_completed(settings, first + i) for i in range(n)])
    finally:
        await p.stop()


def _completed(settings, i: int, *, failed: bool = False) -> events.Outgoing:
    rid = f"req-{i}"
    msg = (stamp_pb2.StampFailed(request_id=rid, channel_id="ch", code="X", permanent=True) if failed
           else stamp_pb2.StampCompleted(request_id=rid, channel_id="ch", sn=f"SN{i}"))
    return events.outgoing(settings.topic(topics.STAMP_EVENTS.name), rid, events.envelope(msg, producer="stamping"))


def _signed(settings, i: int) -> events.Outgoing:
    """A stamp's event on ``stamp.events`` before its end: nothing to count."""
    rid = f"req-{i}"
    msg = stamp_pb2.StampSigned(request_id=rid, channel_id="ch", sn=f"SN{i}")
    return events.outgoing(settings.topic(topics.STAMP_EVENTS.name), rid, events.envelope(msg, producer="stamping"))


class Running:
    """A Throughput app run as a runtime task (``run(stop)``), the way the platform runs it."""

    def __init__(self, settings, window_s: float = WINDOW_S) -> None:
        self.tp = Throughput(settings, window_s=window_s)
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Throughput:
        started = time.monotonic()
        self.task = asyncio.create_task(self.tp.run(self.stop))
        while not self.tp.assigned(topics.STAMP_EVENTS):
            assert not self.task.done(), self.task.exception()
            assert time.monotonic() - started < 60, "faust app not assigned within 60 s"
            await asyncio.sleep(0.05)
        self.startup_s = time.monotonic() - started
        return self.tp

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 30)
        assert self.task.done()
        if not self.task.cancelled():
            assert self.task.exception() is None


async def _until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


async def test_completion_rate_per_tier(settings):
    await topics.ensure(settings)
    n_done, n_failed = 45, 15
    async with Running(settings) as tp:
        assert tp.rates().rate_per_s == 0
        p = await _producer(settings)
        try:
            records = [_completed(settings, i) for i in range(n_done)]
            records += [_completed(settings, n_done + i, failed=True) for i in range(n_failed)]
            poison = events.Outgoing(topic=settings.topic(topics.STAMP_EVENTS.name), key=b"x", value=b"not protobuf")
            await p.publish_many(records[:30] + [poison] + records[30:])
        finally:
            await p.stop()
        expected = n_done + n_failed
        # counted once the second they fell in is complete
        rates = await _until(lambda: (r := tp.rates()).completed == expected and r)
        assert rates, f"count never reached {expected}: {tp.rates()}"
        assert rates.coverage == 1.0 and rates.window_s == WINDOW_S
        # all were published within a second or two: the rate is over the seconds counted, not the window
        assert expected / 3 <= rates.rate_per_s <= expected
        assert tp.malformed == 1
        # the same reading a window later: everything aged out
        later = tp.rates(now=time.time() + WINDOW_S + 2)
        assert later.rate_per_s == 0


async def _changelog_records(settings, tp: Throughput) -> dict[str, int]:
    """Records ever written to each table's changelog (the sum of its partitions' end offsets)."""
    from aiokafka import TopicPartition

    from services.kernel.kafka_clients import build_consumer

    consumer = build_consumer(settings, group_id=None, client_id="test-throughput-ends")
    await consumer.start()
    try:
        out = {}
        for table in tp.app.tables.values():
            name = table.changelog_topic.get_topic_name()
            ends = await consumer.end_offsets([TopicPartition(name, p) for p in range(table.partitions)])
            out[table.name] = sum(ends.values())
        return out
    finally:
        await consumer.stop()


async def test_only_terminal_events_are_written_to_the_changelogs(settings):
    """A stamp puts several events on ``stamp.events``; only its end is counted. The offset that makes a
    re-read harmless (``_fresh``; a re-read after a rebalance: ``test_rebalance_keeps_counts``) was
    written after every record: a changelog record for each event that counted nothing. It is written
    after counted ones only: re-read, an event that counted nothing counts nothing again."""
    await topics.ensure(settings)
    n_signed, n_done = 30, 20
    async with Running(settings) as tp:
        before = await _changelog_records(settings, tp)
        p = await _producer(settings)
        try:
            records = []
            for i in range(n_done):
                records += [_signed(settings, i), _completed(settings, i)]
            records += [_signed(settings, n_done + i) for i in range(n_signed - n_done)]
            await p.publish_many(records)
        finally:
            await p.stop()
        assert await _until(lambda: tp.rates().completed == n_done and tp.read >= n_signed + n_done), \
            (tp.rates(), tp.read)
        after = await _until_changed(settings, tp, before)
    written = {name: after[name] - before[name] for name in after}
    assert written["progress-events"] == n_done, written        # before: one for each of the 50 records
    assert written["completed-per-s"] == n_done, written


async def _until_changed(settings, tp: Throughput, before: dict[str, int]) -> dict[str, int]:
    """The changelogs' record counts once they stop growing (faust sends its changelog records a moment
    after the table changes)."""
    last = None
    for _ in range(50):
        now = await _changelog_records(settings, tp)
        if now == last and now != before:
            return now
        last = now
        await asyncio.sleep(0.2)
    return last


async def test_rebalance_keeps_counts(settings):
    """A second member takes half the partitions and recovers their windows from the changelog."""
    await topics.ensure(settings)
    n, window = 80, 300.0        # a window longer than two rebalances, so nothing ages out meanwhile
    t0 = time.monotonic()
    async with Running(settings, window) as a:
        a_start = time.monotonic() - t0
        await _publish_completed(settings, 0, n)
        assert await _until(lambda: a.rates().completed == n)
        print(f"a started in {a_start:.2f} s")
        t_join = time.monotonic()
        async with Running(settings, window) as b:
            def split():
                pa, pb = a.assigned(topics.STAMP_EVENTS), b.assigned(topics.STAMP_EVENTS)
                return pa and pb and not (pa & pb) and len(pa | pb) == settings.default_partitions

            assert await _until(split, 60), (a.assigned(topics.STAMP_EVENTS), b.assigned(topics.STAMP_EVENTS))

            def recovered_total():
                ra, rb = a.rates(), b.rates()
                # each member extrapolates from its half; together they saw every partition exactly once
                return (ra.coverage + rb.coverage == 1.0
                        and round(ra.completed * ra.coverage + rb.completed * rb.coverage, 6) == n)

            assert await _until(recovered_total, 30), (a.rates(), b.rates())
            print(f"b joined, split and recovered in {time.monotonic() - t_join:.2f} s")
            t_leave = time.monotonic()
        # b left: a takes every partition back and still has the counts
        assert await _until(lambda: a.rates().coverage == 1.0 and a.rates().completed == n, 60), \
            (a.rates(), sorted((k[0], v) for k, v in a.completed.table.data.items()))
        print(f"b left, a whole again in {time.monotonic() - t_leave:.2f} s; test {time.monotonic() - t0:.1f} s")


def _configs(described) -> dict[str, dict[str, str]]:
    return {res[3]: {e[0]: e[1] for e in res[4]} for response in described for res in response.resources}


async def test_changelogs_roll_so_the_broker_can_trim_them(settings):
    """A restart replays the changelogs; the broker trims only closed segments. Each changelog rolls a
    segment every minute or MiB, and one made by an older release (broker defaults: a week, 64 MiB)
    is given those settings at start-up, its other settings (compaction, the window's retention) kept."""
    from aiokafka.admin import NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from services.kernel.kafka_clients import build_admin
    from services.stamping.throughput import CHANGELOG_SEGMENTS

    await topics.ensure(settings)
    old = Throughput(settings, window_s=WINDOW_S)
    made_before = old.progress_events.changelog_topic.get_topic_name()
    admin = build_admin(settings)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(made_before, settings.default_partitions, settings.replication_factor,
                                            topic_configs={"cleanup.policy": "compact"})])
        async def described():   # a topic just created is known to the controller a moment before the broker
            got = _configs(await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, made_before)]))
            return got if got.get(made_before) else None

        before = None
        for _ in range(50):
            if before := await described():
                break
            await asyncio.sleep(0.2)
        assert before, f"{made_before} not described within 10 s"
        assert before[made_before]["segment.ms"] == str(7 * 24 * 3600 * 1000)      # the broker's default
        async with Running(settings) as tp:
            names = sorted(t.changelog_topic.get_topic_name() for t in tp.app.tables.values())
            assert made_before in names and len(names) == 2
            got = _configs(await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names]))
    finally:
        await admin.close()
    for name in names:
        for key, value in CHANGELOG_SEGMENTS.items():
            assert got[name][key] == value, (name, key, got[name][key])
    assert got[made_before]["cleanup.policy"] == "compact"
    windowed = [n for n in names if "per-s" in n]
    assert len(windowed) == 1
    for name in windowed:
        assert got[name]["cleanup.policy"] == "compact,delete"
        assert int(got[name]["retention.ms"]) == int((WINDOW_S + 10) * 1000)


async def test_a_restart_skips_records_too_old_for_any_window(settings):
    """A group far behind (faust commits lazily; an outage) starts past the records older than the window
    plus the buckets kept: they are not read at all, and the fresh ones are counted as before."""
    from aiokafka import TopicPartition

    from services.kernel.kafka_clients import build_consumer, build_producer

    await topics.ensure(settings)
    name = settings.topic(topics.STAMP_EVENTS.name)
    tps = [TopicPartition(name, p) for p in range(settings.default_partitions)]
    old_ms = int((time.time() - WINDOW_S - 120) * 1000)
    producer = build_producer(settings, client_id="test-throughput-old")
    await producer.start()
    try:
        for i in range(200):
            out = _completed(settings, i)
            await producer.send(out.topic, out.value, key=out.key, timestamp_ms=old_ms)
        await producer.flush()
    finally:
        await producer.stop()
    group = Throughput(settings, window_s=WINDOW_S).app.conf.id
    behind = build_consumer(settings, group_id=group, client_id="test-throughput-behind")
    await behind.start()
    try:
        behind.assign(tps)
        await behind.commit({tp: 0 for tp in tps})            # the group is 200 records behind
    finally:
        await behind.stop()
    await _publish_completed(settings, 1000, 5)
    async with Running(settings) as tp:
        assert await _until(lambda: tp.rates().completed == 5), tp.rates()
        assert tp.read == 5, f"read {tp.read} records: the old ones were not skipped"
        assert tp.skipped == 200


async def test_a_crashed_app_is_started_again_and_counts_on(settings):
    """faust's changelog recovery crashed the app in a rebalance (``ValueError: Offset must be a
    positive integer``, with two API members in ``make surge-tier-members``), and the crash ended the
    API process it ran in. The app only feeds ETAs: the task now starts a new app and counts on. The
    crash goes the way faust's own went: its recovery service crashes, through mode's ``crash``."""
    await topics.ensure(settings)
    async with Running(settings) as tp:
        first = tp.app
        await first.tables.recovery.crash(ValueError("Offset must be a positive integer"))
        assert await _until(lambda: first.crash_reason is not None, 10), "the crash was not seen by the app"
        assert await _until(lambda: tp.app is not first and tp.assigned(topics.STAMP_EVENTS), 60), \
            "no new app took the partitions"
        assert tp.restarts == 1
        n = 12
        await _publish_completed(settings, 10_000, n)
        assert await _until(lambda: tp.rates().completed >= n, 30), tp.rates()


async def test_a_restart_recovers_changelogs_that_retention_has_trimmed(settings):
    """faust's recovery seeks each changelog partition to its first offset minus one. Once the broker has
    trimmed the log (the changelogs roll a segment a minute, and windows expire), that offset is out of
    range; with the consumer's reset at ``latest`` the reader jumped to the end and waited for records that
    never came: the windows stayed in recovery, counting nothing, until the process stopped (2-8 minutes
    after each restart that followed load, in the API processes on 5-6 December). Trimmed here as
    retention trims (the log's start moved past its first records, some left), then the app restarts."""
    from aiokafka import TopicPartition
    from aiokafka.admin import RecordsToDelete

    from services.kernel.kafka_clients import build_admin, build_consumer

    await topics.ensure(settings)
    n = 40
    async with Running(settings) as tp:
        changelog = tp.completed.table.changelog_topic.get_topic_name()
        await _publish_completed(settings, 20_000, n)
        assert await _until(lambda: tp.rates().completed >= n, 30), tp.rates()
    tps = [TopicPartition(changelog, i) for i in range(tp.completed.table.partitions)]
    reader = build_consumer(settings, group_id=None, client_id="test-trim")
    admin = build_admin(settings, client_id="test-trim")
    await reader.start()
    await admin.start()
    try:
        ends = await reader.end_offsets(tps)
        trim = {t: RecordsToDelete(before_offset=ends[t] - 1) for t in tps if ends[t] >= 2}
        assert trim, f"no changelog partition holds two records: {ends}"
        await admin.delete_records(trim)
        starts = await reader.beginning_offsets(list(trim))
        assert all(starts[t] == ends[t] - 1 for t in trim), (starts, ends)       # the log's start moved
    finally:
        await reader.stop()
        await admin.close()
    async with Running(settings) as again:
        recovery = again.app.tables.recovery
        assert await _until(lambda: recovery.completed.is_set() and not recovery.in_recovery, 30), \
            "the changelog recovery did not finish"
        m = 12
        await _publish_completed(settings, 30_000, m)
        assert await _until(lambda: again.rates().completed >= m, 30), again.rates()    # counting again
