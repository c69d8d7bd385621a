"""The quota ledger's invariants, as properties over random histories, against real PostgreSQL.

Hypothesis draws a history of credits (PurchaseConfirmed), reservations (StampRequested), commits
(StampSigned), releases (StampFailed), expiry sweeps and redeliveries of earlier events over a
few accounts, cut into partition batches of random sizes. Each batch goes through the pipeline's
``Transactional`` handler exactly as the consumer loop drives it, and after every batch and sweep
the tables are checked against a small model of what a channel was promised:

- credited = the sum of the account's distinct confirmed purchases, each once;
- available = credited - committed - pending >= 0, and pending = the account's open reservations;
- a reservation is resolved at most once; a commit after a void is refused (QuotaRefused), never applied;
- the account row is what the transfers table implies;
- what goes out (the outbox) is exactly what the model expects, each event id once;
- a redelivered event or batch changes nothing.

No Kafka and no platform process: only the quota schema on the local PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.contracts.bubuh.v1 import purchase_pb2, stamp_pb2
from services.kernel import database, errors, events, inbox
from services.kernel.events import Event, Outgoing
from services.kernel.processing.handler import Transactional
from services.quota import ledger
from services.quota.ledger_consumer import CONSUMER, QuotaHandlers
from tests.component import handler_support as hs

ACCOUNTS = [("ch-a", "acct-1"), ("ch-a", "acct-2"), ("ch-b", "acct-1")]
FAIL_CODE = "PDF_MALFORMED"


async def _reservation_state(conn, request_id: str) -> tuple[str, dt.datetime | None]:
    """The state of a reservation: 'open' (with deadline), 'posted', 'voided', 'rejected' or 'unknown'."""
    row = await conn.fetchrow("SELECT kind, deadline FROM transfers WHERE id = $1", request_id)
    if row is None:
        return "unknown", None
    if row["kind"] == "rejected":
        return "rejected", None
    resolution = await conn.fetchval("SELECT kind FROM transfers WHERE pending_id = $1", request_id)
    if resolution is None:
        return "open", row["deadline"]
    return ("posted" if resolution == "post" else "voided"), row["deadline"]


@pytest.fixture(scope="module")
async def quota():
    hs.postgres_up()
    s = hs.settings(reservation_ttl_s=3600)
    async with hs.service_pool(s, "quota", max_size=4) as pool:
        handlers = QuotaHandlers(pool, s)
        yield pool, handlers, handlers.handler()      # as the service wires it


async def _reset(pool) -> None:
    await pool.execute("DELETE FROM transfers; DELETE FROM open_reservations; DELETE FROM accounts; "
                       "DELETE FROM inbox; DELETE FROM outbox")


# --- the model: what the ledger must have done -------------------------------------------------

@dataclass
class Model:
    purchases: dict[str, tuple[tuple[str, str], int]]         # purchase id -> (account, quantity)
    requests: dict[str, tuple[str, str]]                      # request id -> account
    credited: dict[str, tuple[tuple[str, str], int]] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)       # request id -> open | posted | voided | rejected
    open_order: list[str] = field(default_factory=list)       # open reservations, oldest first
    applied: set[str] = field(default_factory=set)            # event ids the inbox holds
    out: list[tuple] = field(default_factory=list)            # what the outbox must hold, in order

    def balance(self, account: tuple[str, str]) -> tuple[int, int, int]:
        credited = sum(q for a, q in self.credited.values() if a == account)
        pending = sum(1 for r in self.open_order if self.requests[r] == account)
        committed = sum(1 for r, s in self.state.items() if s == "posted" and self.requests[r] == account)
        return credited, pending, committed

    def _bal(self, account) -> tuple[int, int, int, int]:
        c, p, m = self.balance(account)
        return c, p, m, c - m - p

    def apply(self, ev: Event) -> None:
        if ev.event_id in self.applied:
            return                                            # the inbox: a redelivery is a no-op
        self.applied.add(ev.event_id)
        m = ev.payload
        if isinstance(m, purchase_pb2.PurchaseConfirmed):
            if m.purchase_id not in self.credited:
                self.credited[m.purchase_id] = self.purchases[m.purchase_id]
                account = self.purchases[m.purchase_id][0]
                self.out.append(("QuotaCredited", m.purchase_id, m.quantity, self._bal(account)))
            return
        rid, account = m.request_id, self.requests[m.request_id]
        state = self.state.get(rid)
        if isinstance(m, stamp_pb2.StampRequested):
            if state is not None:
                return
            if self._bal(account)[3] >= 1:
                self.state[rid] = "open"
                self.open_order.append(rid)
                self.out.append(("QuotaReserved", rid, self._bal(account)))
            else:
                self.state[rid] = "rejected"
                self.out.append(("QuotaRejected", rid, errors.QUOTA_INSUFFICIENT.code, self._bal(account)))
        elif isinstance(m, stamp_pb2.StampSigned | stamp_pb2.StampCompleted):
            if state == "open":
                self._resolve(rid, "posted")
                self.out.append(("QuotaCommitted", rid, self._bal(account)))
            elif state != "posted":
                code = errors.RESERVATION_VOIDED.code if state == "voided" else errors.RESERVATION_UNKNOWN.code
                self.out.append(("QuotaRefused", rid, "commit", code))
        elif isinstance(m, stamp_pb2.StampFailed):
            if state == "open":
                self._resolve(rid, "voided")
                self.out.append(("QuotaReleased", rid, FAIL_CODE, self._bal(account)))
            elif state == "posted":
                self.out.append(("QuotaRefused", rid, "release", errors.RESERVATION_POSTED.code))
            elif state is None:
                self.out.append(("QuotaRefused", rid, "release", errors.RESERVATION_UNKNOWN.code))
            # voided: a duplicate; rejected: never reserved, nothing to release

    def _resolve(self, rid: str, state: str) -> None:
        self.state[rid] = state
        self.open_order.remove(rid)

    def expire(self, k: int) -> list[str]:
        gone = self.open_order[:k]
        for rid in gone:
            self._resolve(rid, "voided")
            self.out.append(("QuotaReleased", rid, "RESERVATION_EXPIRED", self._bal(self.requests[rid])))
        return gone


def _summary(msg) -> tuple:
    name = type(msg).__name__
    bal = (msg.balance.credited, msg.balance.pending, msg.balance.committed, msg.balance.available) \
        if hasattr(msg, "balance") else None
    if name == "QuotaCredited":
        return (name, msg.purchase_id, msg.quantity, bal)
    if name in ("QuotaReserved", "QuotaCommitted"):
        return (name, msg.request_id, bal)
    if name in ("QuotaRejected", "QuotaReleased"):
        return (name, msg.request_id, msg.code, bal)
    if name == "QuotaRefused":
        return (name, msg.request_id, msg.operation, msg.code)
    return (name,)


# --- checks against the tables ------------------------------------------------------------------

async def _check(pool, model: Model) -> None:
    rows = {(r["channel_id"], r["account_id"]): (r["credited"], r["pending"], r["committed"])
            for r in await pool.fetch("SELECT channel_id, account_id, credited, pending, committed FROM accounts")}
    for account in ACCOUNTS:
        c, p, m = rows.get(account, (0, 0, 0))
        assert (c, p, m) == model.balance(account), f"balance of {account}"
        assert c - m - p >= 0, f"available of {account} is negative"

    # the account row is what its transfers imply
    implied = await pool.fetch(
        "SELECT channel_id, account_id, "
        "  coalesce(sum(amount) FILTER (WHERE kind = 'credit'), 0) AS credited, "
        "  count(*) FILTER (WHERE kind = 'pending') - count(*) FILTER (WHERE kind IN ('post', 'void')) AS pending, "
        "  count(*) FILTER (WHERE kind = 'post') AS committed "
        "FROM transfers GROUP BY channel_id, account_id")
    for r in implied:
        assert rows[(r["channel_id"], r["account_id"])] == (r["credited"], r["pending"], r["committed"])

    # each confirmed purchase credited once, with its own quantity
    credits = await pool.fetch("SELECT id, channel_id, account_id, amount FROM transfers WHERE kind = 'credit'")
    assert {r["id"]: ((r["channel_id"], r["account_id"]), r["amount"]) for r in credits} == model.credited
    assert len(credits) == len(model.credited)

    # open reservations are exactly the model's, and pending counts them
    open_rows = await pool.fetch("SELECT request_id FROM open_reservations")
    assert {r["request_id"] for r in open_rows} == set(model.open_order)

    # each reservation resolved at most once, never both posted and voided; states agree with the model
    twice = await pool.fetch("SELECT pending_id FROM transfers WHERE pending_id IS NOT NULL "
                             "GROUP BY pending_id HAVING count(*) > 1")
    assert twice == []
    for rid in model.requests:
        found, _ = await _reservation_state(pool, rid)
        assert found == model.state.get(rid, "unknown"), f"state of {rid}"

    # what goes out: exactly the model's events, in order, each event id once
    out = await hs.outbox(pool)
    assert [_summary(m) for _, m in out] == model.out
    ids = [i for i, _ in out]
    assert len(ids) == len(set(ids)), "an event id was published twice"


async def _snapshot(pool) -> tuple:
    return (await pool.fetch("SELECT * FROM accounts ORDER BY channel_id, account_id"),
            await pool.fetch("SELECT id, kind, pending_id, code FROM transfers ORDER BY id"),
            await pool.fetch("SELECT * FROM open_reservations ORDER BY request_id"),
            await pool.fetch("SELECT event_id FROM outbox ORDER BY id"),
            await pool.fetchval("SELECT count(*) FROM inbox"))


# --- histories ----------------------------------------------------------------------------------

def _stamp_event(kind: str, rid: str, account: tuple[str, str]) -> Event:
    ch, acct = account
    if kind == "reserve":
        msg = stamp_pb2.StampRequested(request_id=rid, channel_id=ch, account_id=acct)
    elif kind == "commit":
        msg = stamp_pb2.StampSigned(request_id=rid, channel_id=ch, account_id=acct, sn="SN-" + rid)
    else:
        msg = stamp_pb2.StampFailed(request_id=rid, channel_id=ch, account_id=acct, code=FAIL_CODE, permanent=True)
    return hs.event(msg, producer="stamping", key=rid)


async def _credited(pool, transactional, account: tuple[str, str], purchase_id: str, quantity: int,
                    reserved: str = "") -> None:
    """An emptied ledger, then ``quantity`` units credited to ``account`` (and one reserved for ``reserved``)."""
    await _reset(pool)
    await transactional.process([hs.event(purchase_pb2.PurchaseConfirmed(
        purchase_id=purchase_id, channel_id=account[0], account_id=account[1], quantity=quantity),
        producer="purchase")])
    if reserved:
        await transactional.process([_stamp_event("reserve", reserved, account)])


# The history is drawn step by step (``st.data``), so later steps can aim at what earlier ones made: a
# commit or release names a request made before (or, now and then, one never made), a reservation is
# mostly a new request and sometimes one made before (the same request published again, another event
# id). The repeats in KINDS weigh the draw towards ledger operations, with the batch boundaries, the
# expiry sweep and the redeliveries in between.
KINDS = (["credit"] * 4 + ["reserve"] * 4 + ["commit"] * 3 + ["release"] * 2 + ["redeliver"] * 2
         + ["flush"] * 3 + ["expire"] * 2 + ["replay"])
PURCHASES_PER_ACCOUNT = 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quantities=st.lists(st.integers(1, 3), min_size=PURCHASES_PER_ACCOUNT * len(ACCOUNTS),
                           max_size=PURCHASES_PER_ACCOUNT * len(ACCOUNTS)),
       length=st.integers(10, 60), data=st.data())
@pytest.mark.parametrize("way", ["at once, else in a transaction", "in a transaction only"])
async def test_ledger_invariants_hold_over_any_history(quota, way, quantities, length, data):
    """The service's way (``QuotaHandlers.handler``), and ``apply`` alone: the way a batch takes when
    its statement cannot (accounts that kept changing, an event claimed meanwhile)."""
    pool, handlers, transactional = quota
    if way == "in a transaction only":
        transactional = Transactional(pool, CONSUMER, handlers.apply, handlers.TYPES)
    await _reset(pool)
    model = Model(purchases={f"p{a}.{k}": (account, quantities[a * PURCHASES_PER_ACCOUNT + k])
                             for a, account in enumerate(ACCOUNTS) for k in range(PURCHASES_PER_ACCOUNT)},
                  requests={})
    sent: list[Event] = []
    batches: list[list[Event]] = []
    batch: list[Event] = []

    async def flush() -> None:
        nonlocal batch
        if not batch:
            return
        rejected = await transactional.process(batch)
        assert rejected == []                      # the ledger rejects nothing: it refuses, in the outbox
        for ev in batch:
            model.apply(ev)
        batches.append(batch)
        batch = []
        await _check(pool, model)

    def request(fresh_weight: int, open_weight: int = 0) -> str:
        made = sorted(model.requests)
        fresh = f"r{len(made)}"
        rid = data.draw(st.sampled_from([fresh] * fresh_weight + made + model.open_order * open_weight),
                        label="request")
        if rid == fresh:
            model.requests[rid] = ACCOUNTS[data.draw(st.integers(0, len(ACCOUNTS) - 1), label="account")]
        return rid

    for _ in range(length):
        kind = data.draw(st.sampled_from(KINDS), label="step")
        if kind == "credit":
            pid = data.draw(st.sampled_from(sorted(model.purchases)), label="purchase")
            (ch, acct), quantity = model.purchases[pid]
            msg = purchase_pb2.PurchaseConfirmed(purchase_id=pid, channel_id=ch, account_id=acct, quantity=quantity,
                                                 amount=quantity * 10_000)
            ev = hs.event(msg, producer="purchase", key=f"{ch}/{acct}")
        elif kind == "reserve":
            rid = request(fresh_weight=4)
            ev = _stamp_event(kind, rid, model.requests[rid])
        elif kind in ("commit", "release"):
            rid = request(fresh_weight=1, open_weight=2)
            ev = _stamp_event(kind, rid, model.requests[rid])
        elif kind == "redeliver":
            if not sent:
                continue
            ev = data.draw(st.sampled_from(sent), label="redelivered")     # the same event, the same id
        elif kind == "replay":
            await flush()
            if not batches:
                continue
            before = await _snapshot(pool)
            assert await transactional.process(data.draw(st.sampled_from(batches), label="replayed")) == []
            assert await _snapshot(pool) == before, "a redelivered batch changed the ledger"
            continue
        elif kind == "flush":
            await flush()
            continue
        else:   # expire: the sweep voids the k oldest open reservations (their deadline has passed)
            await flush()
            k = data.draw(st.integers(0, min(3, len(model.open_order))), label="expiring")
            if k == 0:
                assert await handlers.expire_due(now=dt.datetime.now(dt.UTC)) == 0   # nothing is due yet
            else:
                _, cutoff = await _reservation_state(pool, model.open_order[k - 1])
                assert await handlers.expire_due(now=cutoff) == k
                model.expire(k)
            await _check(pool, model)
            continue
        batch.append(ev)
        sent.append(ev)
    await flush()
    for what in {f"{o[0]} {o[2]} {o[3]}" if o[0] == "QuotaRefused"
                 else f"{o[0]} {o[2]}" if o[0] == "QuotaReleased" else o[0] for o in model.out}:
        event(what)      # `--hypothesis-show-statistics` shows how often a history reached each outcome


# --- concurrency ---------------------------------------------------------------------------------

async def test_concurrent_batches_over_the_same_accounts_in_opposite_orders_do_not_deadlock(quota):
    """Two instances apply batches that touch the same accounts in opposite orders at the same time.

    Both must complete (the handler locks a batch's accounts in one fixed order first); with locks
    taken in event order this interleaving deadlocks and PostgreSQL aborts one of the two."""
    pool, _, transactional = quota
    await _reset(pool)
    accounts = [("ch-c", f"acct-{i}") for i in range(6)]
    rounds = 12

    def batch(tag: str, r: int, order: list[tuple[str, str]]) -> list[Event]:
        out = []
        for ch, acct in order:
            pid = f"p-{tag}-{r}-{acct}"
            out.append(hs.event(purchase_pb2.PurchaseConfirmed(purchase_id=pid, channel_id=ch, account_id=acct,
                                                               quantity=1, amount=10_000), producer="purchase"))
            out.append(_stamp_event("reserve", f"{tag}-{r}-{acct}", (ch, acct)))
            if r:
                out.append(_stamp_event("commit", f"{tag}-{r - 1}-{acct}", (ch, acct)))
        return out

    for r in range(rounds):
        forward, backward = batch("fw", r, accounts), batch("bw", r, accounts[::-1])
        results = await asyncio.wait_for(
            asyncio.gather(transactional.process(forward), transactional.process(backward), return_exceptions=True),
            timeout=20)
        assert results == [[], []], f"round {r}: {results!r}"

    rows = await pool.fetch("SELECT channel_id, account_id, credited, pending, committed FROM accounts "
                            "WHERE channel_id = 'ch-c' ORDER BY account_id")
    # per account and round: two credits, two reservations; every reservation but the last round's committed
    assert [(r["credited"], r["pending"], r["committed"]) for r in rows] == \
        [(2 * rounds, 2, 2 * (rounds - 1))] * len(accounts)
    kinds = [type(m).__name__ for _, m in await hs.outbox(pool)]
    assert kinds.count("QuotaReserved") == 2 * rounds * len(accounts)
    assert kinds.count("QuotaCommitted") == 2 * (rounds - 1) * len(accounts)
    assert "QuotaRejected" not in kinds and "QuotaRefused" not in kinds


async def test_the_expiry_sweep_and_a_batch_resolving_the_same_reservation_do_not_deadlock(quota, monkeypatch):
    """A stamp completes just as its reservation falls due: the consumer's batch (commit) and the expiry
    sweep (void) race for the same reservation. One of them must win cleanly and the other see it
    resolved; neither may fail. The interleaving is forced: the batch holds the account's lock when
    the sweep has claimed the due reservation."""
    pool, handlers, _ = quota
    await _reset(pool)
    ch, acct = "ch-d", "acct-1"
    t = Transactional(pool, CONSUMER, handlers.apply)
    await t.process([hs.event(purchase_pb2.PurchaseConfirmed(purchase_id=f"p-{uuid.uuid4()}", channel_id=ch,
                                                             account_id=acct, quantity=2), producer="purchase")])
    await t.process([_stamp_event("reserve", "late", (ch, acct))])

    batch_holds_account, sweep_holds_reservation = asyncio.Event(), asyncio.Event()

    async def apply_after_sweep_claimed(conn, events):
        await ledger.lock_accounts(conn, {(ch, acct)})        # what handlers.apply does first
        batch_holds_account.set()
        with contextlib.suppress(TimeoutError):       # a sweep that waits for the account never gets there
            await asyncio.wait_for(sweep_holds_reservation.wait(), 1.0)
        return await handlers.apply(conn, events)

    due_expiries = ledger.due_expiries

    async def due_once_the_batch_holds_the_account(conn, now, limit=200):
        await batch_holds_account.wait()
        due = await due_expiries(conn, now, limit)
        sweep_holds_reservation.set()
        await asyncio.sleep(0.3)                               # the batch reaches the reservation row
        return due

    monkeypatch.setattr(ledger, "due_expiries", due_once_the_batch_holds_the_account)
    commit = _stamp_event("commit", "late", (ch, acct))
    batch_result, swept = await asyncio.wait_for(asyncio.gather(
        Transactional(pool, CONSUMER, apply_after_sweep_claimed).process([commit]),
        handlers.expire_due(now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)),
        return_exceptions=True), timeout=20)
    assert not isinstance(batch_result, BaseException), f"the consumer's batch failed: {batch_result!r}"
    assert not isinstance(swept, BaseException), f"the expiry sweep failed: {swept!r}"
    resolutions = await pool.fetch("SELECT kind FROM transfers WHERE pending_id = 'late'")
    assert len(resolutions) == 1
    row = await pool.fetchrow("SELECT credited, pending, committed FROM accounts WHERE channel_id = $1", ch)
    assert row["pending"] == 0 and row["credited"] - row["committed"] - row["pending"] >= 0


async def test_batches_sharing_an_account_take_turns_in_process_never_on_the_row_lock(quota):
    """Partitions of one poll run concurrently, and one account's requests arrive on every partition.
    Without ``serialize_by`` their transactions queue on the account's row lock (what PostgreSQL's
    ``log_lock_waits`` reported in the surge); with it, they take turns before opening a transaction,
    so no backend ever waits for a lock, and the batches over other accounts still run meanwhile."""
    pool, handlers, _ = quota
    await _reset(pool)
    pids: set[int] = set()

    async def apply_and_hold(conn, events):
        pids.add(conn.get_server_pid())
        await handlers.apply(conn, events)
        await asyncio.sleep(0.15)                      # the account stays locked until the commit

    def batches(tag: str) -> list[list[Event]]:
        out = []
        for i, account in enumerate([("ch-e", "hot")] * 3 + [("ch-e", "cold")]):
            pid = f"p-{tag}-{i}"
            out.append([hs.event(purchase_pb2.PurchaseConfirmed(purchase_id=pid, channel_id=account[0],
                                                                account_id=account[1], quantity=1),
                                 producer="purchase"),
                        _stamp_event("reserve", f"{tag}-{i}", account)])
        return out

    async def run(handler: Transactional, tag: str) -> tuple[int, float]:
        """How often a backend of ours was seen waiting for a lock, and the cold batch's duration."""
        waits = 0
        done = asyncio.Event()
        monitor = await database.connect(hs_settings)

        async def watch() -> None:
            nonlocal waits
            while not done.is_set():
                waits += await monitor.fetchval(
                    # row locks only ('transactionid', 'tuple'): a relation extension lock of concurrent inserts,
                    # also of type Lock, was counted once on a loaded CI box (5 December)
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND wait_event IN ('transactionid', 'tuple') AND pid = ANY($1::int[])",
                    list(pids))
                await asyncio.sleep(0.005)

        async def timed(batch):
            started = asyncio.get_running_loop().time()
            assert await handler.process(batch) == []
            return asyncio.get_running_loop().time() - started

        watcher = asyncio.create_task(watch())
        try:
            took = await asyncio.wait_for(asyncio.gather(*(timed(b) for b in batches(tag))), timeout=20)
        finally:
            done.set()
            await watcher
            await monitor.close()
        return waits, took[-1]

    hs_settings = handlers._settings
    waits_plain, _ = await run(Transactional(pool, CONSUMER, apply_and_hold), "plain")
    assert waits_plain > 0, "the probe never saw a lock wait without serialize_by: it cannot see one"
    waits_turns, cold = await run(Transactional(pool, CONSUMER, apply_and_hold,
                                                serialize_by=handlers.accounts_of), "turns")
    assert waits_turns == 0
    assert cold < 0.4, f"the batch over another account waited for the hot one's turns ({cold:.2f} s)"
    row = await pool.fetchrow("SELECT credited, pending FROM accounts WHERE account_id = 'hot'")
    assert (row["credited"], row["pending"]) == (6, 6)


