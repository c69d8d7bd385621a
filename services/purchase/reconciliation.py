"""``bubuh reconcile``: a channel's own list of paid orders against what Bubuh credited.

The channel's CSV (``channel_order_id,account_id,quantity,amount``) is compared with the purchase
service's confirmed purchases (read here, from this service's own table) and the quota ledger's credit
transfers (read by the quota service's own ``ledger.credits_of``); ``services/operator/cli.py`` puts the two
together, so neither service reads the other's tables. Reported:
- missing:    paid at the channel, not credited here (or not even received);
- duplicated: an order listed twice in the CSV, or credited more than once here;
- mismatched: credited with another account, quantity or amount than the channel lists;
- unexpected: credited here, absent from the channel's list;
- unbacked:   a credit with no confirmed purchase behind it (the purchase row missing, rejected or
              still in flight): every credit is reported, whatever happened to its purchase.
Exit code 0 when everything matches, 1 otherwise.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from services.kernel import runtime
from services.kernel.settings import Settings


@dataclass
class Report:
    checked: int = 0
    matched: int = 0
    missing: list[dict] = field(default_factory=list)
    duplicated: list[dict] = field(default_factory=list)
    mismatched: list[dict] = field(default_factory=list)
    unexpected: list[dict] = field(default_factory=list)
    unbacked: list[dict] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.duplicated or self.mismatched or self.unexpected or self.unbacked)


def read_orders(path: str) -> list[dict]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"channel_order_id", "account_id", "quantity", "amount"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise runtime.ConfigError(f"{path}: the header must have {', '.join(sorted(need))}")
        rows = []
        for i, r in enumerate(reader, start=2):
            try:
                rows.append({"channel_order_id": r["channel_order_id"].strip(), "account_id": r["account_id"].strip(),
                             "quantity": int(r["quantity"]), "amount": int(r["amount"])})
            except ValueError:
                raise runtime.ConfigError(f"{path}:{i}: quantity and amount must be whole numbers") from None
        return rows


def compare(orders: list[dict], purchases: list[dict], credited: dict[str, dict]) -> Report:
    """``purchases``: every purchase row of the channel (any status); ``credited``: purchase id ->
    its credit transfers (``count``, ``account_id``, ``quantity``)."""
    rep = Report(checked=len(orders))
    confirmed = {p["channel_order_id"]: p for p in purchases if p["status"] == "confirmed"}
    credits = Counter({pid: c["count"] for pid, c in credited.items()})
    seen = Counter(o["channel_order_id"] for o in orders)
    for oid, n in seen.items():
        if n > 1:
            rep.duplicated.append({"channel_order_id": oid, "where": "csv", "count": n})
    for o in {o["channel_order_id"]: o for o in orders}.values():
        got = confirmed.get(o["channel_order_id"])
        if got is None or credits[got["purchase_id"]] == 0:
            rep.missing.append({**o, "state": got["status"] if got else "not received"})
            continue
        if credits[got["purchase_id"]] > 1:
            rep.duplicated.append({"channel_order_id": o["channel_order_id"], "where": "ledger",
                                   "count": credits[got["purchase_id"]]})
        diffs = {k: {"channel": o[k], "bubuh": got[k]} for k in ("account_id", "quantity", "amount") if o[k] != got[k]}
        if diffs:
            rep.mismatched.append({"channel_order_id": o["channel_order_id"], "differences": diffs})
        else:
            rep.matched += 1
    for oid, got in confirmed.items():
        if oid not in seen and credits[got["purchase_id"]]:
            rep.unexpected.append({"channel_order_id": oid, "purchase_id": got["purchase_id"],
                                   "account_id": got["account_id"], "quantity": got["quantity"]})
    backed = {p["purchase_id"] for p in confirmed.values()}
    rows = {p["purchase_id"]: p for p in purchases}
    for pid, c in sorted(credited.items()):
        if pid not in backed:
            row = rows.get(pid)
            rep.unbacked.append({"purchase_id": pid, "account_id": c["account_id"], "quantity": c["quantity"],
                                 "channel_order_id": row["channel_order_id"] if row else None,
                                 "purchase": row["status"] if row else "missing"})
    return rep


async def purchases_of(settings: Settings, channel_id: str) -> list[dict]:
    """Every purchase row of a channel, any status."""
    pool = await runtime.connect_database(settings, "purchase")
    try:
        rows = await pool.fetch(
            "SELECT purchase_id, channel_order_id, account_id, quantity, amount, status FROM purchases "
            "WHERE channel_id = $1", channel_id)
    finally:
        await pool.close()
    return [dict(r) for r in rows]


def show(rep: Report, channel_id: str, *, as_json: bool) -> int:
    """Print the report; the exit code: 0 when everything matches, 1 otherwise."""
    if as_json:
        print(json.dumps({**asdict(rep), "clean": rep.clean}, indent=2, default=str))
    else:
        print(f"checked {rep.checked} orders of {channel_id}: {rep.matched} matched, {len(rep.missing)} missing, "
              f"{len(rep.duplicated)} duplicated, {len(rep.mismatched)} mismatched, {len(rep.unexpected)} unexpected, "
              f"{len(rep.unbacked)} unbacked")
        for kind in ("missing", "duplicated", "mismatched", "unexpected", "unbacked"):
            for item in getattr(rep, kind):
                print(f"  {kind:10} {json.dumps(item, default=str)}")
    return 0 if rep.clean else 1
