"""Public verification: is this SN ours and used once; is this PDF's e-Meterai genuine and unmodified?

Anyone may ask (no API key): the answer reveals nothing about the document beyond what its holder
already has. The signature checks are pyHanko's validator against the issuer's trust roots
(``document/verification.py``); what only the issuer can add is the SN registry: the SN exists,
was issued for exactly one request, and the stamped file's hash is the one we stored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import asyncpg

from services.kernel import errors
from services.stamping import serial
from services.stamping.document import verification
from services.stamping.sandbox import Sandbox


def verify_upload(_state, data: bytes, roots: list[Path]) -> verification.VerificationReport:
    """In a verification child of the sandbox (its own pool, lower CPU priority, within budget)."""
    return verification.verify(data, roots)


class ClientRate:
    """A token bucket per client address: anonymous verification cannot be flooded from one place.

    Bounded: the least recently seen addresses are forgotten beyond ``max_clients``.
    """

    def __init__(self, per_s: float, burst: int, max_clients: int = 10_000) -> None:
        self._per_s = per_s
        self._burst = float(burst)
        self._max = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # client -> (tokens, at)

    def take(self, client: str) -> None:
        now = time.monotonic()
        tokens, at = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._per_s)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            wait = (1.0 - tokens) / self._per_s if self._per_s > 0 else 60.0
            raise errors.BubuhError(errors.RATE_LIMITED, f"verification from {client}: retry in {wait:.1f} s")
        self._buckets[client] = (tokens - 1.0, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)


class PublicVerifier:
    def __init__(self, pool: asyncpg.Pool, trust_roots: list[Path], sandbox: Sandbox, rate: ClientRate) -> None:
        self._pool = pool
        self._roots = trust_roots
        self._sandbox = sandbox
        self._rate = rate

    async def by_sn(self, sn: str) -> dict:
        sn = sn.strip().upper()
        if not serial.is_valid(sn):
            return {"sn": sn, "known": False, "well_formed": False}
        rows = await self._pool.fetch("SELECT status, output_sha256, finished_at FROM requests WHERE sn = $1", sn)
        issued = [r for r in rows if r["status"] == "completed"]
        return {"sn": sn, "well_formed": True, "known": bool(issued), "used_once": len(rows) == 1 and len(issued) == 1,
                "issued_at": issued[0]["finished_at"].isoformat() if issued else None,
                "document_sha256": issued[0]["output_sha256"] if issued else None}

    def admit(self, client: str) -> None:
        """Before the upload is read: over this client's rate is RATE_LIMITED."""
        self._rate.take(client)

    async def document(self, data: bytes) -> dict:
        report = await self._sandbox.run(verify_upload, data, self._roots)
        stamps = []
        for sig in report.stamps:
            registry = await self.by_sn(sig.sn) if sig.sn else {"known": False, "used_once": False}
            stamps.append({
                "sn": sig.sn,
                "signature_valid": sig.intact and sig.valid,
                "trusted": sig.trusted,
                "unmodified_since_stamping": sig.covers_entire_file,
                "sn_known": registry.get("known", False),
                "sn_used_once": registry.get("used_once", False),
                "hash_matches_issued": registry.get("document_sha256") == sig.revision_sha256,
                "signer": sig.signer,
                "signing_time": sig.signing_time.isoformat() if sig.signing_time else None,
                "timestamped_at": sig.timestamp_time.isoformat() if sig.timestamp_time else None,
                "timestamp_trusted": sig.timestamp_trusted,
            })
        valid = bool(stamps) and all(s["signature_valid"] and s["trusted"] and s["sn_known"] and s["sn_used_once"]
                                     and s["hash_matches_issued"] for s in stamps)
        return {"valid": valid, "stamps": stamps, "signatures": len(report.signatures)}
