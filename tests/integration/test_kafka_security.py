"""The broker is the first wall: SASL/SCRAM-SHA-512 and ACLs on the secured local stack.

A channel's own credential (from ``bubuh channel add``) may write ``purchase.submitted`` and nothing
else; a service principal may not write another service's topics; a client without a credential gets
nowhere. Every refusal is asserted as the broker's authorization (or authentication) error, and the
refused topics are shown unchanged, so none of these passes by timing out.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed, TopicAuthorizationFailedError
from aiokafka.protocol.metadata import MetadataRequest

from services.contracts.bubuh.v1 import channel_pb2, purchase_pb2, quota_pb2
from services.kernel import access, events, kafka_auth, topics
from tests import stack
from tests.flows import auth, kafka_submission, order_body, wait_for

pytestmark = pytest.mark.skipif(
    stack.Settings().kafka_security_protocol.upper() == "PLAINTEXT", reason="the broker is not secured")


async def _producer(settings, credential, **extra) -> AIOKafkaProducer:
    p = AIOKafkaProducer(**kafka_auth.aiokafka_options(settings, credential), acks="all",
                         request_timeout_ms=10_000, **extra)
    await p.start()
    return p


async def _end_offsets(settings, *names: str) -> dict[str, int]:
    """As the platform principal (which may read every topic of this test)."""
    from services.kernel.kafka_clients import build_consumer
    consumer = build_consumer(settings, group_id=None, client_id="security-probe")
    await consumer.start()
    try:
        out = {}
        for name in names:
            topic = settings.topic(name)
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                await consumer._client.force_metadata_update()  # noqa: SLF001
                parts = consumer.partitions_for_topic(topic) or set()
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
            out[name] = sum(ends.values())
        return out
    finally:
        await consumer.stop()


async def _refused(producer: AIOKafkaProducer, record: events.Outgoing) -> None:
    started = time.monotonic()
    with pytest.raises(TopicAuthorizationFailedError):
        await producer.send_and_wait(record.topic, record.value, key=record.key, headers=record.headers)
    # the broker said no; a refusal by timeout would take request_timeout_ms
    assert time.monotonic() - started < 8


def _purchase_confirmed(settings, channel_id: str) -> events.Outgoing:
    msg = purchase_pb2.PurchaseConfirmed(purchase_id=str(uuid.uuid4()), channel_id=channel_id, account_id="acct-1",
                                         channel_order_id="forged-1", quantity=7, amount=70_000)
    return events.outgoing(settings.topic(topics.PURCHASE_EVENTS.name), events.account_key(channel_id, "acct-1"),
                           events.envelope(msg, producer="purchase"))


def _quota_reserved(settings, channel_id: str) -> events.Outgoing:
    msg = quota_pb2.QuotaReserved(channel_id=channel_id, account_id="acct-1", request_id=str(uuid.uuid4()))
    return events.outgoing(settings.topic(topics.QUOTA_EVENTS.name), events.account_key(channel_id, "acct-1"),
                           events.envelope(msg, producer="quota"))


def _channel_record(settings, channel_id: str) -> events.Outgoing:
    msg = channel_pb2.Channel(channel_id=channel_id, name="hijacked", status="active",
                              api_key_sha256=["00" * 32], webhook_url="http://127.0.0.1:9/steal", version=10**9)
    return events.outgoing(settings.topic(topics.CHANNEL.name), channel_id, events.envelope(msg, producer="purchase"))


async def test_a_channel_credential_writes_purchase_submitted_and_nothing_else(settings, api, channel):
    credential = (channel["kafka_username"], channel["kafka_password"])
    assert credential[0] == access.channel_user(channel["channel_id"])
    watched = (topics.PURCHASE_EVENTS.name, topics.QUOTA_EVENTS.name, topics.CHANNEL.name)
    before = await _end_offsets(settings, *watched)

    producer = await _producer(settings, credential, enable_idempotence=True)
    try:
        # the doors it has not
        await _refused(producer, _purchase_confirmed(settings, channel["channel_id"]))
        await _refused(producer, _quota_reserved(settings, channel["channel_id"]))
        await _refused(producer, _channel_record(settings, channel["channel_id"]))
        assert await _end_offsets(settings, *watched) == before, "a refused record reached a topic"
        # the door it has: a signed submission is acknowledged (acks=all, idempotent, as a Java client sends)
        # and credited; the forged confirmation's 7 units never were
        submission = kafka_submission(settings, channel, order_body(quantity=2, account="acct-1"))
        meta = await producer.send_and_wait(submission.topic, submission.value, key=submission.key,
                                            headers=submission.headers)
        assert meta.offset >= 0
    finally:
        await producer.stop()

    async def balance() -> dict | None:
        r = await api.get("/v1/accounts/acct-1/quota", headers=auth(channel))
        return r.json() if r.status_code == 200 and r.json()["credited"] else None
    assert (await wait_for(balance, what="the signed purchase credited"))["credited"] == 2


async def test_a_channel_credential_cannot_read(settings, channel):
    from services.kernel.kafka_clients import build_consumer
    credential = (channel["kafka_username"], channel["kafka_password"])
    consumer = build_consumer(settings, settings.topic(topics.PURCHASE_EVENTS.name), group_id=None,
                              client_id="channel-reader", credential=credential)
    with pytest.raises(TopicAuthorizationFailedError):
        await consumer.start()
        await consumer.getmany(timeout_ms=5000)
    await consumer.stop()


@pytest.fixture
def service_principals(settings):
    """Each service's principal with its rights on this test's topics (disabled afterwards)."""
    admin = stack.access_admin()
    made = {}
    for service, rights in access.SERVICES.items():
        user = f"{settings.topic_prefix}{service}"
        made[service] = access.create_principal(admin, settings, user, access.service_bindings(settings, user, rights))
    yield made
    for user, _ in made.values():
        admin.revoke_all(user)
        admin.disable_user(user)


@pytest.mark.parametrize("service, own, foreign", [
    ("notification", topics.NOTIFICATION_DLQ, topics.QUOTA_EVENTS),
    ("purchase", topics.PURCHASE_EVENTS, topics.QUOTA_EVENTS),
    ("quota", topics.QUOTA_EVENTS, topics.PURCHASE_EVENTS),
    ("stamping", topics.STAMP_EVENTS, topics.CHANNEL),
])
async def test_a_service_principal_writes_its_own_topics_only(settings, service_principals, service, own, foreign):
    await topics.ensure(settings)
    before = await _end_offsets(settings, foreign.name)
    producer = await _producer(settings, service_principals[service])
    try:
        await producer.send_and_wait(settings.topic(own.name), b"own", key=b"k")   # its credential works
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(settings.topic(foreign.name), b"forged", key=b"k")
    finally:
        await producer.stop()
    assert await _end_offsets(settings, foreign.name) == before


async def test_without_a_credential_nothing_connects(settings, local_stack):
    host, port = settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)
    # a plaintext client: the SASL listener answers its first request by closing the connection
    conn = await create_conn(host, int(port), request_timeout_ms=5000)
    started = time.monotonic()
    with pytest.raises(KafkaConnectionError):
        await conn.send(MetadataRequest([]))
    assert time.monotonic() - started < 4, "refused by timeout, not by the broker"
    conn.close()
    # a wrong password, and a user that does not exist: the broker's SASL authentication fails
    for credential in ((settings.kafka_credential()[0], "not-the-password"), ("nobody-" + uuid.uuid4().hex, "x")):
        with pytest.raises(SaslAuthenticationFailed):
            await create_conn(host, int(port), request_timeout_ms=5000, security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=credential[0],
                              sasl_plain_password=credential[1])
    # and the ordinary producer does not start
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=5000)
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(p.start(), 10)
    await p.stop()


async def test_suspend_takes_the_channel_kafka_credential_away(settings, channel):
    from tests.platform import cli
    credential = (channel["kafka_username"], channel["kafka_password"])
    assert access.authenticates(settings, credential)
    cli(settings, "channel", "suspend", channel["channel_id"])
    assert not access.authenticates(settings, credential)
    assert stack.access_admin().acls(access.principal(credential[0])) == []
    out = cli(settings, "channel", "activate", channel["channel_id"], "--json").stdout
    import json
    renewed = json.loads(out)
    assert renewed["kafka_password"] != credential[1]
    assert access.authenticates(settings, (renewed["kafka_username"], renewed["kafka_password"]))


async def test_the_platform_runs_on_exactly_the_platform_principals_acls(settings):
    """Not the test prefix's blanket ACLs: the union of the services' rights, as `make run` has them."""
    import httpx

    from tests.flows import buy
    from tests.platform import PlatformProcess, add_channel

    admin = stack.access_admin()
    await topics.ensure(settings, as_admin=True)           # topic creation is the admin's
    user = f"{settings.topic_prefix}platform"
    credential = await asyncio.to_thread(
        access.create_principal, admin, settings, user,
        access.service_bindings(settings, user, access.platform_rights()))
    exact = settings.model_copy(update={"kafka_username": credential[0], "kafka_password": credential[1]})
    proc = await PlatformProcess(exact).start()
    try:
        channel = add_channel(exact)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{exact.http_port}", timeout=30) as api:
            await buy(api, channel, "acct-exact", 3)
        denied = [r for r in proc.log_records() if "authoriz" in str(r).lower()]
        assert not denied, denied[:3]
    finally:
        await proc.stop()
        admin.revoke_all(user)
        admin.disable_user(user)


async def test_the_monitor_principal_sees_lag_and_can_read_or_join_nothing(settings):
    """What a lag exporter does (list groups, their committed offsets, the topics' end offsets) works
    with ``bubuh kafka principal monitor``'s ACLs; reading records or joining a group does not."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import GroupAuthorizationFailedError

    from services.kernel.kafka_clients import build_consumer

    admin = stack.access_admin()
    await topics.ensure(settings)
    name = settings.topic(topics.QUOTA_EVENTS.name)
    group = settings.group("notification.intake")
    # the platform's consumer group commits an offset on quota.events, as the notification tier would
    platform = await _producer(settings, settings.kafka_credential())
    try:
        await platform.send_and_wait(name, b"x", key=b"k", partition=0)
    finally:
        await platform.stop()
    committer = build_consumer(settings, group_id=group, client_id="monitor-probe")
    await committer.start()
    try:
        committer.assign([TopicPartition(name, 0)])
        await committer.commit({TopicPartition(name, 0): 1})
    finally:
        await committer.stop()

    user = f"{settings.topic_prefix}monitor"
    credential = await asyncio.to_thread(access.create_principal, admin, settings, user,
                                         access.monitor_bindings(settings, user))
    monitor = settings.model_copy(update={"kafka_username": credential[0], "kafka_password": credential[1]})
    try:
        client = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(monitor))
        await client.start()
        try:
            assert group in [g for g, *_ in await client.list_consumer_groups()]
            offsets = await client.list_consumer_group_offsets(group)
            assert offsets[TopicPartition(name, 0)].offset == 1
        finally:
            await client.close()
        probe = AIOKafkaConsumer(**kafka_auth.aiokafka_options(monitor), group_id=None)
        await probe.start()
        try:
            ends = await probe.end_offsets([TopicPartition(name, 0)])
            assert ends[TopicPartition(name, 0)] >= 1
            probe.assign([TopicPartition(name, 0)])
            probe.seek(TopicPartition(name, 0), 0)
            with pytest.raises(TopicAuthorizationFailedError):     # a record read would fail this test
                await probe.getmany(timeout_ms=5000)
                await asyncio.wait_for(probe.getone(), 10)
        finally:
            await probe.stop()
        joiner = AIOKafkaConsumer(name, **kafka_auth.aiokafka_options(monitor), group_id=group)
        with pytest.raises((GroupAuthorizationFailedError, TopicAuthorizationFailedError)):
            await joiner.start()
            await asyncio.wait_for(joiner.getone(), 10)
        await joiner.stop()
    finally:
        admin.revoke_all(user)
        admin.disable_user(user)


