"""The local stack is the real thing: a Kafka broker we formatted, a PostgreSQL server we started."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services.kernel import kafka_auth
from tests import stack


async def test_cluster_id_from_broker_matches_formatted_storage(settings):
    if not stack.managed_kafka():
        pytest.skip("BUBUH_KAFKA_BOOTSTRAP names a broker this run did not format")
    meta = stack.kafka_meta_properties().read_text()
    formatted = re.search(r"^cluster\.id=(\S+)$", meta, re.M).group(1)
    admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(settings))
    await admin.start()
    try:
        described = await admin.describe_cluster()
    finally:
        await admin.close()
    assert described["cluster_id"] == formatted
    assert [b["port"] for b in described["brokers"]] == [int(settings.kafka_bootstrap.rsplit(":", 1)[1])]


async def test_postgres_server_version_is_read_from_the_server(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        version = await conn.fetchval("SHOW server_version")
        server_version_num = int(await conn.fetchval("SHOW server_version_num"))
    finally:
        await conn.close()
    assert server_version_num // 10000 == int(version.split(".")[0])
    if stack.managed_postgres():
        installed = sorted(int(p.name) for p in Path("/usr/lib/postgresql").iterdir() if p.name.isdigit())
        assert server_version_num // 10000 == installed[-1]