# --- the lock comes last -------------------------------------------------------------------------

def _stale_reads() -> float:
    return REGISTRY.get_sample_value("bubuh_ledger_stale_reads_total") or 0.0


def _batches(way: str) -> float:
    return REGISTRY.get_sample_value("bubuh_ledger_batches_total", {"way": way}) or 0.0


def _other_member_first(monkeypatch, other) -> None:
    """Run ``other`` (another member's whole batch, committed) between the next batch's unlocked read
    and its locking write: the interleaving two quota members on one account produce now and then."""
    write = ledger._Batch.write
    pending = [other]

    async def write_after_the_other(batch, conn, records, *, unless_changed=None, **more):
        if pending and unless_changed is not None:
            await pending.pop()()
        return await write(batch, conn, records, unless_changed=unless_changed, **more)

    monkeypatch.setattr(ledger._Batch, "write", write_after_the_other)


async def test_a_batch_whose_account_changed_before_its_lock_works_itself_out_again(quota, monkeypatch):
    """Two members reserve an account's last unit at once. The ledger reads without a lock and locks
    last; here the other member commits in between. The batch must see the account's new row version,
    read again under the lock, and be refused: one unit, one reservation, and the balance what the
    transfers say (a batch trusting its unlocked read would write its stale balance over the other's)."""
    pool, handlers, transactional = quota
    await _reset(pool)
    account = ("ch-f", "acct-1")
    await transactional.process([hs.event(purchase_pb2.PurchaseConfirmed(
        purchase_id="p-last", channel_id=account[0], account_id=account[1], quantity=1), producer="purchase")])

    async def other():
        assert await handlers.handler().process(
            [_stamp_event("reserve", "second", account)]) == []

    _other_member_first(monkeypatch, other)
    stale = _stale_reads()
    assert await transactional.process([_stamp_event("reserve", "first", account)]) == []

    kinds = dict(await pool.fetch("SELECT id, kind FROM transfers WHERE id IN ('first', 'second')"))
    assert kinds == {"second": "pending", "first": "rejected"}
    row = await pool.fetchrow("SELECT credited, pending, committed FROM accounts WHERE channel_id = 'ch-f'")
    assert tuple(row) == (1, 1, 0)
    out = [(type(m).__name__, m.request_id) for _, m in await hs.outbox(pool) if hasattr(m, "request_id")]
    assert out == [("QuotaReserved", "second"), ("QuotaRejected", "first")]
    assert _stale_reads() == stale + 1


