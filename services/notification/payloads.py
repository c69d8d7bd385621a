"""What a channel and a buyer are told about each event: the webhook type, its ``data``, the address.

The webhook body is an explicit, documented contract (``docs/webhooks.md``), built field by field
rather than dumped from the protobuf: internal fields stay internal and numbers stay numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import re

from google.protobuf.message import Message

from services.contracts.bubuh.v1 import purchase_pb2, quota_pb2, stamp_pb2
from services.kernel.events import Event

_EMAIL = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")


def _balance(b: quota_pb2.Balance) -> dict[str, int]:
    return {"credited": b.credited, "pending": b.pending, "committed": b.committed, "available": b.available}


def _quota_credited(m: quota_pb2.QuotaCredited) -> dict:
    return {"channel_id": m.channel_id, "account_id": m.account_id, "purchase_id": m.purchase_id,
            "quantity": m.quantity, "balance": _balance(m.balance)}


def _quota_rejected(m: quota_pb2.QuotaRejected) -> dict:
    return {"channel_id": m.channel_id, "account_id": m.account_id, "request_id": m.request_id,
            "code": m.code, "detail": m.detail, "balance": _balance(m.balance)}


def _purchase_rejected(m: purchase_pb2.PurchaseRejected) -> dict:
    return {"channel_id": m.channel_id, "account_id": m.account_id, "purchase_id": m.purchase_id,
            "channel_order_id": m.channel_order_id, "code": m.code, "detail": m.detail}


def _stamp_completed(m: stamp_pb2.StampCompleted) -> dict:
    data = {"channel_id": m.channel_id, "account_id": m.account_id, "request_id": m.request_id,
            "sn": m.sn, "output_sha256": m.output_sha256}
    if m.rewritten_sha256:     # as the status read: present only when the stamp went onto a rewrite
        data["rewritten_sha256"] = m.rewritten_sha256
    return data


def _stamp_failed(m: stamp_pb2.StampFailed) -> dict:
    return {"channel_id": m.channel_id, "account_id": m.account_id, "request_id": m.request_id,
            "code": m.code, "detail": m.detail, "permanent": m.permanent}


# protobuf type -> (webhook type, data builder, the field holding the buyer's address or "")
KINDS: dict[type[Message], tuple[str, object, str]] = {
    quota_pb2.QuotaCredited: ("quota.credited", _quota_credited, "buyer_email"),
    quota_pb2.QuotaRejected: ("quota.rejected", _quota_rejected, ""),
    purchase_pb2.PurchaseRejected: ("purchase.rejected", _purchase_rejected, ""),
    stamp_pb2.StampCompleted: ("stamp.completed", _stamp_completed, "email"),
    stamp_pb2.StampFailed: ("stamp.failed", _stamp_failed, "email"),
}


# the event types the notification intake acts on (the pipeline skips the rest unread)
TYPES = frozenset(msg.DESCRIPTOR.full_name for msg in KINDS)


def kind_of(msg: Message) -> str | None:
    found = KINDS.get(type(msg))
    return found[0] if found else None


def data_of(msg: Message) -> dict:
    return KINDS[type(msg)][1](msg)  # type: ignore[operator]


def email_of(msg: Message) -> str:
    """The buyer's address when the request carried a plausible one, else ''."""
    field = KINDS[type(msg)][2]
    address = getattr(msg, field, "").strip() if field else ""
    return address if _EMAIL.match(address) else ""


def created_at(event: Event) -> str:
    when = event.envelope.occurred_at.ToDatetime(tzinfo=dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhook_body(event: Event) -> bytes:
    """The exact bytes POSTed (and signed): ``{"id", "type", "created_at", "data"}``."""
    body = {"id": event.event_id, "type": kind_of(event.payload), "created_at": created_at(event),
            "data": data_of(event.payload)}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
