"""What a failure means, decided by its cause: the one classification every consumer and door uses.

- ``outage``: a dependency cannot serve now (connection lost, read-only after a failover, shutting
  down or starting up, too many connections, disk full, out of memory, Kafka unavailable). Waited
  out: the consumer pauses the partition and resumes the same record; an HTTP door answers without
  the database, or 503 with ``Retry-After``. Never a dead letter.
- ``transient``: one transaction lost a race (serialization failure, deadlock, lock not available).
  Retried in place at once; the next attempt normally succeeds.
- ``suspect``: could be the record, could be the server (statement timeout or cancel, a client
  timeout, a protocol or interface error). Retried a few times; if it still fails while a health
  probe of the database succeeds, the record is treated as bad, so one record cannot stall a
  partition forever.
- ``bad``: a ``BubuhError`` with a non-retryable code: the record is wrong; dead-letter it at once.
- ``crash``: anything else, i.e. a bug. Retried through the durable retry path a bounded number of
  times, then dead-lettered as ``HANDLER_CRASHED``.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from enum import StrEnum

import asyncpg
from aiokafka.errors import KafkaError

from services.kernel import errors
from services.kernel.metrics import FAILURES


class Kind(StrEnum):
    OUTAGE = "outage"
    TRANSIENT = "transient"
    SUSPECT = "suspect"
    BAD = "bad"
    CRASH = "crash"


# SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html)
_OUTAGE_STATES = {
    "25006",                      # read_only_sql_transaction: a standby, or a primary being demoted
    "57P01", "57P02", "57P03",    # admin_shutdown, crash_shutdown, cannot_connect_now (starting, recovering)
    "53300", "53100", "53200",    # too_many_connections, disk_full, out_of_memory
    "53000",                      # insufficient_resources
    "08000", "08001", "08003", "08004", "08006",   # connection exceptions
    "58030",                      # io_error
}
_TRANSIENT_STATES = {"40001", "40P01", "55P03"}   # serialization_failure, deadlock_detected, lock_not_available
_SUSPECT_STATES = {"57014", "08P01"}              # query_canceled (statement timeout or a cancel), protocol_violation
# the input's own text: a NUL, or a character the database encoding cannot hold
_BAD_INPUT_STATES = {"22021", "22P05"}            # character_not_in_repertoire, untranslatable_character

_NETWORK_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.ETIMEDOUT,
                   errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE}


@dataclass(frozen=True)
class Failure:
    kind: Kind
    sqlstate: str = ""

    @property
    def waits(self) -> bool:
        """An outage, or a failure that did not point at the record: the work is worth doing later."""
        return self.kind in (Kind.OUTAGE, Kind.TRANSIENT, Kind.SUSPECT)


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, errors.BubuhError):
        return Failure(Kind.OUTAGE if exc.code.retryable else Kind.BAD)
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state in _SUSPECT_STATES:
            return Failure(Kind.SUSPECT, state)
        if state in _OUTAGE_STATES or state.startswith("08"):
            return Failure(Kind.OUTAGE, state)
        if state in _TRANSIENT_STATES:
            return Failure(Kind.TRANSIENT, state)
        if state in _BAD_INPUT_STATES:
            return Failure(Kind.BAD, state)
        return Failure(Kind.CRASH, state)
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return Failure(Kind.OUTAGE)                 # the connection was lost mid-operation
    if isinstance(exc, asyncpg.exceptions.InterfaceError | asyncpg.exceptions.InternalClientError):
        return Failure(Kind.SUSPECT)
    if isinstance(exc, TimeoutError):
        return Failure(Kind.SUSPECT)                # a client-side timeout: slow server, or a slow record
    if isinstance(exc, ConnectionError | socket.gaierror | KafkaError):
        return Failure(Kind.OUTAGE)
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return Failure(Kind.OUTAGE)
    return Failure(Kind.CRASH)


def observe(component: str, exc: BaseException) -> Failure:
    """Classify ``exc`` and count it in ``bubuh_failures_total``."""
    failure = classify(exc)
    FAILURES.labels(component, failure.kind.value, failure.sqlstate).inc()
    return failure
