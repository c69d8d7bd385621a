"""The shape of the public verification answer (``POST /v1/verify``), as the OpenAPI document shows it.

``public_verifier.judge`` builds the answer; these models only describe it, so that a verifier's client
reads the contract, not the code. Kept apart from the HTTP routes: nothing here knows about FastAPI.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class Reason(BaseModel):
    code: str = Field(description="A verdict code of the catalogue (docs/errors.md): NO_STAMP, SIGNATURE_BROKEN, "
                                  "NOT_OUR_ISSUER, SN_UNKNOWN, SN_REUSED, MODIFIED_AFTER_STAMPING.")
    detail: str = Field(description="What exactly was found, in words.")
    sn: str | None = Field(None, description="The stamp this reason is about.")
    field: str | None = Field(None, description="The stamp's signature field.")
    revision: int | None = Field(None, description="The revision of the file that made the change (1 = the file "
                                                   "as first written; every incremental update adds one).")
    changed: list[str] | None = Field(None, description="Where the change is, as paths from the trailer, e.g. "
                                                        "`/Root/Pages/Kids[0]/Contents` (as precise as pyHanko's "
                                                        "difference analysis names objects; at most 20).")


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
    timestamped_at: str | None
    timestamp_trusted: bool | None


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
