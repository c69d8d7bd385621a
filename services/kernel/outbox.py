"""The outbox: publish what a transaction decided, after it committed, at least once.

``add`` writes a record in the caller's transaction; the ``Relay`` publishes due rows in id order,
waits for Kafka's acknowledgement and only then deletes them. A crash between the two publishes a
row again with the same event id, which every consumer's inbox recognises.

Rows with ``available_at`` in the future are durable delayed retries (see ``retry.py``): nothing
sleeps in a consumer; the relay publishes them when they fall due.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from operator import itemgetter

import asyncpg
import orjson

from services.kernel import database, failures, logs
from services.kernel.events import Outgoing
from services.kernel.leadership import Leadership
from services.kernel.listener import Listener
from services.kernel.metrics import OUTBOX_LAG_SECONDS, OUTBOX_PUBLISHED
from services.kernel.producer import Producer
from services.kernel.settings import Settings
from services.kernel.waiting import Pause, sleep_or_stop, wait_any

log = logs.get(__name__)


def _insert(first: int) -> str:
    """The outbox INSERT for the rows of ``_rows``, its parameters numbered from ``$first``."""
    e, t, k, v, h, at = (f"${first + i}" for i in range(6))
    return ("INSERT INTO outbox (event_id, topic, key, value, headers, available_at) "
            f"SELECT e, t, k, v, h::jsonb, COALESCE({at}, now()) "
            f"FROM unnest({e}::text[], {t}::text[], {k}::bytea[], {v}::bytea[], {h}::text[]) AS u(e, t, k, v, h)")


def _rows(records: list[Outgoing], available_at: dt.datetime | None) -> list:
    return [[r.event_id for r in records], [r.topic for r in records], [r.key for r in records],
            [r.value for r in records],
            [orjson.dumps([[k, v.decode("latin-1")] for k, v in r.headers]).decode() for r in records], available_at]


_ADD = _insert(1)


async def add(conn: asyncpg.Connection, records: list[Outgoing], *, available_at: dt.datetime | None = None,
              notify: bool = True) -> None:
    """Queue ``records`` for publishing, inside the caller's transaction."""
    if not records:
        return
    # one statement for the lot (not a statement per row): rows get their ids in list order, which is
    # the order the relay publishes them in
    await conn.execute(_ADD, *_rows(records, available_at))
    if notify and available_at is None:
        # wakes the relay after the commit, so latency is not a poll interval
        await database.notify(conn, "_outbox", in_schema=True)


async def add_with(conn: asyncpg.Connection, writes: Sequence[str], args: Sequence, records: list[Outgoing], *,
                   guard: str = "", answer: str = "SELECT") -> list[asyncpg.Record]:
    """Queue ``records`` in the same statement as the caller's own ``writes``, inside its transaction.

    ``writes`` are common table expressions (``name AS (INSERT ...)``) with parameters ``$1..$n``
    (``args``); PostgreSQL runs each data-modifying one once, whether or not anything reads it. One
    round trip for the caller's rows and the records: what a transaction holding row locks sends
    between its last read and its commit (the quota ledger's). ``guard``, an SQL condition over the
    writes, queues the records only where it holds (the caller's writes carry it themselves);
    ``answer`` is the statement's own query, whose rows are returned. The relay's wake-up follows the
    commit, as ``add`` (one that finds nothing when a guard did not hold).
    """
    if not writes:
        await add(conn, records)
        return []
    ctes = list(writes)
    if records:
        ctes.append(f"queued AS ({_insert(len(args) + 1)}{f' WHERE {guard}' if guard else ''})")
    rows = await conn.fetch(f"WITH {', '.join(ctes)} {answer}", *args, *(_rows(records, None) if records else ()))
    if records:
        await database.notify(conn, "_outbox", in_schema=True)
    return rows


async def add_if(conn: asyncpg.Connection, guard: str, guard_args: Sequence, records: list[Outgoing]) -> bool:
    """Queue ``records`` only if ``guard`` changed a row, in one statement: False (nothing queued) when not.

    ``guard`` is a data-modifying statement with ``RETURNING`` and parameters ``$1..$n`` (``guard_args``),
    typically a state change such as ``UPDATE ... WHERE status = 'x' RETURNING 1``. The change and its
    records commit together or not at all, as ``add`` in the caller's transaction would, but outside a
    transaction it costs one round trip instead of four (BEGIN, the change, the insert, COMMIT): a
    statement is its own transaction. The relay's wake-up follows as ``add`` sends it.
    """
    if not records:
        raise ValueError("add_if needs records to queue")
    n = len(guard_args)
    queued = await conn.fetchval(
        f"WITH guard AS ({guard}) {_insert(n + 1)} WHERE EXISTS (SELECT FROM guard) RETURNING true",
        *guard_args, *_rows(records, None))
    if queued:
        await database.notify(conn, "_outbox", in_schema=True)
    return bool(queued)


