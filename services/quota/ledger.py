"""The ledger's operations. Each runs inside the caller's transaction and is idempotent by id.

Two-phase, as TigerBeetle's transfers:
- credit:  a transfer with id = purchase id; inserting it twice is impossible (primary key).
- reserve: a pending transfer with id = stamp request id and a deadline; refused when nothing is
           available (and the refusal is recorded, so a redelivery is refused the same way).
- commit:  posts the pending transfer; release / expire: voids it. A pending transfer has at most
           one resolution (unique ``pending_id``): a commit after a void is refused, never applied.

A consumer batch is applied by ``apply`` in a fixed number of statements, whatever its size: the
accounts are locked, the transfers the batch names are read once, the operations run in memory in
order, and the new transfers, reservation rows and balances are written set-based at the end (each
operation used to cost four or five round trips while its account stayed locked).

Concurrency: the account rows are locked (``FOR UPDATE``, sorted) until the transaction ends, so
concurrent batches from several instances serialise per account and never oversell; the
``available_never_negative`` constraint is the last line of defence.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

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


Account = tuple[str, str]          # (channel_id, account_id)


async def lock_accounts(conn: asyncpg.Connection, accounts: set[Account]) -> dict[Account, Balance]:
    """Create and lock several accounts, always in (channel, account) order: no deadlock between batches.
    Returns their balances as locked."""
    ordered = sorted(accounts)
    channels, ids = [c for c, _ in ordered], [a for _, a in ordered]
    await conn.execute("INSERT INTO accounts (channel_id, account_id) SELECT c, a FROM unnest($1::text[], $2::text[]) "
                       "AS u(c, a) ORDER BY c, a ON CONFLICT DO NOTHING", channels, ids)
    rows = await conn.fetch("SELECT channel_id, account_id, credited, pending, committed FROM accounts "
                            "WHERE (channel_id, account_id) IN "
                            "(SELECT c, a FROM unnest($1::text[], $2::text[]) AS u(c, a)) "
                            "ORDER BY channel_id, account_id FOR UPDATE", channels, ids)
    return {(r["channel_id"], r["account_id"]): Balance(r["credited"], r["pending"], r["committed"]) for r in rows}


# --- operations ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Credit:
    """Credit ``quantity`` units (a confirmed purchase); id = the purchase id."""

    purchase_id: str
    channel_id: str
    account_id: str
    quantity: int
    event_id: str


@dataclass(frozen=True)
class Reserve:
    """Hold one unit for a stamp request until ``deadline``; refused when nothing is available."""

    request_id: str
    channel_id: str
    account_id: str
    deadline: dt.datetime
    event_id: str


@dataclass(frozen=True)
class Resolve:
    """Post (``post``: the stamp was signed) or void (``void``: released or expired) a reservation.
    The account named is where the caller expects it; the pending transfer's own account is used."""

    kind: str
    request_id: str
    channel_id: str
    account_id: str
    code: str
    event_id: str


Operation = Credit | Reserve | Resolve