@pytest.mark.parametrize("way", ["at once, else in a transaction", "in a transaction only"])
async def test_members_racing_for_an_accounts_last_units_never_oversell_it(quota, way):
    """Eight members (a handler each, no turns between them) each reserve three units of an account
    holding ten, all at once (four at a time: the pool's connections). Batches read before others
    write, so some find the account changed when they lock it, and work themselves out again: exactly
    ten reservations, fourteen refusals, the balance what the transfers say, and each request answered
    once on the outbox."""
    pool, handlers, transactional = quota
    account = ("ch-r", "acct-1")
    await _credited(pool, transactional, account, "p-ten", 10)
    stale = _stale_reads()
    members = [handlers.handler() if way.startswith("at once")
               else Transactional(pool, CONSUMER, handlers.apply, handlers.TYPES) for _ in range(8)]
    results = await asyncio.wait_for(asyncio.gather(*(
        m.process([_stamp_event("reserve", f"m{i}-{j}", account) for j in range(3)])
        for i, m in enumerate(members))), timeout=20)
    assert results == [[]] * 8
    assert _stale_reads() > stale, "no batch found its account changed: the race was not run"

    kinds = [r["kind"] for r in await pool.fetch("SELECT kind FROM transfers WHERE id LIKE 'm%'")]
    assert sorted(kinds) == ["pending"] * 10 + ["rejected"] * 14
    row = await pool.fetchrow("SELECT credited, pending, committed FROM accounts WHERE channel_id = 'ch-r'")
    assert tuple(row) == (10, 10, 0)
    out = [(type(m).__name__, m.request_id) for _, m in await hs.outbox(pool) if hasattr(m, "request_id")]
    assert sorted(name for name, _ in out) == ["QuotaRejected"] * 14 + ["QuotaReserved"] * 10
    assert len({rid for _, rid in out}) == 24


