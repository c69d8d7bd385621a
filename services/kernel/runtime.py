"""The process around the services: connect, check, migrate, run until SIGTERM, stop cleanly.

A service package exposes ``NAME``, ``router(rt)`` (its HTTP routes) and ``workers(rt)`` (its
long-running tasks: consumer loops, outbox relay, timers). One process can run any mix of them:
all in one for ``make run``, one tier per process in production.

Bad configuration stops the process with one ``ConfigError`` line that says what and how to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import asyncpg
from aiokafka.errors import KafkaError

from services.kernel import database, logs, migrations, topics
from services.kernel.channels import ChannelView
from services.kernel.errors import ConfigError  # where the services import it from
from services.kernel.producer import Producer
from services.kernel.settings import Settings

log = logs.get(__name__)

Task = Callable[[asyncio.Event], Awaitable[None]]


@dataclass
class Runtime:
    settings: Settings
    producer: Producer
    channels: ChannelView
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    background: list[Task] = field(default_factory=list)   # tasks an API router needs running beside it
    _pools: dict[str, asyncpg.Pool] = field(default_factory=dict)

    async def pool(self, service: str) -> asyncpg.Pool:
        """The service's pool on its own schema, migrated on first use."""
        if service not in self._pools:
            pool = await connect_database(self.settings, service)
            await migrations.migrate_service(pool, self.settings, service)
            self._pools[service] = pool
        return self._pools[service]

    async def close(self) -> None:
        for pool in self._pools.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)
        self._pools.clear()


def _db_where(url: str) -> str:
    u = urlsplit(url)
    return f"{u.hostname}:{u.port or 5432}{u.path or ''}"


async def connect_database(settings: Settings, service: str) -> asyncpg.Pool:
    where = _db_where(settings.database_url)
    try:
        return await asyncio.wait_for(database.create_pool(settings, service), 15)
    except asyncpg.InvalidPasswordError:
        raise ConfigError(f"PostgreSQL at {where} refused the password: check BUBUH_DATABASE_URL") from None
    except asyncpg.InvalidCatalogNameError:
        raise ConfigError(
            f"PostgreSQL at {where} has no such database: create it or fix BUBUH_DATABASE_URL") from None
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as exc:
        raise ConfigError(
            f"cannot connect to PostgreSQL at {where} ({type(exc).__name__}: {exc}): "
            "start the local stack with `make up`, or fix BUBUH_DATABASE_URL") from None


@contextlib.contextmanager
def _quiet(logger_name: str):
    """While probing a dependency, its client library's own error lines would bury our one line."""
    lib = logging.getLogger(logger_name)
    level = lib.level
    lib.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lib.setLevel(level)


async def connect_kafka(settings: Settings, client_id: str) -> Producer:
    try:
        producer = Producer(settings, client_id=client_id)
    except ValueError as exc:           # no credential configured (kafka_auth / Settings.kafka_credential)
        raise ConfigError(str(exc)) from None
    try:
        with _quiet("aiokafka"):
            await asyncio.wait_for(producer.start(), 20)
    except (TimeoutError, KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise ConfigError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} ({type(exc).__name__}): "
            "start the local stack with `make up`, or fix BUBUH_KAFKA_BOOTSTRAP (and, on a secured broker, "
            "BUBUH_KAFKA_SECURITY_PROTOCOL / BUBUH_KAFKA_USERNAME / BUBUH_KAFKA_PASSWORD)") from None
    return producer


def check_port_free(host: str, port: int, setting: str = "BUBUH_HTTP_PORT", shared: bool = False) -> None:
    """``shared``: members of one API (``BUBUH_HTTP_REUSE_PORT``) may hold it already; anything else may not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ConfigError(
                f"port {host}:{port} is taken by another process: stop it, or set {setting}") from None


async def start(settings: Settings, client_id: str) -> Runtime:
    producer = await connect_kafka(settings, client_id)
    try:
        await asyncio.wait_for(topics.ensure(settings), 30)
    except (TimeoutError, KafkaError) as exc:
        await producer.stop()
        raise ConfigError(f"Kafka at {settings.kafka_bootstrap} did not create the topics ({exc!r})") from None
    return Runtime(settings=settings, producer=producer, channels=ChannelView(settings))


async def run_until_stopped(rt: Runtime, tasks: list[Task], *, ready: Callable[[], None] | None = None) -> None:
    """Run ``tasks`` until SIGTERM/SIGINT or until one of them fails (then stop all and re-raise)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, rt.stop.set)
    running = [asyncio.create_task(t(rt.stop), name=getattr(t, "__qualname__", "task")) for t in tasks]
    if ready:
        ready()
    stopper = asyncio.create_task(rt.stop.wait())
    try:
        waiting: set[asyncio.Task] = set(running) | {stopper}
        failed: BaseException | None = None
        while not rt.stop.is_set() and failed is None:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            # a task that simply finished (a one-off start-up step) is fine; one that failed stops all
            failed = next((t.exception() for t in done if t is not stopper and not t.cancelled()
                           and t.exception() is not None), None)
        rt.stop.set()
        _, pending = await asyncio.wait(running, timeout=15)
        for t in pending:
            t.cancel()
        if failed is not None:
            raise failed
    finally:
        stopper.cancel()
        await rt.close()
        with contextlib.suppress(Exception):
            await rt.producer.stop()
