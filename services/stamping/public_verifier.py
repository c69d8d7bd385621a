"""Public verification: is this SN ours and used once; is this PDF's e-Meterai genuine and unmodified?

Anyone may ask (no API key): the answer reveals nothing about the document beyond what its holder
already has. The signature checks are pyHanko's validator against the issuer's trust roots, and
what may follow a stamp is judged by ``document/signature_validation.py``; what only the issuer can add
is the SN registry: the SN exists, was issued for exactly one request, and the revision the stamp
signed is byte for byte the file we delivered.

Why the registry's ``output_sha256`` makes that comparison exact: the engine's output ends where
the stamp's ``/ByteRange`` ends (B-B, B-T), or where the one or two revisions it appends after the
signature end (B-LT's DSS, B-LTA's document time-stamp), so the sha256 of the delivered file is the
sha256 of the bytes up to one of those revision ends. A document that begins with those bytes is
the delivered file plus later revisions, and those revisions are what the difference analysis
judges; a document whose stamped revision hashes to something else carries an SN we issued for
another file.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
from cryptography import x509
from cryptography.x509.oid import NameOID

from services.kernel import errors
from services.stamping import serial
from services.stamping.document import signature_validation
from services.stamping.sandbox import Sandbox


def verify_upload(_state, data: bytes, roots: list[Path]) -> signature_validation.VerificationReport:
    """In a verification child of the sandbox (its own pool, lower CPU priority, within budget)."""
    return signature_validation.verify(data, roots)


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


@dataclass(frozen=True)
class Issued:
    """One row of the SN registry (``requests``) for an SN."""

    status: str
    output_sha256: str | None
    finished_at: datetime | None


def sn_facts(sn: str, rows: list[Issued]) -> dict:
    issued = [r for r in rows if r.status == "completed"]
    return {"sn": sn, "well_formed": True, "known": bool(issued), "used_once": len(rows) == 1 and len(issued) == 1,
            "issued_at": issued[0].finished_at.isoformat() if issued and issued[0].finished_at else None,
            "document_sha256": issued[0].output_sha256 if issued else None}


def _delivered(sig: signature_validation.SignatureReport, facts: dict) -> bool:
    """The file we delivered for this SN is where the stamp's revision ends (B-B, B-T) or where one of
    the next revisions ends (B-LT: its DSS; B-LTA: and its document time-stamp)."""
    issued = facts["document_sha256"]
    return issued is not None and issued in (sig.revision_sha256, *sig.later_revision_sha256s)


def _registry_findings(sig: signature_validation.SignatureReport, facts: dict) -> list[signature_validation.Finding]:
    if not sig.sn_well_formed:
        return []  # already SN_UNKNOWN from the library
    if not facts["known"]:
        return [signature_validation.Finding(errors.SN_UNKNOWN.code, f"{sig.sn} was never issued (or was voided)")]
    if not facts["used_once"]:
        return [signature_validation.Finding(errors.SN_REUSED.code, f"{sig.sn} is on record for more than one request")]
    if not _delivered(sig, facts):
        return [signature_validation.Finding(
            errors.SN_REUSED.code,
            f"{sig.sn} was issued for another file: the revision this stamp signed (revision {sig.revision}, "
            f"sha256 {sig.revision_sha256}) is not the file delivered for it", revision=sig.revision)]
    return []


def _certificate_status(sig: signature_validation.SignatureReport) -> dict | None:
    """The signing certificate's revocation status, with what it means for this stamp, in words."""
    cs = sig.certificate_status
    if cs is None:
        return None
    poe = sig.proof_of_existence.isoformat() if sig.proof_of_existence else None
    if cs.status == "revoked":
        at = cs.revoked_at.isoformat() if cs.revoked_at else "?"
        whose = "a CA certificate on the path" if cs.ca_revoked else "the signing certificate"
        if cs.revoked_before_proof:
            words = f"{whose} was revoked at {at}, and no trusted time-stamp before that proves the stamp existed"
        else:
            words = f"{whose} was revoked at {at}, after the time-stamp at {poe}: the stamp stays valid"
    elif cs.status == "good":
        words = "the validation data in the file show the certificates on the path not revoked"
    else:
        words = "the validation data in the file do not settle the certificate's status (B-B and B-T stamps " \
                "carry none)"
    return {"status": cs.status, "revoked_at": cs.revoked_at.isoformat() if cs.revoked_at else None,
            "revocation_reason": cs.reason, "ca_revoked": cs.ca_revoked, "etsi_indication": cs.indication,
            "detail": words}


