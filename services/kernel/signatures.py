"""HMAC-SHA256 signatures: channels sign what they publish to Kafka; Bubuh signs its webhooks."""

from __future__ import annotations

import hashlib
import hmac

# The one header a channel's Kafka record needs: lowercase hex HMAC-SHA256 of the record value under
# the channel's secret. The channel is the one the signed payload names (docs/channels.md); a
# ``bubuh-channel`` header that older clients send is ignored.
HEADER_HMAC = "bubuh-hmac"


def hmac_hex(secret: bytes, data: bytes) -> str:
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def matches(secrets: list[bytes], data: bytes, signature_hex: str) -> bool:
    """True when ``signature_hex`` is the HMAC of ``data`` under any of ``secrets`` (constant time)."""
    sig = signature_hex.strip().lower()
    return any(hmac.compare_digest(hmac_hex(s, data), sig) for s in secrets)
