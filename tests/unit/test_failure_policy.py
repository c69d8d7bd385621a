"""The failure classification and the dead-letter limit: the rules the README's failure policy states."""

from __future__ import annotations

import errno

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError

from services.kernel import errors
from services.kernel.database import ssl_mode
from services.kernel.failures import Kind, classify
from services.kernel.processing.deadletter import DlqLimit, DlqWatch
from services.kernel.settings import Settings


@pytest.mark.parametrize(("exc", "kind", "state"), [
    (asyncpg.exceptions.ReadOnlySQLTransactionError("read-only"), Kind.OUTAGE, "25006"),
    (asyncpg.exceptions.AdminShutdownError("terminating"), Kind.OUTAGE, "57P01"),
    (asyncpg.exceptions.CrashShutdownError("crash"), Kind.OUTAGE, "57P02"),
    (asyncpg.exceptions.CannotConnectNowError("starting up"), Kind.OUTAGE, "57P03"),
    (asyncpg.exceptions.TooManyConnectionsError("too many"), Kind.OUTAGE, "53300"),
    (asyncpg.exceptions.DiskFullError("disk full"), Kind.OUTAGE, "53100"),
    (asyncpg.exceptions.OutOfMemoryError("oom"), Kind.OUTAGE, "53200"),
    (asyncpg.exceptions.SerializationError("serialize"), Kind.TRANSIENT, "40001"),
    (asyncpg.exceptions.DeadlockDetectedError("deadlock"), Kind.TRANSIENT, "40P01"),
    (asyncpg.exceptions.LockNotAvailableError("nowait"), Kind.TRANSIENT, "55P03"),
    (asyncpg.exceptions.QueryCanceledError("statement timeout"), Kind.SUSPECT, "57014"),
    (asyncpg.exceptions.ProtocolViolationError("protocol"), Kind.SUSPECT, "08P01"),
    (asyncpg.exceptions.UniqueViolationError("dup"), Kind.CRASH, "23505"),
    (asyncpg.exceptions.UndefinedColumnError("no column"), Kind.CRASH, "42703"),
])
def test_database_errors_are_classified_by_sqlstate(exc, kind, state):
    failure = classify(exc)
    assert (failure.kind, failure.sqlstate) == (kind, state)


@pytest.mark.parametrize(("exc", "kind"), [
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Kind.OUTAGE),
    (ConnectionResetError(errno.ECONNRESET, "reset"), Kind.OUTAGE),
    (OSError(errno.EHOSTUNREACH, "no route"), Kind.OUTAGE),
    (asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation"), Kind.OUTAGE),
    (KafkaConnectionError("broker away"), Kind.OUTAGE),
    (errors.BubuhError(errors.UNAVAILABLE, "kafka did not ack"), Kind.OUTAGE),
    (TimeoutError(), Kind.SUSPECT),
    (asyncpg.exceptions.InterfaceError("another operation is in progress"), Kind.SUSPECT),
    (errors.BubuhError(errors.SIGNATURE_INVALID, "forged"), Kind.BAD),
    (FileNotFoundError(errno.ENOENT, "a file, not the network"), Kind.CRASH),
    (KeyError("bug"), Kind.CRASH),
])
def test_other_failures_are_classified_by_cause(exc, kind):
    assert classify(exc).kind is kind


def test_waiting_kinds_are_never_dead_letter_material():
    assert classify(asyncpg.exceptions.ReadOnlySQLTransactionError("x")).waits
    assert classify(asyncpg.exceptions.QueryCanceledError("x")).waits
    assert not classify(KeyError("bug")).waits
    assert not classify(errors.BubuhError(errors.EVENT_MALFORMED)).waits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_dead_letter_limit_trips_on_consecutive_dead_letters_and_a_success_resets_it():
    watch = DlqWatch(DlqLimit(max_consecutive=3, max_ratio=0), clock=Clock())
    for _ in range(3):
        assert watch.would_exceed() is None
        watch.dead_lettered()
    assert "4 dead letters in a row" in watch.would_exceed()
    watch.handled()
    assert watch.would_exceed() is None


def test_dead_letter_limit_trips_on_the_ratio_within_the_window_only():
    clock = Clock()
    watch = DlqWatch(DlqLimit(max_consecutive=0, max_ratio=0.5, window_s=10, min_records=10), clock=clock)
    for _ in range(5):
        watch.handled()
        watch.dead_lettered()          # alternate: never consecutive, 50% exactly
    assert watch.would_exceed() is not None   # the 11th record, a dead letter, would make 6/11 > 50%
    clock.now = 11                     # the window moved on: the old records no longer count
    assert watch.would_exceed() is None
    watch.handled(9)
    assert watch.would_exceed() is None


def test_loopback_database_skips_tls_and_other_hosts_keep_the_urls_choice():
    def mode(url: str, setting: str = "auto") -> str | None:
        return ssl_mode(Settings(database_url=url, database_ssl=setting))
    assert mode("postgresql://u:p@127.0.0.1:15432/db") == "disable"
    assert mode("postgresql://u:p@localhost/db") == "disable"
    assert mode("postgresql://u:p@[::1]:5432/db") == "disable"
    assert mode("postgresql://u:p@db.internal:5432/db") is None
    assert mode("postgresql://u:p@127.0.0.1/db?sslmode=require") is None   # the URL said so
    assert mode("postgresql://u:p@127.0.0.1/db", "verify-full") == "verify-full"


def test_text_the_database_cannot_store_is_the_inputs_fault():
    """A NUL in a query parameter or a record's text: PostgreSQL refuses the character (22021);
    that is bad input (a coded 4xx, a dead letter), not a platform crash (a 500, crash retries)."""
    exc = asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence for encoding \"UTF8\": 0x00")
    failure = classify(exc)
    assert (failure.kind, failure.sqlstate) == (Kind.BAD, "22021")
