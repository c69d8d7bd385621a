"""The ledger's operations. Each runs inside the caller's transaction and is idempotent by id.

Two-phase, as TigerBeetle's transfers:
- credit:  a transfer with id = purchase id; inserting it twice is impossible (primary key).
- reserve: a pending transfer with id = stamp request id and a deadline; refused when nothing is
           available (and the refusal is recorded, so a redelivery is refused the same way).
- commit:  posts the pending transfer; release / expire: voids it. A pending transfer has at most
           one resolution (unique ``pending_id``): a commit after a void is refused, never applied.

A consumer batch is applied by ``apply`` in a fixed number of statements, whatever its size: the
balances and the transfers the batch names are read once, the operations run in memory in order,
and the new transfers, reservation rows, balances and the caller's outbox records are written in
one statement at the end (each operation used to cost four or five round trips while its account
stayed locked).

Concurrency: the account rows are locked (``FOR UPDATE``, sorted) until the transaction ends, so
concurrent batches from several instances serialise per account and never oversell; the
``available_never_negative`` constraint is the last line of defence. The lock is taken *after* the
batch was read and worked out, as late as it can be: by the statement that writes the batch, which
locks the accounts first and writes only if each row is still the version (``xmin``) the batch read.
A batch whose accounts changed since its unlocked read writes nothing there; it reads its transfers
again under the lock that statement took and works the batch out again. Every transfer written
rewrites its account's row (a refused reservation too), so a new version is the sign of any change
to an account's ledger. From the lock to the commit there is one round trip (``COMMIT``) instead of
seven (three before the lock moved into the write): with two quota members on one account, the
other waits that much less (issue 12's 50 ms lock bound).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from services.kernel import errors, inbox, outbox, runtime
from services.kernel.events import Outgoing
from services.kernel.settings import Settings
from services.quota import NAME
from services.quota.metrics import STALE_READS


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
    return {a: b for a, (_, b) in (await _lock(conn, accounts, create=True)).items()}


Versions = dict[Account, tuple[str, Balance]]      # account -> (row version, balance)
_ACCOUNTS_IN = ("SELECT channel_id, account_id, xmin::text AS version, credited, pending, committed FROM accounts "
                "WHERE (channel_id, account_id) IN (SELECT c, a FROM unnest({}, {}) AS w(c, a))")
_ACCOUNTS = _ACCOUNTS_IN.format("$1::text[]", "$2::text[]")


def _versions(rows) -> Versions:
    return {(r["channel_id"], r["account_id"]): (r["version"], Balance(r["credited"], r["pending"], r["committed"]))
            for r in rows}


async def _read(conn: asyncpg.Connection, accounts: set[Account]) -> Versions:
    """The accounts as last committed, with their row versions, without locking them."""
    ordered = sorted(accounts)
    return _versions(await conn.fetch(_ACCOUNTS, [c for c, _ in ordered], [a for _, a in ordered]))


async def _lock(conn: asyncpg.Connection, accounts: set[Account], *, create: bool) -> Versions:
    """Lock the accounts in (channel, account) order, creating them first if ``create``; their versions
    and balances as locked (the newest committed, whatever the statement's snapshot)."""
    if create:
        await _create(conn, accounts)
    ordered = sorted(accounts)
    return _versions(await conn.fetch(_ACCOUNTS + " ORDER BY channel_id, account_id FOR UPDATE",
                                      [c for c, _ in ordered], [a for _, a in ordered]))


async def _create(conn: asyncpg.Connection, accounts: set[Account]) -> None:
    """The accounts that do not exist yet, empty, in (channel, account) order."""
    ordered = sorted(accounts)
    await conn.execute("INSERT INTO accounts (channel_id, account_id) SELECT c, a FROM unnest($1::text[], "
                       "$2::text[]) AS u(c, a) ORDER BY c, a ON CONFLICT DO NOTHING",
                       [c for c, _ in ordered], [a for _, a in ordered])


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
    touched: set[Account] = field(default_factory=set)   # accounts whose row is rewritten

    def balance(self, account: Account) -> Balance:
        return Balance(*self.balances[account])

    def move(self, account: Account, credited: int = 0, pending: int = 0, committed: int = 0) -> Balance:
        b = self.balances[account]
        b[0] += credited
        b[1] += pending
        b[2] += committed
        return Balance(*b)

    def insert(self, id_: str, kind: str, account: Account, amount: int, event_id: str, *,
               pending_id: str | None = None, deadline: dt.datetime | None = None, code: str | None = None) -> None:
        self.transfers.append((id_, kind, account[0], account[1], amount, pending_id, deadline, code, event_id))
        self.touched.add(account)      # a new row version even when the balance stays (a refusal)
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

    async def write(self, conn: asyncpg.Connection, records: list[Outgoing], *,
                    unless_changed: Versions | None = None, claims: inbox.Claims | None = None) -> Versions | None:
        """The batch's rows and the caller's outbox ``records`` (and inbox ``claims``), in one statement.

        With ``unless_changed`` (accounts and the versions the batch was worked out from, none of them
        locked yet), the same statement first locks those accounts (sorted, as ``_lock``) and writes only
        if each is still that version. Returns None when written, or the accounts as locked when one
        had changed: nothing was written, and in a transaction the locks are held for the caller to
        work out again.
        """
        writes: list[str] = []
        args: list = []
        when = ""          # the condition every write carries (none: the accounts are locked already)

        def arrays(columns: list[list], types: str) -> str:
            start = len(args) + 1
            args.extend(columns)
            return ", ".join(f"${start + i}::{t}[]" for i, t in enumerate(types.split()))

        def value(v, type_: str) -> str:
            args.append(v)
            return f"${len(args)}::{type_}"

        if unless_changed is not None:
            ordered = sorted(unless_changed)
            c, a, v = arrays([[k[0] for k in ordered], [k[1] for k in ordered],
                              [unless_changed[k][0] for k in ordered]], "text text text").split(", ")
            writes.append(f"held AS MATERIALIZED ({_ACCOUNTS_IN.format(c, a)} ORDER BY channel_id, account_id "
                          "FOR UPDATE)")
            writes.append(f"fresh AS (SELECT count(*) FILTER (WHERE h.version = e.v) = {len(ordered)} AS ok "
                          f"FROM held AS h JOIN unnest({c}, {a}, {v}) AS e(c, a, v) "
                          "ON h.channel_id = e.c AND h.account_id = e.a)")
            when = "(SELECT ok FROM fresh)"
        where, and_ = (f" WHERE {when}", f" AND {when}") if when else ("", "")
        if self.transfers:
            columns = list(map(list, zip(*self.transfers, strict=True)))
            unnested = arrays(columns, 'text text text text bigint text timestamptz text text')
            # made when the batch's application began, as a transaction's now(): before the events
            # it announces occurred (``bubuh trace``'s order), also when written by one statement
            at = value(claims.at if claims is not None else None, "timestamptz")
            writes.append("t AS (INSERT INTO transfers (id, kind, channel_id, account_id, amount, pending_id, "
                          "deadline, code, event_id, created_at) "
                          f"SELECT *, COALESCE({at}, now()) FROM unnest({unnested}){where})")
        if self.opened:
            columns = list(map(list, zip(*self.opened.values(), strict=True)))
            writes.append("o AS (INSERT INTO open_reservations (request_id, channel_id, account_id, deadline) "
                          f"SELECT * FROM unnest({arrays(columns, 'text text text timestamptz')}){where})")
        if self.closed:
            closed = arrays([self.closed], "text")
            writes.append(f"d AS (DELETE FROM open_reservations WHERE request_id = ANY({closed}){and_})")
        if self.touched:
            keys = sorted(self.touched)
            columns = [[k[0] for k in keys], [k[1] for k in keys],
                       *([self.balances[k][i] for k in keys] for i in range(3))]
            writes.append("u AS (UPDATE accounts AS a SET credited = u.c, pending = u.p, committed = u.m "
                          f"FROM unnest({arrays(columns, 'text text bigint bigint bigint')}) AS u(ch, ac, c, p, m) "
                          f"WHERE a.channel_id = u.ch AND a.account_id = u.ac{and_})")
        if claims is not None:
            claimed, claim_args = claims.cte(len(args) + 1, when)
            writes.append(claimed)
            args.extend(claim_args)
        if not when:
            await outbox.add_with(conn, writes, args, records)
            return None
        rows = await outbox.add_with(conn, writes, args, records, guard=when,
                                     answer="SELECT (SELECT ok FROM fresh) AS ok, held.* FROM held")
        return None if rows and rows[0]["ok"] else _versions(rows)


def _work_out(operations: list[Operation], accounts: Versions, rows) -> tuple[_Batch, list[Outcome]]:
    """The batch applied in memory, operation by operation, from these balances and transfers."""
    batch = _Batch(balances={a: [b.credited, b.pending, b.committed] for a, (_, b) in accounts.items()},
                   known={r["id"]: (r["kind"], r["channel_id"], r["account_id"], r["code"], r["deadline"])
                          for r in rows if r["pending_id"] is None},
                   resolved={r["pending_id"]: r["kind"] for r in rows if r["pending_id"] is not None})
    outcomes = [batch.credit(op) if isinstance(op, Credit) else batch.reserve(op) if isinstance(op, Reserve)
                else batch.resolve(op) for op in operations]
    return batch, outcomes


def _elsewhere(rows, accounts: set[Account]) -> set[Account]:
    """Accounts of the reservations the batch resolves that it does not name (a resolution naming
    another account than its reservation's): they are locked too."""
    return {(r["channel_id"], r["account_id"]) for r in rows if r["pending_id"] is None} - accounts


Announce = Callable[[list[Outcome]], list[Outgoing]]


def _nothing(_: list[Outcome]) -> list[Outgoing]:
    return []


class _Reads:
    """What a batch of operations reads: its accounts' balances (with their versions), then the
    transfers it names, and how it is worked out from them."""

    def __init__(self, conn: asyncpg.Connection, operations: list[Operation], announce: Announce) -> None:
        self._conn = conn
        self._operations = operations
        self._announce = announce
        self.accounts = {(op.channel_id, op.account_id) for op in operations}
        self._ids = [op.purchase_id if isinstance(op, Credit) else op.request_id for op in operations]
        self._resolving = [op.request_id for op in operations if isinstance(op, Resolve)]

    async def transfers(self):
        return await self._conn.fetch("SELECT id, kind, channel_id, account_id, code, deadline, pending_id "
                                      "FROM transfers WHERE id = ANY($1::text[]) OR pending_id = ANY($2::text[])",
                                      self._ids, self._resolving)

    async def unlocked(self) -> tuple[Versions, list, set[Account]]:
        """The balances, then the transfers (a change in between shows as a new version), without a
        lock; and every account the batch must lock (its own and those of the reservations it resolves)."""
        seen = await _read(self._conn, self.accounts)
        rows = await self.transfers()
        return seen, rows, self.accounts | _elsewhere(rows, self.accounts)

    def settle(self, balances: Versions, rows) -> tuple[_Batch, list[Outcome], list[Outgoing]]:
        batch, outcomes = _work_out(self._operations, balances, rows)
        return batch, outcomes, self._announce(outcomes)


async def apply(conn: asyncpg.Connection, operations: list[Operation], announce: Announce = _nothing) -> list[Outcome]:
    """Apply a run of operations in the caller's transaction, in a fixed number of statements.

    Each outcome is what applying the operations one by one would give, in order (the balance right
    after each). ``announce`` turns the outcomes into outbox records, written in the same statement
    as the ledger's rows; it is called again when the accounts changed before the lock, so it must
    only build records.

    The balances are read before the transfers, both without a lock, and the batch is worked out;
    then one statement locks the accounts (sorted) and writes, if every locked row is the version
    read: nothing in these accounts' ledger changed in between (every writer of an account's
    transfers rewrites its row under its lock), and the work stands. Otherwise that statement wrote
    nothing, the transfers are read again under the lock it took, and the batch is worked out again.
    A batch naming an account that does not exist yet (or resolving another account's reservation)
    locks first and works out under the lock.
    """
    if not operations:
        return []
    reads = _Reads(conn, operations, announce)
    seen, rows, wanted = await reads.unlocked()
    if wanted <= seen.keys():
        batch, outcomes, records = reads.settle(seen, rows)
        locked = await batch.write(conn, records, unless_changed={a: seen[a] for a in wanted})
        if locked is None:
            return outcomes
        STALE_READS.inc()
    else:                             # a new account, or one of another's reservation: all under the lock
        locked = await _lock(conn, wanted, create=True)
    rows = await reads.transfers()
    more = _elsewhere(rows, set(locked))
    if more:
        locked.update(await _lock(conn, more, create=True))
    batch, outcomes, records = reads.settle(locked, rows)
    await batch.write(conn, records)
    return outcomes


async def apply_at_once(conn: asyncpg.Connection, operations: list[Operation], announce: Announce,
                        claims: inbox.Claims, *, attempts: int = 3) -> list[Outcome] | None:
    """Apply a run of operations and write the caller's inbox ``claims`` in one autocommitted statement
    (no transaction open: ``Transactional``'s ``at_once``); None when nothing was written and the run
    must go through ``apply`` in a transaction instead.

    As ``apply``, the batch is read and worked out without a lock, and the statement locks its
    accounts and writes only if none changed; the lock lasts as long as that statement, never a round
    trip to this process. When an account changed, the statement wrote nothing and its locks are
    gone with it: the batch is read and worked out again, up to ``attempts`` times. An account that
    does not exist yet is first created, empty, by a statement of its own (as ``apply`` creates it
    under its lock: an account exists once an operation named it), then the batch is read again.
    """
    if conn.is_in_transaction():
        raise RuntimeError("apply_at_once runs outside a transaction: its statement is the transaction")
    if not operations:
        return None
    reads = _Reads(conn, operations, announce)
    for _ in range(attempts):
        seen, rows, wanted = await reads.unlocked()
        if not wanted <= seen.keys():
            await _create(conn, wanted - seen.keys())
            seen, rows, wanted = await reads.unlocked()
            if not wanted <= seen.keys():       # a resolution naming yet another account: not worth a loop
                return None
        batch, outcomes, records = reads.settle(seen, rows)
        if await batch.write(conn, records, unless_changed={a: seen[a] for a in wanted}, claims=claims) is None:
            return outcomes
        STALE_READS.inc()
    return None


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
