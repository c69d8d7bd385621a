"""Pure rules of the purchase service: validation codes, purchase identity, reconciliation."""

from __future__ import annotations

import datetime as dt

import pytest

from services.kernel import errors
from services.purchase.reconciliation import compare
from services.purchase.validation import PurchaseOrder, validate

NOW = dt.datetime(2024, 9, 5, 3, 0, tzinfo=dt.UTC)


def order(**over) -> PurchaseOrder:
    base = dict(channel_id="ch_1", channel_order_id="O-1", account_id="a1", quantity=2, amount=20_000,
                paid_at=NOW - dt.timedelta(minutes=5), payment_ref="VA")
    base.update(over)
    return PurchaseOrder(**base)


@pytest.mark.parametrize("over, code", [
    (dict(amount=19_999), "AMOUNT_MISMATCH"),
    (dict(quantity=0, amount=0), "QUANTITY_OUT_OF_RANGE"),
    (dict(quantity=10_001, amount=100_010_000), "QUANTITY_OUT_OF_RANGE"),
    (dict(quantity=-1, amount=-10_000), "QUANTITY_OUT_OF_RANGE"),
    (dict(account_id=""), "ACCOUNT_ID_INVALID"),
    (dict(account_id="x" * 65), "ACCOUNT_ID_INVALID"),
    (dict(account_id="a b"), "ACCOUNT_ID_INVALID"),
    (dict(paid_at=NOW + dt.timedelta(minutes=5)), "PAID_AT_IN_FUTURE"),
    (dict(paid_at=dt.datetime(2024, 9, 5, 3, 0)), "BODY_INVALID"),
    (dict(channel_order_id=""), "BODY_INVALID"),
])
def test_each_rule_has_its_code(over, code):
    with pytest.raises(errors.BubuhError) as exc:
        validate(order(**over), price=10_000, max_quantity=10_000, now=NOW)
    assert exc.value.code.code == code


def test_a_valid_order_passes_and_small_clock_skew_is_tolerated():
    validate(order(), price=10_000, max_quantity=10_000, now=NOW)
    validate(order(paid_at=NOW + dt.timedelta(seconds=30)), price=10_000, max_quantity=10_000, now=NOW)


def test_purchase_id_is_stable_for_the_same_body_and_differs_for_another():
    assert order().purchase_id() == order().purchase_id()
    # the same instant in another zone is the same body
    assert order(paid_at=(NOW - dt.timedelta(minutes=5)).astimezone(dt.timezone(dt.timedelta(hours=7)))
                 ).purchase_id() == order().purchase_id()
    assert order(quantity=3, amount=30_000).purchase_id() != order().purchase_id()
    assert order(channel_id="ch_2").purchase_id() != order().purchase_id()


def test_reconciliation_reports_missing_duplicated_mismatched_and_unexpected():
    csv_orders = [
        {"channel_order_id": "A", "account_id": "x", "quantity": 1, "amount": 10_000},
        {"channel_order_id": "B", "account_id": "x", "quantity": 2, "amount": 20_000},
        {"channel_order_id": "B", "account_id": "x", "quantity": 2, "amount": 20_000},
        {"channel_order_id": "C", "account_id": "y", "quantity": 1, "amount": 10_000},
        {"channel_order_id": "D", "account_id": "z", "quantity": 1, "amount": 10_000},
    ]
    purchases = [
        {"channel_order_id": "A", "purchase_id": "pA", "account_id": "x", "quantity": 1, "amount": 10_000,
         "status": "confirmed"},
        {"channel_order_id": "B", "purchase_id": "pB", "account_id": "x", "quantity": 2, "amount": 20_000,
         "status": "confirmed"},
        {"channel_order_id": "C", "purchase_id": "pC", "account_id": "y", "quantity": 3, "amount": 30_000,
         "status": "confirmed"},
        {"channel_order_id": "E", "purchase_id": "pE", "account_id": "q", "quantity": 1, "amount": 10_000,
         "status": "confirmed"},
    ]
    rep = compare(csv_orders, purchases, _credits("pA", "pB", "pC", "pE"))
    assert rep.matched == 2
    assert [m["channel_order_id"] for m in rep.missing] == ["D"]
    assert rep.duplicated == [{"channel_order_id": "B", "where": "csv", "count": 2}]
    assert [m["channel_order_id"] for m in rep.mismatched] == ["C"]
    assert rep.mismatched[0]["differences"]["quantity"] == {"channel": 1, "bubuh": 3}
    assert [u["channel_order_id"] for u in rep.unexpected] == ["E"]
    assert rep.unbacked == []
    assert not rep.clean


def _credits(*purchase_ids: str, quantity: int = 1) -> dict[str, dict]:
    return {p: {"count": 1, "account_id": "x", "quantity": quantity} for p in purchase_ids}


def test_reconciliation_reports_every_credit_even_without_a_confirmed_purchase():
    """A credit whose purchase was flipped to rejected, or whose row is gone, is still reported."""
    orders = [{"channel_order_id": "A", "account_id": "x", "quantity": 1, "amount": 10_000}]
    purchases = [
        {"channel_order_id": "A", "purchase_id": "pA", "account_id": "x", "quantity": 1, "amount": 10_000,
         "status": "confirmed"},
        {"channel_order_id": "F", "purchase_id": "pF", "account_id": "x", "quantity": 7, "amount": 70_000,
         "status": "rejected"},
    ]
    rep = compare(orders, purchases, {**_credits("pA"), **_credits("pF", "pGone", quantity=7)})
    assert rep.matched == 1 and not rep.missing and not rep.unexpected
    assert rep.unbacked == [
        {"purchase_id": "pF", "account_id": "x", "quantity": 7, "channel_order_id": "F", "purchase": "rejected"},
        {"purchase_id": "pGone", "account_id": "x", "quantity": 7, "channel_order_id": None, "purchase": "missing"}]
    assert not rep.clean
