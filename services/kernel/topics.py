"""The topic catalogue: every topic, its owner, its key and its partitions, in one place.

``docs/topics.md`` is generated from this table (``bubuh topics --markdown``). Topics are created
from it at start-up (``ensure``), so a new environment needs no manual step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

from services.kernel.kafka_clients import build_admin
from services.kernel.settings import Settings


@dataclass(frozen=True)
class Topic:
    name: str
    owner: str            # the only service that writes it (channels may write purchase.submitted)
    key: str
    events: str
    partitions: int | None = None   # None: settings.default_partitions
    compacted: bool = False
    # the broker stamps each record with its own append time (a time the writer cannot choose)
    append_time: bool = False

    def configs(self) -> dict[str, str]:
        out = {}
        if self.compacted:
            out["cleanup.policy"] = "compact"
        if self.append_time:
            out["message.timestamp.type"] = "LogAppendTime"
        return out


CHANNEL = Topic("channel", "purchase", "channel id", "Channel (compacted: latest state per channel)", 1, True)
PURCHASE_SUBMITTED = Topic("purchase.submitted", "channels, purchase (HTTP intake)", "account",
                           "PurchaseSubmitted (LogAppendTime: the broker's clock is the receive time)",
                           append_time=True)
PURCHASE_EVENTS = Topic("purchase.events", "purchase", "account", "PurchaseConfirmed, PurchaseRejected")
PURCHASE_DLQ = Topic("purchase.dead-letter", "purchase", "as the source record",
                     "rejected records of purchase.submitted (forged, malformed) with bubuh-dlq-* headers")
# by account, as purchase.events: an account's reservations on one partition, in the order accepted, so one quota
# member makes them and two never reserve on one account row at once. By request id, an applicant's two stamps
# often reached both quota members together, and one waited for the other's lock (README, "Two members of every
# tier"). The price: one account's reservations are one member's work, which its row's lock made them anyway.
STAMP_REQUESTED = Topic("stamp.requested", "stamping (intake)", "account", "StampRequested")
QUOTA_EVENTS = Topic("quota.events", "quota", "account (QuotaCredited); request id (a reservation's events)",
                     "QuotaCredited, QuotaReserved, QuotaRejected, QuotaCommitted, QuotaReleased, QuotaRefused")
QUOTA_DLQ = Topic("quota.dead-letter", "quota", "as the source record", "records quota could not apply")
STAMP_EVENTS = Topic("stamp.events", "stamping (worker, tracker)", "request id",
                     "StampSigned (asks the ledger to post), StampCompleted (released once posted), StampFailed")
STAMP_RETRY = Topic("stamp.retry", "stamping (worker)", "request id",
                    "QuotaReserved re-sent at its due time after a transient failure")
STAMP_DLQ = Topic("stamp.dead-letter", "stamping", "request id", "stamp requests that exhausted their retries")
NOTIFICATION_DLQ = Topic("notification.dead-letter", "notification", "channel id", "DeliveryAbandoned")

ALL: tuple[Topic, ...] = (CHANNEL, PURCHASE_SUBMITTED, PURCHASE_EVENTS, PURCHASE_DLQ, STAMP_REQUESTED,
                          QUOTA_EVENTS, QUOTA_DLQ, STAMP_EVENTS, STAMP_RETRY, STAMP_DLQ, NOTIFICATION_DLQ)


def markdown(settings: Settings) -> str:
    rows = ["| topic | written by | key | events | partitions |", "|---|---|---|---|---|"]
    for t in ALL:
        parts = t.partitions or settings.default_partitions
        compacted = " (compacted)" if t.compacted else ""
        rows.append(f"| `{t.name}` | {t.owner} | {t.key} | {t.events} | {parts}{compacted} |")
    return "\n".join(rows) + "\n"


async def ensure(settings: Settings, topics: tuple[Topic, ...] = ALL, *, as_admin: bool = False) -> None:
    """Create missing topics (idempotent; concurrent callers are fine).

    On a secured broker only the admin principal (``as_admin=True``, as ``bubuh kafka setup`` runs it) may
    create the catalogue's topics; a service finding them all present creates nothing.
    """
    admin = build_admin(settings, client_id="bubuh-topics", as_admin=as_admin)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = []
        for t in topics:
            name = settings.topic(t.name)
            if name in existing:
                if t.append_time:
                    await _keep_append_time(admin, name)
                continue
            new.append(NewTopic(name=name, num_partitions=t.partitions or settings.default_partitions,
                                replication_factor=settings.replication_factor, topic_configs=t.configs()))
        if new:
            try:
                response = await admin.create_topics(new)
            except TopicAlreadyExistsError:
                # created meanwhile by another process, or listed late by the broker's metadata
                response = None
            tried = {n.name for n in new}
            already = set(tried)
            if response is not None:
                # aiokafka hands back per-topic errors instead of raising them
                already = set()
                for name, code, *_ in response.topic_errors:
                    if code == TopicAlreadyExistsError.errno:
                        already.add(name)
                    elif code != 0:
                        error = for_code(code)
                        raise error(f"cannot create topic {name}: {error.__name__} (topics are created by the "
                                    "admin principal: run `bubuh kafka setup`)")
            # one that turned out to exist may lack the config it needs
            for t in topics:
                if t.append_time and settings.topic(t.name) in already:
                    await _keep_append_time(admin, settings.topic(t.name))
            # the controller has them; a consumer started now must find them in the broker's metadata too,
            # or it waits a whole metadata_max_age for the next look
            for _ in range(100):
                if tried <= set(await admin.list_topics()):
                    break
                await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def create_and_wait(settings: Settings, wanted: list[NewTopic], timeout_s: float = 30.0) -> None:
    """Create the topics of ``wanted`` that do not exist yet, give the ones that do exist the configs
    ``wanted`` asks for (a topic created by an older release keeps working under the new settings), and
    return once the broker describes every one with its partitions (for a client that checks partition
    counts at its first record)."""
    admin = build_admin(settings, client_id="bubuh-topics")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        for t in wanted:
            if t.name in existing and t.topic_configs:
                await _keep_configs(admin, t.name, dict(t.topic_configs))
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
        names = {t.name for t in wanted}
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            described = await admin.describe_topics(sorted(names))
            ready = {d["topic"] for d in described if d.get("error_code", 0) == 0 and d.get("partitions")}
            if ready >= names:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"topics not ready within {timeout_s:g} s: {sorted(names - ready)}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def _keep_configs(admin: AIOKafkaAdminClient, name: str, wanted: dict[str, str]) -> None:
    """Set ``wanted`` on an existing topic unless it already holds those values.

    AlterConfigs replaces a topic's whole set of dynamic configs, so ``wanted`` must be all of them (it
    is: the topic's owner declares its full set). On a secured broker a service principal may read a
    setting but not change it: a topic without it there is an error that names the fix (``bubuh kafka
    setup`` as the admin), not a silent pass.
    """
    # a topic another starter has just created is known to the controller before this broker serves it:
    # UNKNOWN_TOPIC_OR_PARTITION for a moment (seen when `bubuh up` starts two processes at once)
    deadline = asyncio.get_running_loop().time() + 15.0
    while True:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name, None)])
        codes = [resource[0] for response in described for resource in response.resources]
        if UnknownTopicOrPartitionError.errno not in codes or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    current: dict[str, str] = {}
    for response in described:
        for resource in response.resources:
            if resource[0]:
                error = for_code(resource[0])
                raise error(f"cannot read the config of topic {name}: {error.__name__}")
            current.update({entry[0]: entry[1] for entry in resource[4]})
    if all(current.get(key) == str(value) for key, value in wanted.items()):
        return
    altered = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name,
                                                        {k: str(v) for k, v in wanted.items()})])
    for response in altered if isinstance(altered, list) else [altered]:
        for resource in response.resources:
            if resource[0]:
                error = for_code(resource[0])
                settings_text = ", ".join(f"{k}={v}" for k, v in wanted.items())
                raise error(f"topic {name} needs {settings_text} and this principal may not set it "
                            f"({error.__name__}): run `bubuh kafka setup` as the admin")


async def _keep_append_time(admin: AIOKafkaAdminClient, name: str) -> None:
    """A topic created before it needed LogAppendTime gets it (no other dynamic config is set on it)."""
    await _keep_configs(admin, name, {"message.timestamp.type": "LogAppendTime"})
