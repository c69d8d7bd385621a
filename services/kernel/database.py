"""The PostgreSQL pool of a service, bound to that service's own schema.

Every connection's ``search_path`` is the service's schema, so SQL is written unqualified and a
service cannot read another's tables by accident. ``is_outage`` tells a dependency outage (retry
the same work later) from an error in the work itself (dead-letter it).
"""

from __future__ import annotations

import errno
import socket

import asyncpg

from services.kernel.settings import Settings

_OUTAGE_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,                           # refused, reset, aborted
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,  # starting up / shutting down
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,         # connection closed under us
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,     # a retry of the same transaction will succeed
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.InternalClientError,    # connection left mid-operation by a cancelled call
)


# network errors that are plain OSErrors (no ConnectionError subclass): unreachable, down, DNS
_OUTAGE_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.ETIMEDOUT}


def is_outage(exc: BaseException) -> bool:
    """A dependency is away (wait and retry the same work), as opposed to a bad record (dead-letter it).

    A file error in a handler is not an outage: only network-level failures and the database's
    own "cannot serve now" errors are.
    """
    if isinstance(exc, _OUTAGE_TYPES):
        return True
    if isinstance(exc, socket.gaierror):
        return True
    return isinstance(exc, OSError) and exc.errno in _OUTAGE_ERRNOS


async def create_pool(settings: Settings, service: str, *, min_size: int | None = None,
                      max_size: int | None = None) -> asyncpg.Pool:
    schema = settings.schema(service)
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min if min_size is None else min_size,
        max_size=max_size or settings.db_pool_max,
        command_timeout=settings.db_command_timeout_s,
        server_settings={"search_path": schema, "application_name": f"bubuh-{service}"},
    )
