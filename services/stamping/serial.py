"""Serial numbers (SN) for e-Meterai, issued by each worker process without a central lock.

Why this shape: every stamp needs an SN before the document is signed (the SN is in
the QR code and the signature's reason), and during a surge many worker processes
issue them at once. A database sequence or a lock would put every stamp behind one
round trip; instead each process owns a node id and builds SNs that cannot collide
with another process's. People read SNs aloud and type them, hence Crockford base32
(no I, L, O, U) and a check character.

Layout (22 Crockford base32 characters, upper case)::

    V NNN TTTTTTTTT CCCC RRRR K
    1  3      9      4    4   1   = 22

* ``V``  (1 char)  scheme version, ``1``. Lets the layout change later without ambiguity.
* ``N``  (3 chars, 15 bits) node id, 0..32767, given to each process by deployment
  (e.g. pod ordinal x cores + worker index). Two live processes must not share one.
* ``T``  (9 chars, 45 bits) milliseconds since 2024-01-01T00:00:00Z (lasts until ~3139).
* ``C``  (4 chars, 20 bits) counter within that millisecond: 1,048,576 SNs per ms per
  node, far beyond what one process can sign (a few hundred per second).
* ``R``  (4 chars, 20 bits) instance salt, drawn at random once per issuer. It guards
  against operator error: if two processes were started with the same node id, their
  SNs still differ unless the salts also match (1 in 1,048,576).
* ``K``  (1 char) check character: the Damm algorithm over the quasigroup
  ``x * y = a.x + y`` in GF(32) (``a`` = the field's generator, modulus x^5 + x^2 + 1),
  computed over the 21 characters before it. A totally anti-symmetric quasigroup
  makes Damm detect every single substitution and every transposition of adjacent
  characters (including the check character itself), and GF(32) keeps the check
  character inside the same 32-symbol alphabet. ISO 7064 MOD 37,36, the obvious
  candidate, was measured and rejected: as a hybrid system it misses adjacent
  transpositions in 72 of the 45,360 (state, pair) cases (``12WABMM...`` and
  ``12WBAMM...`` share a check character), and its check needs 36 symbols.

Uniqueness within a process does not depend on the wall clock: the issuer keeps a
logical clock ``max(now_ms, last_ms)``. If the clock goes back (NTP step, VM
migration) the issuer keeps using ``last_ms`` and counting; when the counter of a
millisecond is exhausted it moves the logical clock one millisecond ahead instead of
sleeping. The T field is therefore "not earlier than" the issuing time, never a
precise timestamp. Across a restart with the same node id, a clock that went back
more than the previous process ran ahead could repeat (node, T, C); the instance salt
then keeps the SNs apart with probability 1 - 2^-20.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_VALUE = {c: i for i, c in enumerate(CROCKFORD)}
_GF32_MODULUS = 0b100101  # x^5 + x^2 + 1, irreducible over GF(2)

VERSION = "1"
LENGTH = 22
NODE_CHARS, TIME_CHARS, COUNTER_CHARS, SALT_CHARS = 3, 9, 4, 4
MAX_NODE = 32**NODE_CHARS - 1
MAX_COUNTER = 32**COUNTER_CHARS - 1
EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def _encode(value: int, width: int) -> str:
    if value < 0 or value >= 32**width:
        raise ValueError(f"{value} does not fit in {width} base32 characters")
    out = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        out.append(CROCKFORD[digit])
    return "".join(reversed(out))


def _decode(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 32 + _CROCKFORD_VALUE[ch]
    return value


def _times_a(x: int) -> int:
    """Multiply by the generator in GF(32)."""
    x <<= 1
    return x ^ _GF32_MODULUS if x & 0b100000 else x


def check_char(payload: str) -> str:
    """Damm check character for ``payload`` (Crockford symbols); see the module docstring."""
    interim = 0
    for ch in payload:
        interim = _times_a(interim) ^ _CROCKFORD_VALUE[ch]
    # the check c must bring the interim to zero: a.interim + c = 0, and -x = x in GF(2^5)
    return CROCKFORD[_times_a(interim)]


def is_valid(sn: str) -> bool:
    """True when ``sn`` is a well-formed SN of this scheme with a correct check character."""
    if not isinstance(sn, str) or len(sn) != LENGTH or sn[0] != VERSION:
        return False
    if any(ch not in _CROCKFORD_VALUE for ch in sn):
        return False
    return check_char(sn[:-1]) == sn[-1]


@dataclass(frozen=True)
class SerialFields:
    node_id: int
    issued_ms: int  # unix ms (logical clock: not earlier than the real issuing time)
    counter: int
    salt: int


def parse(sn: str) -> SerialFields:
    """Split a valid SN into its fields (for operations and forensics)."""
    if not is_valid(sn):
        raise ValueError(f"not a valid SN: {sn!r}")
    fields = []
    at = 1
    for width in (NODE_CHARS, TIME_CHARS, COUNTER_CHARS, SALT_CHARS):
        fields.append(_decode(sn[at:at + width]))
        at += width
    node, t, counter, salt = fields
    return SerialFields(node, t + EPOCH_MS, counter, salt)


class SerialIssuer:
    """Issues SNs for one process; thread-safe. ``node_id`` must be unique among live processes."""

    def __init__(self, node_id: int, *, clock=time.time_ns, salt: int | None = None) -> None:
        if not 0 <= node_id <= MAX_NODE:
            raise ValueError(f"node_id must be 0..{MAX_NODE}")
        self._clock = clock
        self._prefix = VERSION + _encode(node_id, NODE_CHARS)
        self._salt = _encode(secrets.randbelow(32**SALT_CHARS) if salt is None else salt, SALT_CHARS)
        self._last_ms = -1
        self._counter = 0
        self._lock = threading.Lock()

    def _tick(self) -> tuple[int, int]:
        now = self._clock() // 1_000_000 - EPOCH_MS
        with self._lock:
            if now > self._last_ms:
                self._last_ms, self._counter = now, 0
            elif self._counter < MAX_COUNTER:
                self._counter += 1  # same ms, or the clock went back: keep counting on last_ms
            else:
                self._last_ms, self._counter = self._last_ms + 1, 0  # borrow the next ms
            return self._last_ms, self._counter

    def next(self) -> str:
        ms, counter = self._tick()
        payload = (
            self._prefix + _encode(ms, TIME_CHARS) + _encode(counter, COUNTER_CHARS) + self._salt
        )
        return payload + check_char(payload)