class Relay:
    """Publishes a service's outbox, each key's events in the order they were written.

    Several members of a tier run one each, and one of them publishes: the leader of the schema's
    outbox (``leadership.py``, a session advisory lock). Two relays claiming rows side by side with
    SKIP LOCKED would each publish its own rows as soon as Kafka took them, so a key's later event could
    land before its earlier one; and every commit's NOTIFY woke both, one of them for an empty
    transaction. The leader wakes on NOTIFY (``listener.py``: a LISTEN connection of its own) and polls
    every ``idle_poll_s`` anyway, for due retries and lost notifications; the others stand by, and one
    takes over within ``leader_retry_s`` of the leader's end. Each publish also holds a
    transaction-scoped lock (``publish_due``), so two never overlap, even while a leader that lost its
    lock's connection has not yet noticed.
    """

    def __init__(self, pool: asyncpg.Pool, producer: Producer, settings: Settings, service: str) -> None:
        self._pool = pool
        self._producer = producer
        self._settings = settings
        self._schema = settings.schema(service)
        self._batch = settings.outbox_batch
        self._idle_poll_s = settings.outbox_idle_poll_s
        self._linger_s = settings.outbox_linger_ms / 1000
        # heard by the leader alone (the others stand by without listening): a leader's own commits wake it in-process
        self._listener = Listener(settings, f"{self._schema}_outbox", alone=True)
        self._wake = self._listener.subscribe()
        self.leadership = Leadership(settings, f"outbox relay {self._schema}")
        self._publishing = f"outbox publish {self._schema}"

    async def run(self, stop: asyncio.Event) -> None:
        await self.leadership.lead(stop, self._relay)

    async def _relay(self, stop: asyncio.Event) -> None:
        """The leader's loop: publish what is due, then wait for a wake-up (a NOTIFY, or a call from a commit in
        this process) or ``idle_poll_s``; woken, wait ``outbox_linger_ms`` more, so the commits landing meanwhile
        go out in the same publish."""
        listening = asyncio.create_task(self._listener.run(stop), name=f"outbox-listener-{self._schema}")
        pause = Pause()
        try:
            while not stop.is_set():
                try:
                    self._wake.clear()
                    published = await self.publish_due()
                    pause.reset()
                    if published >= self._batch:
                        continue
                    await wait_any(stop, self._wake, self._idle_poll_s)
                    if self._linger_s > 0 and self._wake.is_set():
                        await asyncio.sleep(self._linger_s)
                except Exception as exc:  # noqa: BLE001 - an outage of Kafka or PostgreSQL: wait and go on
                    log.warning("outbox relay waiting", schema=self._schema, error=repr(exc),
                                outage=failures.classify(exc).waits)
                    await sleep_or_stop(stop, pause.next())
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)

    async def publish_due(self) -> int:
        """Publish the due rows, up to a batch, in id order: how many (0 also while another relay of this
        outbox is publishing; it takes what is due next, as every commit's NOTIFY wakes it)."""
        async with self._pool.acquire() as conn, conn.transaction():
            # one publish at a time per outbox: a later batch never overtakes an earlier one in flight
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", self._publishing):
                return 0
            # claimed and deleted in one statement; the deletion counts only if Kafka acknowledges
            # (otherwise the transaction rolls back and the rows are there again). `= ANY(ARRAY(...))`,
            # not `IN (...)`: with IN the planner may hash-join a sequential scan of the whole outbox
            # (it does once the table is analysed with a backlog), here it probes the primary key
            rows = sorted(await conn.fetch(
                "DELETE FROM outbox WHERE id = ANY(ARRAY(SELECT id FROM outbox WHERE available_at <= now() "
                "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)) "
                "RETURNING id, topic, key, value, headers, event_id, created_at",
                self._batch,
            ), key=itemgetter(0))
            if not rows:
                return 0
            # rows unpacked by position (cheaper than by name at hundreds of rows per call)
            records = [
                Outgoing(topic, key, value, [(k, v.encode("latin-1")) for k, v in orjson.loads(headers)], event_id)
                for _, topic, key, value, headers, event_id, _ in rows
            ]
            await self._producer.publish_many(records)
        now = dt.datetime.now(dt.UTC)
        OUTBOX_PUBLISHED.labels(schema=self._schema).inc(len(rows))
        OUTBOX_LAG_SECONDS.labels(schema=self._schema).observe(
            max(0.0, (now - rows[0]["created_at"]).total_seconds()))
        return len(rows)

