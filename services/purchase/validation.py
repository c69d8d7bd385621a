"""What makes a purchase acceptable, and the purchase's identity.

Both doors (HTTP and Kafka) use the same rules and the same id derivation, so a purchase that
arrives through both, or three times, is one purchase.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from dataclasses import dataclass

from services.kernel import derived_ids, errors

ACCOUNT_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
ORDER_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
CLOCK_SKEW = dt.timedelta(seconds=60)   # a channel's clock may run slightly ahead of ours
_NAMESPACE = uuid.UUID("6f1c1a4e-2f0b-4c53-9b7e-6d8a2b4f0e11").bytes


@dataclass(frozen=True)
class PurchaseOrder:
    channel_id: str
    channel_order_id: str
    account_id: str
    quantity: int
    amount: int
    paid_at: dt.datetime
    payment_ref: str = ""
    buyer_email: str = ""

    def body_sha256(self) -> str:
        """Fingerprint of what the channel asserted; the same order id with another fingerprint is a mismatch."""
        # computed once per order, kept in the instance's __dict__ (a frozen dataclass has one); not a
        # functools.cached_property, whose lock cost more than the hash on Python 3.11
        found = self.__dict__.get("_fingerprint")
        if found is None:
            found = self.__dict__["_fingerprint"] = self._compute_fingerprint()
        return found

    def purchase_id(self) -> str:
        """Deterministic: a retry of the same order gets the same id, without asking any database."""
        found = self.__dict__.get("_purchase_id")
        if found is None:
            found = self.__dict__["_purchase_id"] = derived_ids.uuid5(
                _NAMESPACE, f"{self.channel_id}\x1f{self.channel_order_id}\x1f{self.body_sha256()}")
        return found

    def _compute_fingerprint(self) -> str:
        utc = self.paid_at.astimezone(dt.UTC)
        # the strftime form ("%Y-%m-%dT%H:%M:%S.%fZ"), which isoformat gives faster from year 1000 on
        # (below it, strftime does not pad the year on every platform: it decides)
        paid = utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z" if utc.year >= 1000 \
            else utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        canon = "\x1f".join([self.channel_order_id, self.account_id, str(self.quantity), str(self.amount), paid,
                             self.payment_ref])
        return hashlib.sha256(canon.encode()).hexdigest()


def validate(order: PurchaseOrder, *, price: int, max_quantity: int, now: dt.datetime | None = None) -> None:
    """Raise ``BubuhError`` with the first rule the order breaks."""
    if not ORDER_ID.match(order.channel_order_id or ""):
        raise errors.BubuhError(errors.BODY_INVALID, "channel_order_id: 1-128 printable ASCII characters")
    if not ACCOUNT_ID.match(order.account_id or ""):
        raise errors.BubuhError(errors.ACCOUNT_ID_INVALID, f"account_id {order.account_id[:80]!r}")
    if not 1 <= order.quantity <= max_quantity:
        raise errors.BubuhError(errors.QUANTITY_OUT_OF_RANGE, f"quantity {order.quantity} not in 1..{max_quantity}")
    if order.amount != order.quantity * price:
        raise errors.BubuhError(errors.AMOUNT_MISMATCH,
                                f"amount {order.amount} != {order.quantity} x {price} = {order.quantity * price}")
    now = now or dt.datetime.now(dt.UTC)
    if order.paid_at.tzinfo is None:
        raise errors.BubuhError(errors.BODY_INVALID, "paid_at needs a time zone (e.g. 2024-09-05T10:00:00+07:00)")
    if order.paid_at > now + CLOCK_SKEW:
        raise errors.BubuhError(errors.PAID_AT_IN_FUTURE, f"paid_at {order.paid_at.isoformat()} is after now")
    if len(order.payment_ref) > 256:
        raise errors.BubuhError(errors.BODY_INVALID, "payment_ref: at most 256 characters")
