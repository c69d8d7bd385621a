"""Broker readiness: a consumer joins its group only once the broker can coordinate the group.

A broker that has just started (or a fresh one, before anything created ``__consumer_offsets``)
answers FindCoordinator with COORDINATOR_NOT_AVAILABLE, and then COORDINATOR_LOAD_IN_PROGRESS while it
loads the group's partition. A consumer started then gets there in the end, but aiokafka logs every
failed lookup at ERROR, so each start of the local stack used to open with a screenful of errors.
Muting the library would also hide the same errors later, when they mean a broker went away: instead
the consumer waits here, asking quietly (our own requests, whose errors are ours to judge), and the
library's lines keep their levels.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    AuthenticationFailedError,
    GroupAuthorizationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    for_code,
)

from services.kernel import logs
from services.kernel.errors import ConfigError
from services.kernel.kafka_clients import build_admin
from services.kernel.settings import Settings

log = logs.get(__name__)

RETRY_S = 0.25
# waiting does not fix these: the process says so at once (what consumer.start() would have raised)
_REFUSED = (AuthenticationFailedError, GroupAuthorizationFailedError, SaslAuthenticationFailed)


class NotReady(Exception):
    """One look found the broker not ready yet; the message says what was missing."""


async def _coordinator(admin: AIOKafkaAdminClient, group_id: str) -> int:
    cluster = await admin.describe_cluster()
    if cluster.get("controller_id", -1) < 0:
        raise NotReady("no controller in the cluster metadata")
    try:
        node = await admin.find_coordinator(group_id)
    except _REFUSED:
        raise
    except KafkaError as exc:                          # COORDINATOR_NOT_AVAILABLE, ... : not yet
        raise NotReady(f"FindCoordinator: {type(exc).__name__}") from None
    # the coordinator is known; it must also answer for the group (not still loading its partition)
    (response,) = await admin.describe_consumer_groups([group_id], group_coordinator_id=node)
    error_code = response.groups[0][0]
    if error_code:
        error = for_code(error_code)
        if issubclass(error, _REFUSED):
            raise error(group_id)
        raise NotReady(f"DescribeGroups on node {node}: {error.__name__}")
    return node


async def wait_for_group_coordinator(settings: Settings, group_id: str, *, credential=None,
                                     timeout_s: float | None = None) -> int:
    """Return the coordinator's node id once the broker can coordinate ``group_id``.

    Raises ``ConfigError`` (one line, with the last reason) when it cannot within
    ``timeout_s`` (default ``kafka_ready_timeout_s``).
    """
    timeout_s = settings.kafka_ready_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    admin = build_admin(settings, client_id="bubuh-readiness", credential=credential)
    started = False
    waited = False
    reason = "no answer"
    try:
        while True:
            try:
                if not started:
                    await admin.start()
                    started = True
                node = await asyncio.wait_for(_coordinator(admin, group_id), max(0.1, deadline - time.monotonic()))
                if waited:
                    log.info("Kafka ready for the group", group=group_id, coordinator=node)
                return node
            except NotReady as exc:
                reason = str(exc)
            except _REFUSED as exc:
                raise ConfigError(
                    f"Kafka at {settings.kafka_bootstrap} refuses consumer group {group_id} to this principal "
                    f"({type(exc).__name__}): check BUBUH_KAFKA_USERNAME / BUBUH_KAFKA_PASSWORD and its ACLs "
                    "(`bubuh kafka principal`, docs/kafka-access.md)") from None
            except (KafkaError, OSError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if not waited:
                log.info("waiting for Kafka to coordinate the group", group=group_id, reason=reason)
                waited = True
            if time.monotonic() + RETRY_S >= deadline:
                raise ConfigError(
                    f"Kafka at {settings.kafka_bootstrap} cannot coordinate consumer group {group_id} after "
                    f"{timeout_s:g} s ({reason}): check the broker's health and log, or raise "
                    "BUBUH_KAFKA_READY_TIMEOUT_S")
            await asyncio.sleep(RETRY_S)
    finally:
        if started:
            await admin.close()
