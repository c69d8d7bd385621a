"""The ledger's operations. Each runs inside the caller's transaction and is idempotent by id.

Two-phase, as TigerBeetle's transfers:
- credit:  a transfer with id = purchase id; inserting it twice is impossible (primary key).
- reserve: a pending transfer with id = stamp request id and a deadline; refused when nothing is
           available (and the refusal is recorded, so a redelivery is refused the same way).
- commit:  posts the pending transfer; release / expire: voids it. A pending transfer has at most
           one resolution (unique ``pending_id``): a commit after a void is refused, never applied.

Concurrency: the account row is locked (``FOR UPDATE``) for the length of one operation, so
concurrent reservations from several instances serialise per account and never oversell; the
``available_never_negative`` constraint is the last line of defence.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from services.kernel import errors, runtime
from services.kernel.settings import Settings
from services.quota import NAME


@dataclass(frozen=True)
class Balance:
    credited: int
    pending: int
    committed: int

    @property
    def available(self) -> int:
        return self.credited - self.committed - self.pending

    def as_dict(self) -> dict[str, int]:
        return {"credited": self.credited, "pending": self.pending, "committed": self.committed,
                "available": self.available}


@dataclass(frozen=True)
class Outcome:
    """What an operation did: ``applied``, ``duplicate`` (already done: no effect), or ``refused``."""

    result: str
    balance: Balance | None = None
    code: str = ""
    deadline: dt.datetime | None = None

    @property
    def applied(self) -> bool:
        return self.result == "applied"


async def _lock_account(conn: asyncpg.Connection, channel_id: str, account_id: str) -> Balance:
    await conn.execute("INSERT INTO accounts (channel_id, account_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                       channel_id, account_id)
    row = await conn.fetchrow("SELECT credited, pending, committed FROM accounts WHERE channel_id = $1 AND "
                              "account_id = $2 FOR UPDATE", channel_id, account_id)
    return Balance(row["credited"], row["pending"], row["committed"])


async def _move(conn: asyncpg.Connection, channel_id: str, account_id: str, *, credited: int = 0, pending: int = 0,
                committed: int = 0) -> Balance:
    row = await conn.fetchrow(
        "UPDATE accounts SET credited = credited + $3, pending = pending + $4, committed = committed + $5 "
        "WHERE channel_id = $1 AND account_id = $2 RETURNING credited, pending, committed",
        channel_id, account_id, credited, pending, committed)
    return Balance(row["credited"], row["pending"], row["committed"])


async def balance(conn: asyncpg.Connection | asyncpg.Pool, channel_id: str, account_id: str) -> Balance | None:
    row = await conn.fetchrow("SELECT credited, pending, committed FROM accounts WHERE channel_id = $1 AND "
                              "account_id = $2", channel_id, account_id)
    return Balance(row["credited"], row["pending"], row["committed"]) if row else None


class Accounts:
    """The ledger's read side for the HTTP route: an account's balance, on the service's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def balance(self, channel_id: str, account_id: str) -> Balance | None:
        return await balance(self._pool, channel_id, account_id)


async def lock_accounts(conn: asyncpg.Connection, accounts: set[tuple[str, str]]) -> None:
    """Create and lock several accounts, always in (channel, account) order: no deadlock between batches."""
    ordered = sorted(accounts)
    channels, ids = [c for c, _ in ordered], [a for _, a in ordered]
    await conn.execute("INSERT INTO accounts (channel_id, account_id) SELECT c, a FROM unnest($1::text[], $2::text[]) "
                       "AS u(c, a) ORDER BY c, a ON CONFLICT DO NOTHING", channels, ids)
    await conn.execute("SELECT 1 FROM accounts WHERE (channel_id, account_id) IN "
                       "(SELECT c, a FROM unnest($1::text[], $2::text[]) AS u(c, a)) "
                       "ORDER BY channel_id, account_id FOR UPDATE", channels, ids)