@dataclass
class _Batch:
    """The ledger as the batch's operations see it: the locked balances and the transfers they touch,
    updated in memory operation by operation, and the rows to write at the end."""

    balances: dict[Account, list[int]]                  # account -> [credited, pending, committed]
    known: dict[str, tuple]                             # transfer id -> (kind, channel, account, code, deadline)
    resolved: dict[str, str]                            # pending id -> 'post' | 'void'
    transfers: list[tuple] = field(default_factory=list)
    opened: dict[str, tuple] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)
    moved: set[Account] = field(default_factory=set)

    def balance(self, account: Account) -> Balance:
        return Balance(*self.balances[account])

    def move(self, account: Account, credited: int = 0, pending: int = 0, committed: int = 0) -> Balance:
        b = self.balances[account]
        b[0] += credited
        b[1] += pending
        b[2] += committed
        self.moved.add(account)
        return Balance(*b)

    def insert(self, id_: str, kind: str, account: Account, amount: int, event_id: str, *,
               pending_id: str | None = None, deadline: dt.datetime | None = None, code: str | None = None) -> None:
        self.transfers.append((id_, kind, account[0], account[1], amount, pending_id, deadline, code, event_id))
        if pending_id is None:
            self.known[id_] = (kind, account[0], account[1], code, deadline)
        else:
            self.resolved[pending_id] = kind

    # one method per operation: the same rules, in the same order, as one statement each would apply

    def credit(self, op: Credit) -> Outcome:
        if op.purchase_id in self.known:
            return Outcome("duplicate")
        account = (op.channel_id, op.account_id)
        self.insert(op.purchase_id, "credit", account, op.quantity, op.event_id)
        return Outcome("applied", self.move(account, credited=op.quantity))

    def reserve(self, op: Reserve) -> Outcome:
        account = (op.channel_id, op.account_id)
        prior = self.known.get(op.request_id)
        if prior is not None:
            return Outcome("duplicate", self.balance(account), prior[3] or "", prior[4])
        if self.balance(account).available < 1:
            self.insert(op.request_id, "rejected", account, 0, op.event_id, code=errors.QUOTA_INSUFFICIENT.code)
            return Outcome("refused", self.balance(account), errors.QUOTA_INSUFFICIENT.code)
        self.insert(op.request_id, "pending", account, 1, op.event_id, deadline=op.deadline)
        self.opened[op.request_id] = (op.request_id, account[0], account[1], op.deadline)
        return Outcome("applied", self.move(account, pending=1), deadline=op.deadline)

    def resolve(self, op: Resolve) -> Outcome:
        pending = self.known.get(op.request_id)
        if pending is not None and pending[0] == "rejected" and op.kind == "void":
            return Outcome("duplicate")   # never reserved: nothing to release (the failed stamp was refused quota)
        if pending is None or pending[0] != "pending":
            return Outcome("refused", code=errors.RESERVATION_UNKNOWN.code)
        resolution = self.resolved.get(op.request_id)
        if resolution == op.kind:
            return Outcome("duplicate")
        if resolution is not None:   # posted when voiding, or voided when posting
            return Outcome("refused", code=errors.RESERVATION_VOIDED.code if resolution == "void"
                           else errors.RESERVATION_POSTED.code)
        account = (pending[1], pending[2])
        self.insert(f"{op.request_id}:{op.kind}", op.kind, account, 1, op.event_id, pending_id=op.request_id,
                    code=op.code or None)
        if self.opened.pop(op.request_id, None) is None:
            self.closed.append(op.request_id)
        return Outcome("applied", self.move(account, pending=-1, committed=1 if op.kind == "post" else 0), op.code)

    async def write(self, conn: asyncpg.Connection) -> None:
        if self.transfers:
            await conn.execute(
                "INSERT INTO transfers "
                "(id, kind, channel_id, account_id, amount, pending_id, deadline, code, event_id) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], "
                "$7::timestamptz[], $8::text[], $9::text[])", *map(list, zip(*self.transfers, strict=True)))
        if self.opened:
            await conn.execute(
                "INSERT INTO open_reservations (request_id, channel_id, account_id, deadline) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])",
                *map(list, zip(*self.opened.values(), strict=True)))
        if self.closed:
            await conn.execute("DELETE FROM open_reservations WHERE request_id = ANY($1::text[])", self.closed)
        if self.moved:
            keys = sorted(self.moved)
            await conn.execute(
                "UPDATE accounts AS t SET credited = u.c, pending = u.p, committed = u.m "
                "FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[]) AS u(ch, a, c, p, m) "
                "WHERE t.channel_id = u.ch AND t.account_id = u.a",
                [k[0] for k in keys], [k[1] for k in keys], *([self.balances[k][i] for k in keys] for i in range(3)))


async def apply(conn: asyncpg.Connection, operations: list[Operation]) -> list[Outcome]:
    """Apply a run of operations in the caller's transaction, in a fixed number of statements.

    Each outcome is what applying the operations one by one would give, in order (the balance right
    after each). The accounts are locked first (sorted), so the balances and the transfers read after
    the lock cannot change under the batch: every writer of an account's transfers holds its lock.
    """
    if not operations:
        return []
    accounts = {(op.channel_id, op.account_id) for op in operations}
    ids = [op.purchase_id if isinstance(op, Credit) else op.request_id for op in operations]
    resolving = [op.request_id for op in operations if isinstance(op, Resolve)]
    locked = await lock_accounts(conn, accounts)
    rows = await conn.fetch("SELECT id, kind, channel_id, account_id, code, deadline, pending_id FROM transfers "
                            "WHERE id = ANY($1::text[]) OR pending_id = ANY($2::text[])", ids, resolving)
    elsewhere = {(r["channel_id"], r["account_id"]) for r in rows if r["pending_id"] is None} - set(locked)
    if elsewhere:   # a resolution naming another account than its reservation's: lock that one too
        locked.update(await lock_accounts(conn, elsewhere))
    batch = _Batch(balances={a: [b.credited, b.pending, b.committed] for a, b in locked.items()},
                   known={r["id"]: (r["kind"], r["channel_id"], r["account_id"], r["code"], r["deadline"])
                          for r in rows if r["pending_id"] is None},
                   resolved={r["pending_id"]: r["kind"] for r in rows if r["pending_id"] is not None})
    outcomes = [batch.credit(op) if isinstance(op, Credit) else batch.reserve(op) if isinstance(op, Reserve)
                else batch.resolve(op) for op in operations]
    await batch.write(conn)
    return outcomes


@dataclass(frozen=True)
class Due:
    request_id: str
    channel_id: str
    account_id: str


async def due_expiries(conn: asyncpg.Connection, now: dt.datetime, limit: int = 200) -> list[Due]:
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
    locked = await conn.fetch("SELECT request_id, channel_id, account_id FROM open_reservations "
                              "WHERE request_id = ANY($1::text[]) AND deadline <= $2 ORDER BY deadline "
                              "FOR UPDATE SKIP LOCKED", [r["request_id"] for r in rows], now)
    return [Due(r["request_id"], r["channel_id"], r["account_id"]) for r in locked]


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
