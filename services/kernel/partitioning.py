"""Which partition a keyed record goes to: Kafka's default partitioner, identical to the Java client's.

Channels publish with Java clients, and the platform's own producers must put an account's records
on the same partition as theirs (ordering per account), so the hash is Kafka's murmur2 (seed
0x9747b28c, ``Utils.murmur2``), then ``& 0x7fffffff`` and modulo the partition count.

aiokafka's ``DefaultPartitioner`` computes the same value in pure Python one byte at a time; at a
few records per purchase it was a visible share of a consumer's CPU. Here the 4-byte words are
unpacked at once, and the hashes of recent keys are remembered: the records of one account
(submitted, confirmed, credited, notified) come in bursts, so most keys were hashed a moment ago.
"""

from __future__ import annotations

import random
import struct
from functools import lru_cache

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
KEY_CACHE = 65_536          # keys whose hash is remembered (a few MB at most)


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of ``data`` as an unsigned 32-bit int (as aiokafka's ``murmur2`` returns it)."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    n4 = length >> 2
    if n4:
        for k in struct.unpack_from(f"<{n4}I", data):
            k = (k * _M) & _MASK
            k ^= k >> 24
            k = (k * _M) & _MASK
            h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        base = length & ~3
        if tail >= 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h ^= data[base]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


_cached_murmur2 = lru_cache(maxsize=KEY_CACHE)(murmur2)


def partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's partitioner signature; same choice as its ``DefaultPartitioner`` for every key."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[(_cached_murmur2(bytes(key)) & 0x7FFFFFFF) % len(all_partitions)]
