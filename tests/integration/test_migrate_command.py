"""``bubuh migrate``: each service's schema migrated by a one-off command (a Kubernetes Job before a rollout),
as its processes would at start. The real command, against the local PostgreSQL."""

from __future__ import annotations

import asyncpg

from tests.platform import cli


async def test_bubuh_migrate_applies_each_schema_once_then_reads_up_to_date(settings):
    first = cli(settings, "migrate")
    lines = dict(line.split(" ", 1) for line in first.stdout.splitlines())
    assert list(lines) == ["purchase", "quota", "stamping", "notification"]
    for name, said in lines.items():
        assert said.startswith(f"(schema {settings.schema(name)}): 0000_inbox_outbox.sql")
    assert "0007_on_quota.sql" in lines["stamping"]           # the index built concurrently, outside a transaction
    assert first.stderr == ""                                  # nothing but its output: no log lines
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval(
            "SELECT i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
            "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = 'requests_on_quota'",
            settings.schema("stamping")) is True
    finally:
        await conn.close()
    again = cli(settings, "migrate", "--services", "stamping,quota")
    assert again.stdout.splitlines() == [f"stamping (schema {settings.schema('stamping')}): up to date",
                                         f"quota (schema {settings.schema('quota')}): up to date"]
    wrong = cli(settings, "migrate", "--services", "stampin", check=False)
    assert wrong.returncode == 2 and wrong.stderr.startswith("bubuh: unknown service stampin")
