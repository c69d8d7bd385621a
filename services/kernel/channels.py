"""Every service's view of the channel registry, read from the compacted ``channel`` topic.

The purchase service owns the registry (its PostgreSQL table) and publishes each change; every
other service, and the HTTP intake, keeps the latest record per channel in memory. So intake
authenticates without PostgreSQL, and no service reads another's tables.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass

from aiokafka.errors import KafkaError

from services.contracts.bubuh.v1 import channel_pb2
from services.kernel import errors, events, logs, sealed, topics
from services.kernel.kafka_clients import build_consumer
from services.kernel.settings import Settings
from services.kernel.topic_reading import TopicEnd, whole_topic
from services.kernel.waiting import Pause, sleep_or_stop

log = logs.get(__name__)


def api_key_hash(api_key: str) -> str:
    # API keys are 256-bit random tokens: a fast hash is enough (no dictionary to attack).
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class ChannelInfo:
    channel_id: str
    name: str
    status: str
    default_profile: str
    webhook_url: str
    version: int

    @property
    def active(self) -> bool:
        return self.status == "active"


class ChannelView:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._key = settings.platform_key()
        self._records: dict[str, channel_pb2.Channel] = {}
        self._by_key_hash: dict[str, str] = {}
        self.loaded = asyncio.Event()
        self._changed = asyncio.Condition()

    # --- reads ---
    def get(self, channel_id: str) -> ChannelInfo | None:
        rec = self._records.get(channel_id)
        if rec is None:
            return None
        return ChannelInfo(rec.channel_id, rec.name, rec.status, rec.default_profile, rec.webhook_url, rec.version)

    def all(self) -> list[ChannelInfo]:
        return [info for cid in sorted(self._records) if (info := self.get(cid))]

    def authenticate(self, authorization: str | None) -> ChannelInfo:
        """The channel behind ``Authorization: Bearer <key>``, or a catalogued error."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise errors.BubuhError(errors.UNAUTHENTICATED, "missing `Authorization: Bearer <api key>`")
        cid = self._by_key_hash.get(api_key_hash(authorization[7:].strip()))
        info = self.get(cid) if cid else None
        if info is None:
            raise errors.BubuhError(errors.UNAUTHENTICATED, "unknown API key")
        if not info.active:
            raise errors.BubuhError(errors.CHANNEL_INACTIVE, f"channel {info.channel_id} is {info.status}")
        return info

    def channel_of(self, authorization: str | None) -> str | None:
        """The active channel behind ``Authorization``, or None (the front door's queue tickets, kernel/http.py)."""
        try:
            return self.authenticate(authorization).channel_id
        except errors.BubuhError:
            return None

    def hmac_secrets(self, channel_id: str, now: float | None = None) -> list[bytes]:
        """The secrets a channel may sign with now: the current one, and the previous during its grace."""
        rec = self._records.get(channel_id)
        if rec is None:
            return []
        ctx = channel_id.encode()
        out = [sealed.unseal(self._key, rec.hmac_secret_sealed, ctx)]
        if rec.previous_hmac_secret_sealed and (now or time.time()) < rec.previous_secret_valid_until_unix:
            out.append(sealed.unseal(self._key, rec.previous_hmac_secret_sealed, ctx))
        return out

    # --- updates ---
    def apply(self, rec: channel_pb2.Channel) -> None:
        old = self._records.get(rec.channel_id)
        if old is not None and old.version > rec.version:
            return
        if old is not None:
            for h in old.api_key_sha256:
                self._by_key_hash.pop(h, None)
        self._records[rec.channel_id] = rec
        for h in rec.api_key_sha256:
            self._by_key_hash[h] = rec.channel_id

    async def wait_for(self, channel_id: str, version: int, timeout: float = 10.0) -> None:
        """Read-your-writes: wait until this view holds ``version`` of the channel."""
        async def _seen() -> None:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: (r := self._records.get(channel_id)) is not None and r.version >= version)
        await asyncio.wait_for(_seen(), timeout)

    async def run(self, stop: asyncio.Event) -> None:
        """Read the whole compacted topic, then follow it. No consumer group: every instance reads all."""
        topic = self._settings.topic(topics.CHANNEL.name)
        consumer = build_consumer(self._settings, group_id=None, client_id="bubuh-channel-view",
                                  fetch_min_bytes=1, fetch_max_wait_ms=500)
        await consumer.start()
        try:
            tps = await whole_topic(consumer, topic, stop=stop)     # the topic may be brand new
            if tps:
                await consumer.seek_to_beginning(*tps)
            end = await TopicEnd.now(consumer, tps)
            if end.empty:
                self.loaded.set()
            pause = Pause()         # the one reconnect backoff: 0.2 s doubling to 5 s, cut short by stop
            while not stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=300)
                except KafkaError as exc:
                    log.warning("channel view fetch failed", error=repr(exc))
                    await sleep_or_stop(stop, pause.next())
                    continue
                pause.reset()
                for records in batches.values():
                    for r in records:
                        self._apply_record(r.value)
                if batches:
                    async with self._changed:
                        self._changed.notify_all()
                if not self.loaded.is_set() and await end.reached():
                    self.loaded.set()
                    log.info("channel view loaded", channels=len(self._records))
        finally:
            await consumer.stop()

    def _apply_record(self, value: bytes | None) -> None:
        if not value:
            return
        try:
            _env, payload = events.decode(value)
        except errors.BubuhError as exc:
            log.warning("skipping malformed channel record", detail=exc.detail)
            return
        if isinstance(payload, channel_pb2.Channel):
            self.apply(payload)