async def credit(conn: asyncpg.Connection, *, purchase_id: str, channel_id: str, account_id: str, quantity: int,
                 event_id: str, locked: bool = False) -> Outcome:
    """``locked``: the caller holds the account's lock already (``lock_accounts``)."""
    if not locked:
        await _lock_account(conn, channel_id, account_id)
    inserted = await conn.fetchval(
        "INSERT INTO transfers (id, kind, channel_id, account_id, amount, event_id) "
        "VALUES ($1, 'credit', $2, $3, $4, $5) "
        "ON CONFLICT (id) DO NOTHING RETURNING 1", purchase_id, channel_id, account_id, quantity, event_id)
    if not inserted:
        return Outcome("duplicate")
    return Outcome("applied", await _move(conn, channel_id, account_id, credited=quantity))


@dataclass(frozen=True)
class Credit:
    purchase_id: str
    channel_id: str
    account_id: str
    quantity: int
    event_id: str


async def credit_many(conn: asyncpg.Connection, credits: list[Credit]) -> list[Outcome]:
    """Credit a run of purchases in two statements; the accounts must be locked (``lock_accounts``).

    Each outcome is what ``credit`` one at a time would give, in order: ``applied`` with the balance
    right after that credit, or ``duplicate`` (the purchase was credited before, or earlier in the run).
    """
    if not credits:
        return []
    inserted = {r["id"] for r in await conn.fetch(
        "INSERT INTO transfers (id, kind, channel_id, account_id, amount, event_id) "
        "SELECT i, 'credit', c, a, q, e FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[]) "
        "AS u(i, c, a, q, e) ON CONFLICT (id) DO NOTHING RETURNING id",
        [c.purchase_id for c in credits], [c.channel_id for c in credits], [c.account_id for c in credits],
        [c.quantity for c in credits], [c.event_id for c in credits])}
    applied: list[Credit | None] = []
    for c in credits:
        if c.purchase_id in inserted:
            inserted.discard(c.purchase_id)      # a second copy in the run is a duplicate
            applied.append(c)
        else:
            applied.append(None)
    totals: dict[tuple[str, str], int] = {}
    for c in applied:
        if c is not None:
            totals[(c.channel_id, c.account_id)] = totals.get((c.channel_id, c.account_id), 0) + c.quantity
    if not totals:
        return [Outcome("duplicate") for _ in credits]
    keys = sorted(totals)
    rows = await conn.fetch(
        "UPDATE accounts AS t SET credited = t.credited + u.q "
        "FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(c, a, q) "
        "WHERE t.channel_id = u.c AND t.account_id = u.a RETURNING t.channel_id, t.account_id, t.credited, "
        "t.pending, t.committed", [k[0] for k in keys], [k[1] for k in keys], [totals[k] for k in keys])
    final = {(r["channel_id"], r["account_id"]): Balance(r["credited"], r["pending"], r["committed"]) for r in rows}
    if len(final) != len(keys):
        raise RuntimeError("credit_many: an account of the run does not exist (lock_accounts creates them)")
    # the balance after each credit: walk back from the final balance
    out: list[Outcome] = [Outcome("duplicate")] * len(credits)
    running = dict(final)
    for i in range(len(credits) - 1, -1, -1):
        c = applied[i]
        if c is None:
            continue
        key = (c.channel_id, c.account_id)
        out[i] = Outcome("applied", running[key])
        b = running[key]
        running[key] = Balance(b.credited - c.quantity, b.pending, b.committed)
    return out


async def reserve(conn: asyncpg.Connection, *, request_id: str, channel_id: str, account_id: str,
                  deadline: dt.datetime, event_id: str) -> Outcome:
    bal = await _lock_account(conn, channel_id, account_id)
    prior = await conn.fetchrow("SELECT kind, code, deadline FROM transfers WHERE id = $1", request_id)
    if prior is not None:
        return Outcome("duplicate", bal, prior["code"] or "", prior["deadline"])
    if bal.available < 1:
        await conn.execute(
            "INSERT INTO transfers (id, kind, channel_id, account_id, amount, code, event_id) "
            "VALUES ($1, 'rejected', $2, $3, 0, $4, $5)",
            request_id, channel_id, account_id, errors.QUOTA_INSUFFICIENT.code, event_id)
        return Outcome("refused", bal, errors.QUOTA_INSUFFICIENT.code)
    await conn.execute(
        "INSERT INTO transfers (id, kind, channel_id, account_id, amount, deadline, event_id) "
        "VALUES ($1, 'pending', $2, $3, 1, $4, $5)", request_id, channel_id, account_id, deadline, event_id)
    await conn.execute("INSERT INTO open_reservations VALUES ($1, $2, $3, $4)", request_id, channel_id, account_id,
                       deadline)
    return Outcome("applied", await _move(conn, channel_id, account_id, pending=1), deadline=deadline)


