"""``bubuh replay``: send dead-lettered records back to where they came from, once fixed.

A dead-letter entry is the original record plus ``bubuh-dlq-*`` headers. Replay strips those
headers, marks the record ``bubuh-replay: 1`` (consumers reset their attempt counters for it) and
publishes it to its source topic, addressed (``bubuh-retry-for``) to the consumer that dead-lettered
it: other consumer groups of that topic skip it. Markers of undecodable stretches carry no record
and are skipped. An entry that is not a record from a topic (the notification service's
``DeliveryAbandoned``: a delivery that ran out of time) goes to ``settle``, which the caller gives
(``bubuh replay`` due the delivery again); without one, it is skipped. Progress is the ``replay``
consumer group's committed offset, so an entry is replayed once; ``--from-start`` replays everything again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.kernel import readiness
from services.kernel.events import Outgoing
from services.kernel.kafka_clients import build_consumer
from services.kernel.processing.deadletter import DLQ_CONSUMER, DLQ_MARKER, DLQ_REASON, DLQ_SOURCE
from services.kernel.processing.pipeline import HEADER_ATTEMPT, HEADER_CRASH_ATTEMPT, HEADER_REPLAY, HEADER_RETRY_FOR
from services.kernel.producer import Producer
from services.kernel.settings import Settings
from services.kernel.topic_reading import TopicEnd, whole_topic

DROP = (HEADER_ATTEMPT, HEADER_CRASH_ATTEMPT)   # attempt counters start again after a replay
# an entry without a source record (its value, dry run): True when it was (or would be) handled
Settle = Callable[[bytes, bool], Awaitable[bool]]


@dataclass
class ReplayResult:
    seen: int = 0
    replayed: int = 0
    skipped: int = 0


async def replay(settings: Settings, producer: Producer, dead_letter_topic: str, *, key: str | None = None,
                 reason: str | None = None, dry_run: bool = False, from_start: bool = False,
                 progress=print, settle: Settle | None = None) -> ReplayResult:
    topic = settings.topic(dead_letter_topic)
    group = settings.group(f"replay.{dead_letter_topic}")
    consumer = build_consumer(settings, group_id=group, client_id="bubuh-replay")
    await readiness.wait_for_group_coordinator(settings, group)
    await consumer.start()
    result = ReplayResult()
    try:
        tps = await whole_topic(consumer, topic)
        if not tps:
            progress(f"replay: no topic {topic}")
            return result
        if from_start:
            await consumer.seek_to_beginning(*tps)
        end = await TopicEnd.now(consumer, tps)
        total = await end.remaining()
        progress(f"replay: {total} entries waiting in {topic}")
        while await end.remaining() > 0:
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, records in batch.items():
                for rec in records:
                    if end.beyond(tp, rec.offset):
                        continue
                    result.seen += 1
                    headers = dict(rec.headers or ())
                    if (key and (rec.key or b"").decode() != key) or (
                            reason and headers.get(DLQ_REASON, b"").decode() != reason):
                        result.skipped += 1
                        continue
                    source = headers.get(DLQ_SOURCE, b"").decode().rsplit("/", 2)[0]
                    if DLQ_MARKER in headers:   # a marker has no record to send back
                        result.skipped += 1
                        continue
                    if not source:
                        if settle is not None and await settle(rec.value or b"", dry_run):
                            result.replayed += 1
                        else:
                            result.skipped += 1
                        continue
                    out_headers = [(k, v) for k, v in (rec.headers or ()) if not k.startswith("bubuh-dlq-")
                                   and k not in DROP and k not in (HEADER_REPLAY, HEADER_RETRY_FOR)]
                    out_headers.append((HEADER_REPLAY, b"1"))
                    if headers.get(DLQ_CONSUMER):   # back to the consumer that gave up on it, not to every group
                        out_headers.append((HEADER_RETRY_FOR, headers[DLQ_CONSUMER]))
                    if not dry_run:
                        await producer.publish(Outgoing(source, rec.key, rec.value or b"", out_headers))
                    result.replayed += 1
                    if result.seen % 100 == 0:
                        progress(f"replay: {result.seen}/{total} read, {result.replayed} replayed")
            if not dry_run and batch:
                await consumer.commit()
        progress(f"replay: done, {result.replayed} replayed, {result.skipped} skipped"
                 + (" (dry run: nothing sent)" if dry_run else ""))
    finally:
        await consumer.stop()
    return result


def run(settings: Settings, topic: str, *, settler=None, **kw) -> ReplayResult:
    """``replay`` with a producer of its own; ``settler`` is an async context manager that yields the
    ``settle`` callable (and holds what it needs, a database pool say, for the run)."""
    async def _main() -> ReplayResult:
        from services.kernel import runtime
        producer = await runtime.connect_kafka(settings, "bubuh-replay")
        try:
            if settler is None:
                return await replay(settings, producer, topic, **kw)
            async with settler as settle:
                return await replay(settings, producer, topic, settle=settle, **kw)
        finally:
            await producer.stop()
    return asyncio.run(_main())