async def test_a_restarted_broker_still_knows_everyone_after_suspensions(tmp_path, settings):
    """A restart keeps every live credential and keeps suspended channels locked out (suspension
    disables a credential rather than deleting it: docs/kafka-access.md tells why)."""
    if not stack.managed_kafka():
        pytest.skip("needs the local stack's Kafka scripts and jars")
    broker = stack.OwnKafka(tmp_path)
    await asyncio.to_thread(broker.start)
    try:
        own = broker.settings(settings)
        admin = access.AccessAdmin(own)
        platform = await asyncio.to_thread(access.setup_local_platform, admin, own)
        # six channels, added and suspended the way `bubuh channel add` and `suspend` change them
        # (access.create_principal, then revoke_all + disable_user)
        suspended = []
        for i in range(6):
            user = f"{access.CHANNEL_USER_PREFIX}{own.topic_prefix}{i}"
            suspended.append(access.create_principal(admin, own, user, access.channel_bindings(own, user)))
            admin.revoke_all(user)
            admin.disable_user(user)
        for credential in suspended:
            assert not access.authenticates(own, credential)

        before = broker.pid()
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)
        assert broker.pid() != before, "the broker was not restarted"

        for credential in (own.kafka_credential(admin=True), platform):
            access.wait_authenticates(own, credential, timeout_s=30)
        for credential in suspended:
            assert not access.authenticates(own, credential), f"{credential[0]} logs in again after a restart"
    finally:
        await asyncio.to_thread(broker.stop)
