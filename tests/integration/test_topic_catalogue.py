"""The topic catalogue against the real broker: `bubuh up` starts several processes at once, and each
creates whatever topics are missing (``topics.ensure``). The one that loses the race finds topics the
controller has just made and this broker does not serve yet; it must wait for them, not give up."""

from __future__ import annotations

import asyncio

from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.kernel import topics
from services.kernel.kafka_clients import build_admin


async def test_starters_racing_to_create_the_catalogue_all_succeed_and_leave_log_append_time(settings):
    async def starter(s, delay: float) -> None:
        await asyncio.sleep(delay)
        await topics.ensure(s)

    for round_ in range(4):
        s = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}race{round_}."})
        # staggered like processes starting: the later ones meet topics in every state of being made
        await asyncio.gather(*(starter(s, 0.015 * n) for n in range(8)))
        admin = build_admin(s, client_id="catalogue-check")
        await admin.start()
        try:
            wanted = [t for t in topics.ALL if t.append_time]
            described = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, s.topic(t.name), {"message.timestamp.type": None})
                 for t in wanted])
            types = {resource[3]: dict((e[0], e[1]) for e in resource[4])["message.timestamp.type"]
                     for response in described for resource in response.resources}
            assert types == {s.topic(t.name): "LogAppendTime" for t in wanted}, types
            assert {s.topic(t.name) for t in topics.ALL} <= set(await admin.list_topics())
        finally:
            await admin.close()