async def test_a_refusal_alone_is_a_new_version_of_its_account(quota, monkeypatch):
    """A refused reservation moves no balance but writes a transfer. If it left the account's row as it
    was, a batch that read before it would not see it, and would write its own refusal of the same
    request (published again with another event id) over it: a key violation, the batch failing. The
    refusal rewrites the row, so the batch reads again and finds the request answered already."""
    pool, handlers, transactional = quota
    await _reset(pool)
    account = ("ch-g", "acct-1")
    await transactional.process([hs.event(purchase_pb2.PurchaseConfirmed(
        purchase_id="p-one", channel_id=account[0], account_id=account[1], quantity=1), producer="purchase")])
    await transactional.process([_stamp_event("reserve", "holds-it", account)])      # nothing left

    async def other():
        assert await handlers.handler().process(
            [_stamp_event("reserve", "again", account)]) == []

    _other_member_first(monkeypatch, other)
    stale = _stale_reads()
    assert await transactional.process([_stamp_event("reserve", "again", account)]) == []   # another event id

    assert _stale_reads() == stale + 1
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE id = 'again'") == 1
    out = [(type(m).__name__, m.request_id) for _, m in await hs.outbox(pool) if hasattr(m, "request_id")]
    assert out == [("QuotaReserved", "holds-it"), ("QuotaRejected", "again")]


