"""The component tier: handlers and the pipeline on the in-memory broker, against real PostgreSQL.

Only PostgreSQL is started (once per session); Kafka and the platform are not, which is what keeps
this tier fast. ``settings`` here replaces the root fixture of the same name, which would start the
whole stack.
"""

from __future__ import annotations

import contextlib

import pytest

from services.kernel import database, logs, migrations
from services.kernel.processing.memory import MemoryBroker
from tests import stack

# knobs that make the failure policy's waits short enough for a test, and nothing else
FAST = {
    "consumer_crash_retries": 2,
    "consumer_crash_retry_base_s": 0.05,
    "consumer_suspect_retries": 1,
    "outbox_idle_poll_s": 0.05,
    "leader_retry_s": 0.1,
    "db_pool_min": 1,
}


@pytest.fixture(scope="session")
def local_postgres():
    """PostgreSQL from deploy/local (or the server BUBUH_DATABASE_URL names); no Kafka."""
    if stack.managed_postgres():
        stack.postgres_start()
    logs.configure("tests", level="warning", fmt="console")
    return True


@pytest.fixture
async def settings(local_postgres):
    """Unique schema and topic prefixes; every schema with the prefix is dropped afterwards."""
    s = stack.isolated_settings(**FAST)
    yield s
    with contextlib.suppress(Exception):
        conn = await database.connect(s)
        try:
            for row in await conn.fetch("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)",
                                        s.schema_prefix):
                await conn.execute(f'DROP SCHEMA "{row["nspname"]}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def pool(settings):
    """A pool on a schema of its own (``settings.schema("component")``) with the kernel's tables
    (inbox with where each event was read, outbox), migrated as a service's schema is."""
    service = "component"
    p = await database.create_pool(settings, service, min_size=1, max_size=8)
    # there is no services/component/migrations: these are the kernel's files alone
    await migrations.migrate(p, settings.schema(service), migrations.files_for(service))
    yield p
    await p.close()


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(partitions=4)
