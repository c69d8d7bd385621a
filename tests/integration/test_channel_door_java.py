"""The Kafka door as a stranger implements it: ``tests/tools/ChannelClient.java``, written from
``docs/channels.md`` alone (Kafka's Java client, the protobuf wire format by hand, the JDK's HMAC).

A channel registered through the platform's own admin path publishes its purchases with that client;
the platform's purchase and quota consumers credit each order once, even when the client sends every
record twice; a record signed with the wrong secret is dead-lettered and credits nothing. The client's
bytes for the document's worked example are the document's bytes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import tempfile
from collections import Counter

import httpx

from services.kernel import kafka_auth, topics
from services.kernel.processing.deadletter import DLQ_REASON
from services.kernel.settings import REPO_ROOT
from tests import channeldoc
from tests.flows import auth, read_topic, wait_for
from tests.javaproducer import run_java
from tests.platform import PlatformProcess, add_channel

CLIENT = REPO_ROOT / "tests" / "tools" / "ChannelClient.java"
ORDERS = 50
ACCOUNTS = 7


def sasl_properties(settings, channel: dict) -> dict[str, str]:
    """The channel's own Kafka credential, as `bubuh channel add` printed it (docs/channels.md), as the
    producer properties a Java channel sets; nothing on a broker without authentication."""
    if "kafka_username" not in channel:
        return {}
    props = kafka_auth.java_properties(settings, (channel["kafka_username"], channel["kafka_password"]))
    props.pop("bootstrap.servers", None)
    return props


def channel_client(settings, channel: dict, orders: list[tuple], *, secret: str | None = None,
                   extra: list[str] | None = None) -> str:
    lines = "".join("\t".join(str(f) for f in o) + "\n" for o in orders)
    args = ["--channel-id", channel["channel_id"], "--secret", secret or channel["hmac_secret"], *(extra or [])]
    config = None
    try:
        if "--dry-run" not in args:
            args = ["--bootstrap", settings.kafka_bootstrap,
                    "--topic", settings.topic(topics.PURCHASE_SUBMITTED.name), *args]
            properties = sasl_properties(settings, channel)
            if properties:
                # in a file only we can read: a password on a command line is visible to every user
                with tempfile.NamedTemporaryFile("w", prefix="bubuh-channel-", suffix=".properties",
                                                 delete=False) as config:
                    os.chmod(config.name, 0o600)
                    for name, value in properties.items():
                        config.write(f"{name}={value.replace(chr(92), chr(92) * 2)}\n")
                args += ["--client-config", config.name]
        out = run_java(settings, str(CLIENT), *args, stdin=lines, timeout=120)
    finally:
        if config is not None:
            os.unlink(config.name)
    if out.returncode != 0:
        raise AssertionError(f"ChannelClient exited {out.returncode}: {out.stdout}\n{out.stderr[-4000:]}")
    return out.stdout


def _order(i: int) -> tuple:
    quantity = 1 + i % 3
    paid_at = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)).astimezone(dt.timezone(dt.timedelta(hours=7)))
    return (f"JV-{secrets.token_hex(4)}-{i}", f"java-{i % ACCOUNTS}", quantity, quantity * 10_000,
            paid_at.isoformat(timespec="seconds"), f"VA-{i}")


async def test_purchases_published_by_the_java_client_are_credited_once(java_kafka, settings):
    # the credential exactly as the command prints it (tests elsewhere add channels in process)
    channel = await asyncio.to_thread(add_channel, settings, "java-door", by_cli=True)
    proc = await PlatformProcess(settings, api="purchase,quota", workers="purchase,quota").start()
    try:
        orders = [_order(i) for i in range(ORDERS)]
        forged = ("JV-forged", "java-forged", 3, 30_000, orders[0][4], "VA-forged")
        sent = await asyncio.to_thread(channel_client, settings, channel, orders)
        assert sent.strip() == f"sent {ORDERS}"
        # a channel that is unsure re-sends: new event ids, same orders, another codec
        resent = await asyncio.to_thread(channel_client, settings, channel, orders, extra=["--compression", "gzip"])
        assert resent.strip() == f"sent {ORDERS}"
        wrong = await asyncio.to_thread(channel_client, settings, channel, [forged], secret="f" * 64)
        assert wrong.strip() == "sent 1"

        want = Counter()
        for o in orders:
            want[o[1]] += o[2]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10) as api:
            async def quota(account: str) -> dict:
                r = await api.get(f"/v1/accounts/{account}/quota", headers=auth(channel))
                return r.json() if r.status_code == 200 else {"credited": 0}

            async def all_credited():
                got = {a: (await quota(a))["credited"] for a in want}
                return got if got == dict(want) else None

            await wait_for(all_credited, timeout=90, what=f"{ORDERS} Java-published purchases credited")
            dlq = await read_topic(settings, topics.PURCHASE_DLQ.name, at_least=1, timeout=30)
            assert [dict(r.headers)[DLQ_REASON] for r in dlq] == [b"SIGNATURE_INVALID"]
            assert (await quota("java-forged"))["credited"] == 0
            # nothing was credited twice while the duplicates were read
            assert {a: (await quota(a))["credited"] for a in want} == dict(want)
    finally:
        await proc.stop()


def test_the_java_client_reproduces_the_documented_example(java_kafka, settings):
    """The document's bytes and HMAC are what an implementation from the document produces."""
    doc = channeldoc.value
    channel = {"channel_id": doc("channel_id"), "hmac_secret": doc("secret")}
    order = (doc("channel_order_id"), doc("account_id"), doc("quantity"), doc("amount"), doc("paid_at"),
             doc("payment_ref"))
    out = channel_client(settings, channel, [order], extra=[
        "--dry-run", "--event-id", doc("event_id"), "--trace-id", doc("trace_id"), "--occurred-at", doc("occurred_at")])
    value_hex, signature = out.strip().split("\t")
    assert bytes.fromhex(value_hex) == channeldoc.record_value()
    assert signature == channeldoc.value("bubuh-hmac")

