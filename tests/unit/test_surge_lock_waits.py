"""The surge report's reading of PostgreSQL's lock-wait lines (loadtests/surge.py), on lines as this
box's PostgreSQL 15 wrote them (default ``log_line_prefix``), with other backends' lines between."""

# ruff: noqa: E501 - the log lines are PostgreSQL's, verbatim
from __future__ import annotations

from loadtests.surge import described_waits, lock_waits

LOG = """\
2026-12-04 17:11:53.735 UTC [17290] bubuh@bubuh LOG:  process 17290 still waiting for ShareLock on transaction 2456720 after 50.423 ms
2026-12-04 17:11:53.735 UTC [17290] bubuh@bubuh DETAIL:  Process holding the lock: 17268. Wait queue: 17290.
2026-12-04 17:11:53.736 UTC [17301] bubuh@bubuh LOG:  duration: 2.1 ms  statement: SELECT 1
2026-12-04 17:11:53.735 UTC [17290] bubuh@bubuh CONTEXT:  while locking tuple (8,79) in relation "accounts"
2026-12-04 17:11:53.735 UTC [17290] bubuh@bubuh STATEMENT:  WITH held AS MATERIALIZED (SELECT channel_id, account_id FROM accounts)
\tSELECT 1
2026-12-04 17:11:53.753 UTC [17290] bubuh@bubuh LOG:  process 17290 acquired ShareLock on transaction 2456720 after 69.306 ms
2026-12-04 17:11:53.753 UTC [17290] bubuh@bubuh CONTEXT:  while locking tuple (8,79) in relation "accounts"
2026-12-04 18:47:03.271 UTC [5873] bubuh@bubuh LOG:  process 5873 still waiting for AccessExclusiveLock on object 0 of class 1262 of database 0 after 50.124 ms
2026-12-04 18:47:03.271 UTC [5873] bubuh@bubuh DETAIL:  Process holding the lock: 5680. Wait queue: 5873.
2026-12-04 18:47:03.280 UTC [5873] bubuh@bubuh LOG:  statement: COMMIT
"""


def test_each_wait_is_read_with_its_relation_statement_holder_and_whole_time():
    waits = lock_waits(LOG)
    assert len(waits) == 2
    first, second = waits
    assert first == {"lock": "ShareLock on transaction 2456720", "waited_ms": 69.306,
                     "in": 'while locking tuple (8,79) in relation "accounts"',
                     "statement": "WITH held AS MATERIALIZED (SELECT channel_id, account_id FROM accounts)",
                     "holder": "Process holding the lock: 17268. Wait queue: 17290."}
    # never logged as acquired: the time it had waited when it was last seen, and no relation
    assert second["waited_ms"] == 50.124 and second["in"] == ""
    assert second["holder"] == "Process holding the lock: 5680. Wait queue: 5873."


def test_the_report_says_how_long_and_on_what():
    assert described_waits([]) == "0"
    assert described_waits(lock_waits(LOG)) == (
        "2 (69.3 ms, accounts; 50.1 ms, AccessExclusiveLock on object 0 of class 1262 of database 0)")
    assert described_waits(lock_waits(LOG) * 3, at_most=2).endswith("; 4 more)")
    # results written before: the log line itself
    old = ("2026-12-04 17:06:03.109 UTC [15748] bubuh@bubuh LOG:  process 15748 still waiting for ShareLock on "
           "transaction 2420387 after 50.078 ms")
    assert described_waits([old]) == "1 (50.1 ms, ShareLock on transaction 2420387)"