class _Recording:
    """A connection that notes every statement sent through it, and whether a transaction was open."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self.sent: list[str] = []
        self.in_transaction: list[bool] = []

    def __getattr__(self, name):
        attr = getattr(self._conn, name)
        if name not in ("execute", "fetch", "fetchrow", "fetchval"):
            return attr

        async def send(query, *args):
            self.sent.append(query)
            self.in_transaction.append(self._conn.is_in_transaction())
            return await attr(query, *args)
        return send


async def test_a_batch_locks_its_accounts_in_the_statement_before_its_commit(quota):
    """What another member waits for is this one's time from locking an account to committing. The
    batch reads and works itself out first; its accounts are locked by the one statement that writes
    the ledger's rows and its events together, the last before the commit: from the lock to the
    commit, only ``COMMIT``'s round trip. (It used to send six statements after the lock: the
    transfers' read and five writes; then one after a locking read of its own.)"""
    pool, _, transactional = quota
    account = ("ch-h", "acct-1")
    await _credited(pool, transactional, account, "p-first", 5, reserved="to-post")
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    operations = [ledger.Credit("p-more", *account, 2, "e-1"), ledger.Reserve("r-new", *account, deadline, "e-2"),
                  ledger.Resolve("post", "to-post", *account, "", "e-3")]

    def announce(outcomes):
        return [Outgoing("quota.events", b"k", f"{o.result}".encode(), [], f"out-{i}") for i, o in enumerate(outcomes)]

    async with pool.acquire() as conn, conn.transaction():
        recording = _Recording(conn)
        outcomes = await ledger.apply(recording, operations, announce)
    assert [o.result for o in outcomes] == ["applied"] * 3
    locking = [i for i, q in enumerate(recording.sent) if "FOR UPDATE" in q]
    assert locking == [len(recording.sent) - 1], recording.sent
    last = recording.sent[-1]
    assert all(f"INSERT INTO {t}" in last for t in ("transfers", "open_reservations", "outbox"))
    assert "UPDATE accounts" in last and "DELETE FROM open_reservations" in last
    row = await pool.fetchrow("SELECT credited, pending, committed FROM accounts WHERE channel_id = 'ch-h'")
    assert tuple(row) == (7, 1, 1)
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE event_id LIKE 'out-%'") == 3
    assert await pool.fetchval("SELECT count(*) FROM open_reservations WHERE request_id IN ('r-new', 'to-post')") == 1


