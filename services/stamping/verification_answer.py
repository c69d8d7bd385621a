"""The shape of the public verification answer (``POST /v1/verify``), as the OpenAPI document shows it.

``public_verifier.judge`` builds the answer; these models only describe it, so that a verifier's client
reads the contract, not the code. Kept apart from the HTTP routes: nothing here knows about FastAPI.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class Reason(BaseModel):
    code: str = Field(description="A verdict code of the catalogue (docs/errors.md): NO_STAMP, SIGNATURE_BROKEN, "
                                  "NOT_OUR_ISSUER, CERT_REVOKED, SN_UNKNOWN, SN_REUSED, MODIFIED_AFTER_STAMPING.")
    detail: str = Field(description="What exactly was found, in words.")
    sn: str | None = Field(None, description="The stamp this reason is about.")
    field: str | None = Field(None, description="The stamp's signature field.")
    revision: int | None = Field(None, description="The revision of the file that made the change (1 = the file "
                                                   "as first written; every incremental update adds one).")
    changed: list[str] | None = Field(None, description="Where the change is, as paths from the trailer, e.g. "
                                                        "`/Root/Pages/Kids[0]/Contents` (as precise as pyHanko's "
                                                        "difference analysis names objects; at most 20).")


class TimeStamp(BaseModel):
    time: str = Field(description="The time-stamp token's genTime.")
    tsa: str = Field(description="The time-stamp authority (its certificate's subject).")
    trusted: bool = Field(description="The token is intact and its TSA chains to the trust roots.")


class CertificateStatus(BaseModel):
    status: str = Field(description="`good`, `revoked` or `unknown`, from the CRLs and OCSP responses the file "
                                    "carries (its DSS; the signature's revocation archival attribute).")
    revoked_at: str | None = Field(None, description="When the certificate was revoked (`revoked` only).")
    revocation_reason: str | None = Field(None, description="The CRL reason, e.g. `key_compromise`.")
    ca_revoked: bool = Field(False, description="The revoked certificate is a CA above the signing certificate.")
    etsi_indication: str = Field(description="pyHanko's ETSI EN 319 102-1 validation with time: `PASSED`, or "
                                             "`INDETERMINATE/<subindication>` / `FAILED/<subindication>`. A "
                                             "revoked certificate with `PASSED` was revoked after the time-stamp.")
    detail: str = Field(description="The same, in words.")


class StampVerdict(BaseModel):
    sn: str
    field: str
    valid: bool = Field(description="This stamp vouches for the document: no reason against it.")
    code: str | None = Field(description="The first of `reasons`, or null.")
    reasons: list[Reason]
    signature_valid: bool = Field(description="The signed bytes hash to the signed digest and the signature "
                                              "value verifies.")
    trusted: bool = Field(description="The signing certificate chains to the issuer's trust roots.")
    unmodified_since_stamping: bool = Field(description="Nothing at all was appended after the stamp.")
    only_signatures_since_stamping: bool = Field(
        description="What was appended after the stamp (if anything) is only new signatures with their "
                    "appearances, validation data (DSS) or document time-stamps.")
    stamp_revision: int = Field(description="The revision of the file the stamp was added in.")
    sn_known: bool
    sn_used_once: bool
    hash_matches_issued: bool = Field(description="The bytes the stamp's revision spans are exactly the file "
                                                  "the issuer delivered for this SN (sha256).")
    signer: str
    signing_time: str | None
    timestamped_at: str | None = Field(description="The signature time-stamp's genTime (as `timestamp.time`).")
    timestamp_trusted: bool | None
    timestamp: TimeStamp | None = Field(None, description="The signature time-stamp (PAdES B-T and above).")
    document_timestamp: TimeStamp | None = Field(
        None, description="The latest document time-stamp after the stamp (PAdES B-LTA; renewed by "
                          "`bubuh renew-timestamps`): it proves the stamp and its validation data existed then.")
    proof_of_existence: str | None = Field(
        None, description="The earliest time the stamp provably existed (ETSI's best-signature-time: the "
                          "signature time-stamp's genTime), the time a revocation is compared with.")
    certificate_status: CertificateStatus | None = Field(
        None, description="The signing certificate's revocation status as the file's own validation data "
                          "establish it; null when the signature is broken or not the issuer's.")


class VerificationAnswer(BaseModel):
    valid: bool = Field(description="True only when the PDF carries at least one e-Meterai and every one of them "
                                    "is intact, made by the issuer, carries an SN issued for exactly this "
                                    "document, and was followed by nothing but signatures, DSS and document "
                                    "time-stamps.")
    code: str | None = Field(description="The first reason, or null when valid.")
    reasons: list[Reason] = Field(description="Every reason against any stamp (plus NO_STAMP when there is none).")
    stamps: list[StampVerdict]
    signatures: int = Field(description="Signatures in the file, stamps and others (e.g. the applicant's).")
    revisions: int = Field(description="Revisions in the file (1 + incremental updates).")