def judge(report: signature_validation.VerificationReport, registry: Mapping[str, list[Issued]]) -> dict:
    """The public answer for ``report``, given the registry rows of each SN it carries.

    ``valid`` only when there is at least one stamp and every stamp has no reason against it.
    A stamp's signature findings come first; the registry is asked only about signatures
    that are ours and intact (another CA's signature with our SN is NOT_OUR_ISSUER, not
    also SN_REUSED).
    """
    stamps, reasons = [], []
    for sig in report.stamps:
        facts = sn_facts(sig.sn, registry.get(sig.sn, [])) if sig.sn_well_formed else \
            {"known": False, "used_once": False, "document_sha256": None}
        found = list(sig.findings)
        ours = not any(f.code in (errors.SIGNATURE_BROKEN.code, errors.NOT_OUR_ISSUER.code) for f in found)
        if ours:
            found = [f for f in found if f.code != errors.MODIFIED_AFTER_STAMPING.code] + \
                _registry_findings(sig, facts) + \
                [f for f in found if f.code == errors.MODIFIED_AFTER_STAMPING.code]
        stamp_reasons = [{**f.as_dict(), "sn": sig.sn, "field": sig.field_name} for f in found]
        reasons.extend(stamp_reasons)
        stamps.append({
            "sn": sig.sn,
            "field": sig.field_name,
            "valid": not found,
            "code": found[0].code if found else None,
            "reasons": stamp_reasons,
            "signature_valid": sig.intact and sig.valid,
            "trusted": sig.trusted,
            "unmodified_since_stamping": sig.covers_entire_file,
            "only_signatures_since_stamping": sig.after_level is not None and not any(
                f.code == errors.MODIFIED_AFTER_STAMPING.code for f in sig.findings),
            "stamp_revision": sig.revision,
            "sn_known": facts["known"],
            "sn_used_once": facts["used_once"],
            "hash_matches_issued": _delivered(sig, facts),
            "signer": sig.signer,
            "signing_time": sig.signing_time.isoformat() if sig.signing_time else None,
            "timestamped_at": sig.timestamp_time.isoformat() if sig.timestamp_time else None,
            "timestamp_trusted": sig.timestamp_trusted,
            "timestamp": sig.timestamp.as_dict() if sig.timestamp else None,
            "document_timestamp": sig.document_timestamp.as_dict() if sig.document_timestamp else None,
            "proof_of_existence": sig.proof_of_existence.isoformat() if sig.proof_of_existence else None,
            "certificate_status": _certificate_status(sig),
        })
    if not stamps:
        reasons.append({"code": errors.NO_STAMP.code, "detail": errors.NO_STAMP.meaning})
    return {"valid": not reasons, "code": reasons[0]["code"] if reasons else None, "reasons": reasons,
            "stamps": stamps, "signatures": len(report.signatures), "revisions": report.revisions}


def issuer_name(roots: list[Path]) -> str:
    """Who issues the stamps, as the page behind the QR names it: the organisation of the first trust
    root (the issuer's CA), else its common name."""
    for path in roots:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue
        for oid in (NameOID.ORGANIZATION_NAME, NameOID.COMMON_NAME):
            names = cert.subject.get_attributes_for_oid(oid)
            if names:
                return str(names[0].value)
    return ""


class PublicVerifier:
    def __init__(self, pool: asyncpg.Pool, trust_roots: list[Path], sandbox: Sandbox, rate: ClientRate) -> None:
        self._pool = pool
        self._roots = trust_roots
        self._sandbox = sandbox
        self._rate = rate
        self.issuer = issuer_name(trust_roots)

    async def _rows(self, sn: str) -> list[Issued]:
        rows = await self._pool.fetch("SELECT status, output_sha256, finished_at FROM requests WHERE sn = $1", sn)
        return [Issued(r["status"], r["output_sha256"], r["finished_at"]) for r in rows]

    async def by_sn(self, sn: str) -> dict:
        sn = sn.strip().upper()
        if not serial.is_valid(sn):
            return {"sn": sn, "known": False, "well_formed": False}
        return sn_facts(sn, await self._rows(sn))

    def admit(self, client: str) -> None:
        """Before the upload is read: over this client's rate is RATE_LIMITED."""
        self._rate.take(client)

    async def document(self, data: bytes) -> dict:
        report = await self._sandbox.run(verify_upload, data, self._roots)
        registry = {sig.sn: await self._rows(sig.sn) for sig in report.stamps if sig.sn_well_formed}
        return judge(report, registry)