# --- at once: claims, ledger and outbox in one autocommitted statement ----------------------------

async def test_a_batch_is_claimed_and_applied_by_one_statement_with_no_transaction_open(quota):
    """The service's way (``QuotaHandlers.handler``): the batch is read and worked out, then one
    autocommitted statement locks its account, claims its events in the inbox and writes the ledger's
    rows and its events. No transaction is open across a round trip, so the account is never locked
    while this process is away (at a load average of 5, a lock held across one round trip still
    passed 50 ms now and then)."""
    pool, handlers, transactional = quota
    account = ("ch-i", "acct-1")
    await _credited(pool, transactional, account, "p-i", 5, reserved="i-to-post")
    batch = [_stamp_event("reserve", "i-new", account), _stamp_event("commit", "i-to-post", account)]
    at_once = _batches("at_once")
    async with pool.acquire() as conn:
        recording = _Recording(conn)
        claims = await inbox.unapplied(conn, CONSUMER, batch)
        assert list(claims.events) == batch
        assert await handlers.apply_at_once(recording, batch, claims) is True
    assert not any(recording.in_transaction), recording.sent
    assert _batches("at_once") == at_once + 1
    locking = [q for q in recording.sent if "FOR UPDATE" in q]
    assert len(locking) == 1, recording.sent
    assert all(f"INSERT INTO {t}" in locking[0] for t in ("inbox", "transfers", "open_reservations", "outbox"))
    assert "UPDATE accounts" in locking[0]
    row = await pool.fetchrow("SELECT credited, pending, committed FROM accounts WHERE channel_id = 'ch-i'")
    assert tuple(row) == (5, 1, 1)
    claimed = {r["event_id"]: r["applied_at"] for r in await pool.fetch(
        "SELECT event_id, applied_at FROM inbox WHERE consumer = $1", CONSUMER)}
    assert {e.event_id for e in batch} <= claimed.keys()
    # applied, and the transfers made, before what they caused occurred, as in a transaction (bubuh
    # trace's order)
    occurred = [events.utc_datetime(events.decode(r["value"])[0].occurred_at) for r in await pool.fetch(
        "SELECT value FROM outbox ORDER BY id DESC LIMIT 2")]
    assert all(claimed[e.event_id] <= min(occurred) for e in batch), (claimed, occurred)
    made = [r["created_at"] for r in await pool.fetch("SELECT created_at FROM transfers WHERE id IN "
                                                      "('i-new', 'i-to-post:post')")]
    assert len(made) == 2 and max(made) <= min(occurred), (made, occurred)
    out = [type(m).__name__ for _, m in await hs.outbox(pool)]
    assert out.count("QuotaReserved") == 2 and out.count("QuotaCommitted") == 1
    assert await transactional.process(batch) == []          # delivered again: the inbox has it
    assert tuple(await pool.fetchrow("SELECT credited, pending, committed FROM accounts "
                                     "WHERE channel_id = 'ch-i'")) == (5, 1, 1)


