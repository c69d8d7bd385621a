"""The channel registry: the purchase service's table, mirrored to the compacted ``channel`` topic.

Every change bumps the channel's ``version`` and queues the full record in the outbox in the same
transaction, so the topic (and every service's in-memory view) converges on the table.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass

import asyncpg

from services.contracts.bubuh.v1 import channel_pb2
from services.kernel import events, outbox, sealed, topics
from services.kernel import webhook_targets as targets
from services.kernel.channels import api_key_hash
from services.kernel.document_profiles import PROFILES
from services.kernel.settings import Settings
from services.purchase import NAME

_URL = re.compile(r"^https?://[^\s]+$")


@dataclass(frozen=True)
class Credentials:
    channel_id: str
    api_key: str | None = None
    hmac_secret: str | None = None


@dataclass(frozen=True)
class ChannelSecrets:
    status: str                 # active | suspended
    accepted: list[bytes]       # the current secret, and the previous one during its grace period
    expired: list[bytes]        # the previous secret after its grace period: proves the sender, accepts nothing


class RegistryError(ValueError):
    pass


def _new_api_key() -> str:
    return "bbh_" + secrets.token_urlsafe(32)


def _new_secret() -> str:
    return secrets.token_hex(32)


class Registry:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, resolver: targets.Resolver | None = None) -> None:
        self._pool = pool
        self._settings = settings
        self._key = settings.platform_key()
        self._resolver = resolver or targets.resolver_for(settings.webhook_hosts)

    async def _check_webhook(self, webhook_url: str) -> None:
        """The target rules (services/kernel/webhook_targets.py) now; the dispatcher checks again on
        every connection, since what a name resolves to can change after registration."""
        if not webhook_url:
            return
        if not _URL.match(webhook_url):
            raise RegistryError(f"webhook URL {webhook_url!r} is not an http(s) URL")
        try:
            await targets.check_registration(webhook_url, self._resolver,
                                             local_mode=self._settings.webhook_local_mode)
        except targets.TargetRefused as exc:
            raise RegistryError(f"{exc.code.code}: webhook URL {webhook_url!r} refused: {exc.detail}. "
                                f"{exc.code.action}") from None

    async def add(self, name: str, webhook_url: str = "", default_profile: str = "standard") -> Credentials:
        if not name.strip():
            raise RegistryError("a channel needs a name")
        await self._check_webhook(webhook_url)
        if default_profile not in PROFILES:
            raise RegistryError(f"unknown profile {default_profile!r}; one of {', '.join(PROFILES)}")
        channel_id = "ch_" + secrets.token_hex(6)
        api_key, secret = _new_api_key(), _new_secret()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO channels (channel_id, name, default_profile, api_key_sha256, hmac_secret_sealed, "
                "webhook_url) VALUES ($1, $2, $3, $4, $5, $6)",
                channel_id, name.strip(), default_profile, api_key_hash(api_key),
                sealed.seal(self._key, secret.encode(), channel_id.encode()), webhook_url)
            await self._publish(conn, channel_id)
        return Credentials(channel_id, api_key, secret)

    async def rotate_key(self, channel_id: str) -> Credentials:
        api_key = _new_api_key()
        async with self._pool.acquire() as conn, conn.transaction():
            await self._update(conn, channel_id, "api_key_sha256 = $2", api_key_hash(api_key))
            await self._publish(conn, channel_id)
        return Credentials(channel_id, api_key=api_key)

    async def rotate_secret(self, channel_id: str, grace: dt.timedelta = dt.timedelta(hours=24)) -> Credentials:
        """A new HMAC secret; the old one is still accepted for ``grace`` so channels can roll over."""
        secret = _new_secret()
        until = dt.datetime.now(dt.UTC) + grace
        async with self._pool.acquire() as conn, conn.transaction():
            await self._update(conn, channel_id,
                               "previous_secret_sealed = hmac_secret_sealed, previous_secret_valid_until = $3, "
                               "hmac_secret_sealed = $2",
                               sealed.seal(self._key, secret.encode(), channel_id.encode()), until)
            await self._publish(conn, channel_id)
        return Credentials(channel_id, hmac_secret=secret)

    async def set_webhook(self, channel_id: str, webhook_url: str) -> None:
        await self._check_webhook(webhook_url)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._update(conn, channel_id, "webhook_url = $2", webhook_url)
            await self._publish(conn, channel_id)

    async def set_status(self, channel_id: str, status: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._update(conn, channel_id, "status = $2", status)
            await self._publish(conn, channel_id)

    async def list(self) -> list[asyncpg.Record]:
        return await self._pool.fetch(
            "SELECT channel_id, name, status, default_profile, webhook_url, version, created_at FROM channels "
            "ORDER BY created_at")

    async def secrets(self, conn: asyncpg.Connection, channel_id: str) -> ChannelSecrets | None:
        """The channel's status and HMAC secrets, from the authoritative table."""
        row = await conn.fetchrow("SELECT * FROM channels WHERE channel_id = $1", channel_id)
        if row is None:
            return None
        ctx = channel_id.encode()
        accepted = [sealed.unseal(self._key, row["hmac_secret_sealed"], ctx)]
        expired: list[bytes] = []
        until = row["previous_secret_valid_until"]
        if row["previous_secret_sealed"]:
            previous = sealed.unseal(self._key, row["previous_secret_sealed"], ctx)
            (accepted if until and until > dt.datetime.now(dt.UTC) else expired).append(previous)
        return ChannelSecrets(row["status"], accepted, expired)

    async def _update(self, conn: asyncpg.Connection, channel_id: str, assignments: str, *args) -> None:
        done = await conn.execute(
            f"UPDATE channels SET {assignments}, version = version + 1, updated_at = now() WHERE channel_id = $1",
            channel_id, *args)
        if done.endswith(" 0"):
            raise RegistryError(f"no channel {channel_id!r}")

    async def _publish(self, conn: asyncpg.Connection, channel_id: str) -> None:
        row = await conn.fetchrow("SELECT * FROM channels WHERE channel_id = $1", channel_id)
        until = row["previous_secret_valid_until"]
        rec = channel_pb2.Channel(
            channel_id=row["channel_id"], name=row["name"], status=row["status"],
            default_profile=row["default_profile"], api_key_sha256=[row["api_key_sha256"]],
            hmac_secret_sealed=row["hmac_secret_sealed"],
            previous_hmac_secret_sealed=row["previous_secret_sealed"] or b"",
            previous_secret_valid_until_unix=int(until.timestamp()) if until else 0,
            webhook_url=row["webhook_url"], version=row["version"])
        env = events.envelope(rec, producer=NAME)
        await outbox.add(conn, [events.outgoing(self._settings.topic(topics.CHANNEL.name), channel_id, env)])
