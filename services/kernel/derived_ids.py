"""Deterministic ids: a UUID version 5 (RFC 4122, SHA-1) as its canonical string.

The same string ``str(uuid.uuid5(namespace, name))`` gives, built straight from the digest: the
platform derives several ids per purchase (purchase id, event ids, notification ids), and the
``uuid.UUID`` objects in between were a visible share of a consumer's CPU. Replays must publish the
same ids, so the output is exactly the standard library's (the unit tests compare both).
"""

from __future__ import annotations

import uuid
from hashlib import sha1


def uuid5(namespace: uuid.UUID | bytes, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))``; ``namespace`` may be given as its 16 bytes."""
    ns = namespace.bytes if isinstance(namespace, uuid.UUID) else namespace
    h = bytearray(sha1(ns + name.encode(), usedforsecurity=False).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50           # version 5
    h[8] = (h[8] & 0x3F) | 0x80           # RFC 4122 variant
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def uuid_bytes(text: str) -> bytes:
    """``uuid.UUID(text).bytes``, to use as a namespace; the canonical form without the object."""
    if len(text) == 36 and text[8] == text[13] == text[18] == text[23] == "-":
        try:
            return bytes.fromhex(text.replace("-", ""))
        except ValueError:
            pass                          # not hex: the standard library says why
    return uuid.UUID(text).bytes