async def test_a_batch_naming_a_new_account_is_applied_at_once_too(quota):
    """A channel's first purchase names an account that does not exist yet. Creating it under a
    transaction's lock held it across round trips while the other member waited (the last lock wait
    over 50 ms seen, 104.8 ms); now it is created empty by a statement of its own, and the batch goes
    in one statement as any other."""
    pool, handlers, transactional = quota
    await _reset(pool)
    at_once, in_transaction = _batches("at_once"), _batches("transaction")
    account = ("ch-n", "acct-new")
    assert await transactional.process([
        hs.event(purchase_pb2.PurchaseConfirmed(purchase_id="p-n", channel_id=account[0], account_id=account[1],
                                                quantity=2), producer="purchase"),
        _stamp_event("reserve", "n-1", account), _stamp_event("reserve", "n-2", account),
        _stamp_event("reserve", "n-3", account)]) == []
    assert (_batches("at_once"), _batches("transaction")) == (at_once + 1, in_transaction)
    assert tuple(await pool.fetchrow("SELECT credited, pending, committed FROM accounts "
                                     "WHERE channel_id = 'ch-n'")) == (2, 2, 0)
    kinds = dict(await pool.fetch("SELECT id, kind FROM transfers WHERE id LIKE 'n-%'"))
    assert kinds == {"n-1": "pending", "n-2": "pending", "n-3": "rejected"}


