"""Secrets sealed with the platform key (AES-256-GCM), so a channel's HMAC secret can travel on
the channel topic and sit in memory of every service without being readable from Kafka."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x01"


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """``context`` (the channel id) is bound as associated data: a sealed secret cannot be moved to another channel."""
    nonce = os.urandom(12)
    return _VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    if not sealed or sealed[:1] != _VERSION:
        raise ValueError("unknown sealed-secret version")
    return AESGCM(key).decrypt(sealed[1:13], sealed[13:], context)
