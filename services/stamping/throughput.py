"""Windowed throughput from the event stream (faust-streaming): the stateful part behind queue ETAs.

A faust agent counts the terminal events on ``stamp.events`` (StampCompleted, StampFailed) into
tumbling one-second windows: stamps finished per second by the tier (``stamping``). It counted the
accepted requests per channel on ``stamp.requested`` too, until 2 December: nothing read those
counts (the fair queue needs no rate, ``fair_queue.py``), and the agent cost a changelog write or
two per request on the API process and the broker.

Rates are read back with :class:`Throughput` (``rates()`` -> :class:`Rates`), summed over the last
``window_s`` complete seconds, so QueueView can compute an ETA without a PostgreSQL count.

Partitioning. The source topic is keyed by request id, so no repartition topic is needed: every
table key carries the *source partition* (``"stamping|2"``), which keeps a key's changelog partition
equal to the partition it was counted from (faust writes a table update to the current event's
partition). A process therefore owns the counts of exactly the partitions assigned to it. Request ids
hash uniformly, so a process that holds ``k`` of ``P`` partitions scales its local sum by ``P / k``
(``Rates.coverage`` says how much it saw); in the one-process (all in one) mode ``k == P``.

Nothing on the money path reads these numbers: they shape queue estimates only (see
docs/architecture). Faust's own topics (changelog, assignor) are named ``<prefix>bubuh-throughput-*``
and the consumer group is ``<prefix>bubuh-throughput``; the store is in memory (no RocksDB), and a
restart recovers the windows from the changelog. The broker trims only closed segments (compaction for
the progress tables, ``expires`` for the windows), so the changelogs roll a segment every minute or MiB
(``CHANGELOG_SEGMENTS``): with the broker's default segment of a week or 64 MiB nothing was ever trimmed,
and each restart replayed every count since the topic was made (a minute of a core after some 300,000
stamps, on the API process while it served a surge).

Run it inside the platform's asyncio process: ``Throughput(settings).run(stop)`` is a runtime task.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

import faust
from aiokafka.errors import KafkaError

from services.contracts.bubuh.v1 import stamp_pb2
from services.kernel import errors, events, kafka_auth, logs, readiness, topics
from services.kernel.kafka_clients import build_admin, build_consumer
from services.kernel.settings import Settings
from services.kernel.waiting import Pause, sleep_or_stop
from services.stamping.metrics import THROUGHPUT_RESTARTS

log = logs.get(__name__)

APP_NAME = "bubuh-throughput"
TIER = "stamping"
BUCKET_S = 1.0          # tumbling window size: one bucket per second
_TERMINAL = (events.type_name(stamp_pb2.StampCompleted), events.type_name(stamp_pb2.StampFailed))
# the changelogs' segments: a restart replays about one segment beside what compaction and retention keep
CHANGELOG_SEGMENTS = {"segment.ms": str(60_000), "segment.bytes": str(1 << 20)}


@dataclass(frozen=True)
class Rates:
    """Per-second rates over the last ``window_s`` complete seconds.

    A rate is the count divided by the seconds it was counted over: the whole window, or less when the
    first event in the window came later (a tier that just started is not diluted by empty seconds).
    """

    rate_per_s: float                                  # terminal stamp events per second (the tier)
    window_s: float = 60.0
    coverage: float = 0.0                              # share of partitions this process counted (0..1)
    completed: float = 0.0                             # terminal events in the window (extrapolated)

    @property
    def known(self) -> bool:
        return self.coverage > 0


def _key(name: str, partition: int) -> str:
    return f"{name}|{partition}"


def _split(key: str) -> tuple[str, int]:
    name, _, partition = key.rpartition("|")
    return name, int(partition)


class Throughput:
    """A faust app with the two counting agents and a read API.

    ``start()``/``stop()`` run the app on the running event loop (no faust Worker, no signal handlers,
    no web server); ``run(stop)`` is the same as a runtime task.
    """

    def __init__(self, settings: Settings, *, window_s: float | None = None) -> None:
        self._settings = settings
        self.window_s = float(window_s or settings.stamp_eta_window_s)
        (settings.local_dir / "faust").mkdir(parents=True, exist_ok=True)
        self.malformed = 0
        self.read = 0          # source records the agent was handed (counted or not)
        self.skipped = 0       # source records passed over at start-up, too old for any window
        self.restarts = 0      # faust apps started anew after one crashed (``run``)
        self._started = False
        self._build()

    def _build(self) -> None:
        """A new faust app with its tables and agent (at start, and after a crash: an app does not
        start twice)."""
        settings = self._settings
        self.app = faust.App(
            settings.group(APP_NAME),                     # app id: consumer group and internal topic prefix
            broker=[f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")],
            broker_credentials=kafka_auth.faust_credentials(settings),
            store="memory://",
            # faust keeps a data directory per app id; under .local, not the working directory
            datadir=str(settings.local_dir / "faust" / settings.group(APP_NAME)),
            autodiscover=False,
            web_enabled=False,
            topic_replication_factor=settings.replication_factor,
            topic_partitions=settings.default_partitions,
            topic_allow_declare=True,
            # earliest, for the changelogs: faust's recovery seeks each to its first offset minus one, which
            # is out of range once retention has trimmed the log (CHANGELOG_SEGMENTS); at `latest` the reader
            # then jumped to the end and waited for records that never came, and the windows stayed in
            # recovery until the process stopped (2-8 minutes, after each restart that followed load, in
            # the API processes on 5-6 December). The source topic's start is set by _skip_expired.
            consumer_auto_offset_reset="earliest",
            table_cleanup_interval=5.0,
            producer_acks=1,                             # statistics, not money: no acks=all
            processing_guarantee="at_least_once",
            loghandlers=[],
        )
        expires = timedelta(seconds=self.window_s + 10 * BUCKET_S)
        self.completed = self._table("completed-per-s", topics.STAMP_EVENTS).tumbling(BUCKET_S, expires=expires)
        # the next source offset per partition whose count is in the tables (see _fresh)
        self.progress_events = self._table("progress-events", topics.STAMP_EVENTS)
        self._events_topic = self.app.topic(settings.topic(topics.STAMP_EVENTS.name),
                                            value_serializer="raw", key_serializer="raw")
        self.app.agent(self._events_topic, name="count-terminal")(self._count_terminal)

    def _table(self, name: str, source: topics.Topic):
        """A count per key, its changelog partitioned like ``source`` (see Partitioning above)."""
        return self.app.Table(name, default=int, partitions=self._partitions(source),
                              extra_topic_configs=CHANGELOG_SEGMENTS)

    def _partitions(self, topic: topics.Topic) -> int:
        return topic.partitions or self._settings.default_partitions

    # --- agents -------------------------------------------------------------------------------------

    @staticmethod
    def _fresh(progress, message) -> bool:
        """False for a record whose count the (changelog-recovered) table already holds.

        With at-least-once, a table's changelog runs ahead of the committed source offsets: after a
        rebalance or restart the new owner recovers the counts *and* re-reads the records since the last
        commit. Remembering the next offset per partition after each *counted* record, in a table on the
        same changelog partition, makes the re-read a no-op instead of a double count (no transactions
        needed). A record that counts nothing moves nothing: re-read, it counts nothing again. (Writing
        the offset after every record cost a changelog record for each of a stamp's non-terminal events.)
        """
        key = str(message.partition)
        if message.offset < progress[key]:
            return False
        progress[key] = message.offset + 1
        return True

    async def _count_terminal(self, stream) -> None:
        async for event in stream.events():
            self.read += 1
            try:
                env, _ = events.decode(event.value)
            except errors.BubuhError:
                self.malformed += 1
                continue
            message = event.message
            if env.type in _TERMINAL and self._fresh(self.progress_events, message):
                self.completed[_key(TIER, message.partition)] += 1

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the faust app on the running loop; returns once its consumer is running."""
        app = self.app
        app.loop = asyncio.get_running_loop()
        app.finalize()
        await self._declare_changelogs()
        # faust's consumer group is its app id: join once the broker can coordinate it
        await readiness.wait_for_group_coordinator(self._settings, app.conf.id)
        self.skipped = await self._skip_expired()
        await app.start()
        self._started = True

    async def _skip_expired(self) -> int:
        """Move the group's committed offsets past records too old for any window (``window_s`` plus
        the buckets ``expires`` keeps), before faust joins: those records would be read and counted
        into buckets already expired. Without it a restart re-read everything since the group's last
        commit, and faust leaves partitions uncommitted for long stretches (the group was 94,000
        records behind after a day of surges: a minute of a core at start-up, for no count).

        A group with no offset yet (a new prefix, a first start) gets one too, at its first fresh record:
        the consumer's reset is ``earliest`` (``_build``), which would otherwise read the whole topic.

        Only while the group has no member: a running member owns its offsets, and the broker
        refuses a commit from outside the group (the catch-up then costs this member what it did
        before). Returns how many records were skipped.
        """
        from aiokafka import TopicPartition

        s = self._settings
        since_ms = int((time.time() - self.window_s - 10 * BUCKET_S) * 1000)
        tps = [TopicPartition(s.topic(topics.STAMP_EVENTS.name), p)
               for p in range(self._partitions(topics.STAMP_EVENTS))]
        admin = build_admin(s, client_id=f"{self.app.conf.id}-skip")
        consumer = build_consumer(s, group_id=self.app.conf.id, client_id=f"{self.app.conf.id}-skip")
        await admin.start()
        try:
            await consumer.start()
            consumer.assign(tps)          # a commit without joining the group (generation -1)
            consumer.pause(*tps)          # nothing to fetch: only offsets are looked up and written
            committed = await admin.list_consumer_group_offsets(self.app.conf.id, partitions=tps)
            found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            ends = await consumer.end_offsets(tps)
            moves, skipped = {}, 0
            for tp in tps:
                first_fresh = found[tp].offset if found.get(tp) is not None else ends[tp]
                at = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else None
                if at is None or first_fresh > at:
                    moves[tp] = first_fresh
                    skipped += first_fresh - at if at is not None else 0
            if moves:
                await consumer.commit(moves)
            return skipped
        except KafkaError as exc:        # a member is running, or the broker is busy: faust reads as before
            log.info("throughput: old records not skipped", reason=type(exc).__name__)
            return 0
        finally:
            await consumer.stop()
            await admin.close()

    async def _declare_changelogs(self, timeout_s: float = 30.0) -> None:
        """faust creates its changelog topics as it starts and compares their partitions with the
        source topic's at the first record; on a busy broker that check could run before the new
        topic was in the metadata ("0 partitions") and the agent crashed for good. The topics are
        created here first, as faust would (same partitions and cleanup policy), and the app starts
        only once the broker lists every one with its partitions."""
        from aiokafka.admin import NewTopic

        wanted: list[NewTopic] = []
        for table in self.app.tables.values():
            topic = table.changelog_topic
            policy = ",".join(p for p, on in (("compact", topic.compacting), ("delete", topic.deleting)) if on)
            configs = {**(topic.config or {}), **({"cleanup.policy": policy} if policy else {})}
            if topic.retention:
                configs["retention.ms"] = str(int(float(topic.retention) * 1000))
            wanted.append(NewTopic(name=topic.get_topic_name(), num_partitions=table.partitions,
                                   replication_factor=self._settings.replication_factor, topic_configs=configs))
        await topics.create_and_wait(self._settings, wanted, timeout_s)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.app.stop(), 30)

    async def run(self, stop: asyncio.Event) -> None:
        """A runtime task: count until ``stop`` is set.

        The counts shape ETAs only, so the app's crash does not stop the process it runs in (the API's:
        the front door). faust's changelog recovery can crash the app in a rebalance (``ValueError:
        Offset must be a positive integer`` from its seek, with two API members in ``make
        surge-tier-members``), and the crash used to end the API process. Now the crashed app is
        stopped and a new one started after a pause (1 s, doubling up to 30 s), counted in
        ``bubuh_throughput_app_restarts_total``; meanwhile the rates read as unknown and the ETAs
        fall back to the queue's own figures. A failure to start still fails the task, as before.
        """
        pause = Pause(first_s=1.0, max_s=30.0)
        while True:
            await self.start()
            try:
                ended = asyncio.ensure_future(self.app.wait_until_stopped())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({ended, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                ended.cancel()
                reason = self.app.crash_reason
            finally:
                await self.stop()
            if stop.is_set():
                return
            self.restarts += 1
            THROUGHPUT_RESTARTS.inc()
            wait_s = pause.next()
            log.warning("throughput: the faust app stopped, starting a new one", reason=repr(reason),
                        in_s=wait_s, restarts=self.restarts)
            if await sleep_or_stop(stop, wait_s):
                return
            self._build()

    # --- read API -----------------------------------------------------------------------------------

    def assigned(self, topic: topics.Topic) -> set[int]:
        name = self._settings.topic(topic.name)
        try:
            return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == name}
        except Exception:  # noqa: BLE001 - not started or mid-rebalance: nothing assigned
            return set()

    def _window_sums(self, wrapper, partitions: set[int], now: float) -> tuple[dict[str, int], dict[str, float]]:
        """Sum the buckets of the last ``window_s`` *complete* seconds per name, over ``partitions``,
        and for how many seconds of the window each name counted something (its busy seconds).

        One scan of the table (keys are ``(name|partition, (start, end))``); it also finds the names
        a changelog recovery brought back, which a windowed table cannot list by itself. The span is
        the busy seconds, not the window: 300 stamps in a tier's first 5 s are 60/s, not 5/s, and a
        surge after a quiet minute is measured at the pace it goes, not diluted by the quiet seconds
        (ETAs from the diluted rate were about 3x too long in make surge).
        """
        end = math.floor(now / BUCKET_S) * BUCKET_S          # the current second is still filling
        start = end - self.window_s
        sums: dict[str, int] = defaultdict(int)
        busy: dict[str, set[float]] = defaultdict(set)
        for (key, (w_start, _)), value in list(wrapper.table.data.items()):
            if start <= w_start < end and value:
                name, partition = _split(key)
                if partition in partitions:
                    sums[name] += value
                    busy[name].add(w_start)
        return sums, {name: max(BUCKET_S, len(seconds) * BUCKET_S) for name, seconds in busy.items()}

    def rates(self, now: float | None = None) -> Rates:
        """Rates over the last ``window_s`` seconds, extrapolated from the partitions this process owns."""
        now = time.time() if now is None else now
        window = self.window_s
        done_parts = self.assigned(topics.STAMP_EVENTS)
        total = self._partitions(topics.STAMP_EVENTS)
        scale = total / len(done_parts) if done_parts else 0.0
        done, done_span = self._window_sums(self.completed, done_parts, now)
        return Rates(
            completed=done.get(TIER, 0) * scale,
            rate_per_s=round(done.get(TIER, 0) * scale / done_span.get(TIER, window), 3),
            window_s=window,
            coverage=len(done_parts) / total if total else 0.0,
        )