async def test_an_event_another_member_applied_meanwhile_is_not_applied_twice(quota, monkeypatch):
    """After a rebalance two members can hold one event: one applies it between the other's inbox
    read and its statement. The statement claims without ``ON CONFLICT``, so it fails whole (a unique
    violation) and nothing of it is written; the batch goes through the transaction, whose claim
    sees a duplicate. One reservation, one QuotaReserved, and no error."""
    pool, handlers, transactional = quota
    account = ("ch-j", "acct-1")
    await _credited(pool, transactional, account, "p-j", 5)
    reserve = _stamp_event("reserve", "j-once", account)

    async def other():
        assert await handlers.handler().process([reserve]) == []

    _other_member_first(monkeypatch, other)
    in_transaction = _batches("transaction")
    assert await transactional.process([reserve]) == []
    assert _batches("transaction") == in_transaction         # nothing left to apply: a duplicate

    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE id = 'j-once'") == 1
    assert tuple(await pool.fetchrow("SELECT credited, pending, committed FROM accounts "
                                     "WHERE channel_id = 'ch-j'")) == (5, 1, 0)
    out = [(type(m).__name__, m.request_id) for _, m in await hs.outbox(pool) if hasattr(m, "request_id")]
    assert out == [("QuotaReserved", "j-once")]
