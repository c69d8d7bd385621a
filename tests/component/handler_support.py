"""What the handler component tests share: a migrated service schema on the local PostgreSQL, and
events built the way the pipeline hands them to a handler (decoded, with topic, partition, offset).

No Kafka, no platform process: a test drives ``Transactional(pool, consumer, apply).process(batch)``
directly and reads the service's tables afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator

import asyncpg
from google.protobuf.message import Message

from services.kernel import database, events, logs, migrations
from services.kernel.events import Event, Outgoing
from services.kernel.settings import Settings
from tests import stack

_offsets = itertools.count()


def postgres_up() -> None:
    """The local cluster (deploy/local/postgres.sh), unless BUBUH_DATABASE_URL names another server;
    the services' info lines (one per ledger operation) stay out of the test output."""
    logs.configure("tests", level="warning", fmt="console")
    if stack.managed_postgres():
        stack.postgres_start()


def settings(**overrides) -> Settings:
    """Unique schema prefix; a platform key of its own (nothing read from or written to ``.local``)."""
    values = {"secret_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()}
    values.update(overrides)
    return stack.isolated_settings(**values)


@contextlib.asynccontextmanager
async def service_pool(s: Settings, service: str, max_size: int = 4) -> AsyncIterator[asyncpg.Pool]:
    """The service's pool on its own migrated schema, as ``Runtime.pool`` makes it; dropped afterwards."""
    pool = await database.create_pool(s, service, min_size=1, max_size=max_size)
    try:
        await migrations.migrate(pool, s.schema(service), migrations.files_for(service))
        yield pool
    finally:
        with contextlib.suppress(Exception):
            await pool.execute(f'DROP SCHEMA IF EXISTS "{s.schema(service)}" CASCADE')
        await pool.close()


def as_event(rec: Outgoing, partition: int = 0, offset: int | None = None) -> Event:
    """An outgoing record as the pipeline decodes it on the consuming side."""
    env, payload = events.decode(rec.value)
    return Event(envelope=env, payload=payload, topic=rec.topic, partition=partition,
                 offset=next(_offsets) if offset is None else offset, key=rec.key, headers=dict(rec.headers),
                 raw=rec.value)


def event(msg: Message, *, producer: str, topic: str = "test", key: str = "", event_id: str | None = None) -> Event:
    return as_event(events.outgoing(topic, key, events.envelope(msg, producer=producer, event_id=event_id)))


async def outbox(conn: asyncpg.Connection | asyncpg.Pool, topic: str | None = None) -> list[tuple[str, Message]]:
    """(event id, decoded payload) of every outbox row, in id order (optionally of one topic)."""
    rows = await conn.fetch("SELECT event_id, topic, value FROM outbox ORDER BY id")
    return [(r["event_id"], events.decode(r["value"])[1]) for r in rows if topic is None or r["topic"] == topic]
