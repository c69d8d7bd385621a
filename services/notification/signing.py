"""The webhook signature: ``Bubuh-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">``.

During a secret rotation's grace period a second ``v1=`` carries the signature under the previous
secret, so a receiver that has not switched yet still verifies (the first ``v1`` is always the
current secret). ``verify`` is the receiver's side, as ``docs/webhooks.md`` describes it.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER_SIGNATURE = "Bubuh-Signature"
HEADER_EVENT_ID = "Bubuh-Event-Id"
HEADER_EVENT_TYPE = "Bubuh-Event-Type"
HEADER_DELIVERY_ID = "Bubuh-Delivery-Id"
HEADER_ATTEMPT = "Bubuh-Attempt"


def signed_payload(timestamp: int, body: bytes) -> bytes:
    return str(timestamp).encode() + b"." + body


def sign(secrets: list[bytes], body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    msg = signed_payload(t, body)
    return ",".join([f"t={t}"] + [f"v1={hmac.new(s, msg, hashlib.sha256).hexdigest()}" for s in secrets])


def parse(header: str) -> tuple[int | None, list[str]]:
    t, sigs = None, []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            t = int(value)
        elif key == "v1":
            sigs.append(value.lower())
    return t, sigs


def verify(secret: bytes, header: str, body: bytes, *, tolerance_s: float = 300, now: float | None = None) -> bool:
    """True when a ``v1`` signature matches under ``secret`` and ``t`` is within ``tolerance_s`` of now."""
    t, sigs = parse(header)
    if t is None or abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = hmac.new(secret, signed_payload(t, body), hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, s) for s in sigs)