async def _resolve(conn: asyncpg.Connection, kind: str, request_id: str, code: str, event_id: str) -> Outcome:
    pending = await conn.fetchrow("SELECT channel_id, account_id, kind FROM transfers WHERE id = $1", request_id)
    if pending is not None and pending["kind"] == "rejected" and kind == "void":
        return Outcome("duplicate")   # never reserved: nothing to release (the failed stamp was refused quota)
    if pending is None or pending["kind"] != "pending":
        return Outcome("refused", code=errors.RESERVATION_UNKNOWN.code)
    await _lock_account(conn, pending["channel_id"], pending["account_id"])
    resolution = await conn.fetchval("SELECT kind FROM transfers WHERE pending_id = $1", request_id)
    if resolution == kind:
        return Outcome("duplicate")
    if resolution is not None:   # posted when voiding, or voided when posting
        return Outcome("refused", code=errors.RESERVATION_VOIDED.code if resolution == "void"
                       else errors.RESERVATION_POSTED.code)
    await conn.execute(
        "INSERT INTO transfers (id, kind, channel_id, account_id, amount, pending_id, code, event_id) "
        "VALUES ($1, $2, $3, $4, 1, $5, $6, $7)",
        f"{request_id}:{kind}", kind, pending["channel_id"], pending["account_id"], request_id, code or None, event_id)
    await conn.execute("DELETE FROM open_reservations WHERE request_id = $1", request_id)
    moved = await _move(conn, pending["channel_id"], pending["account_id"], pending=-1,
                        committed=1 if kind == "post" else 0)
    return Outcome("applied", moved, code)


async def commit(conn: asyncpg.Connection, *, request_id: str, event_id: str) -> Outcome:
    return await _resolve(conn, "post", request_id, "", event_id)


async def release(conn: asyncpg.Connection, *, request_id: str, code: str, event_id: str) -> Outcome:
    return await _resolve(conn, "void", request_id, code, event_id)


async def due_expiries(conn: asyncpg.Connection, now: dt.datetime, limit: int = 200) -> list[str]:
    """Reservations past their deadline, locked for this sweeper (others skip them).

    Locks are taken in the order a consumer's batch takes them: the accounts first (``lock_accounts``,
    sorted), then the reservation rows. A batch resolving one of these reservations holds its account
    and then deletes the reservation row; taking the row first here would deadlock with it.
    """
    rows = await conn.fetch("SELECT request_id, channel_id, account_id FROM open_reservations WHERE deadline <= $1 "
                            "ORDER BY deadline LIMIT $2", now, limit)
    if not rows:
        return []
    await lock_accounts(conn, {(r["channel_id"], r["account_id"]) for r in rows})
    locked = await conn.fetch("SELECT request_id FROM open_reservations WHERE request_id = ANY($1::text[]) "
                              "AND deadline <= $2 ORDER BY deadline FOR UPDATE SKIP LOCKED",
                              [r["request_id"] for r in rows], now)
    return [r["request_id"] for r in locked]


async def credits_of(settings: Settings, channel_id: str) -> dict[str, dict]:
    """``credits_by_purchase`` on a pool of its own (for ``bubuh reconcile``, which runs no service)."""
    pool = await runtime.connect_database(settings, NAME)
    try:
        return await credits_by_purchase(pool, channel_id)
    finally:
        await pool.close()


async def credits_by_purchase(pool: asyncpg.Pool, channel_id: str) -> dict[str, dict]:
    """Each credited purchase of a channel: how many credit transfers it has (1, by construction),
    the account and the units."""
    rows = await pool.fetch("SELECT id, account_id, sum(amount) AS units, count(*) AS n FROM transfers "
                            "WHERE kind = 'credit' AND channel_id = $1 GROUP BY id, account_id", channel_id)
    return {r["id"]: {"count": r["n"], "account_id": r["account_id"], "quantity": r["units"]} for r in rows}
