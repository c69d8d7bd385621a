"""Verifying a stamped PDF: is each signature intact, valid, trusted, and is ours the last word?

Why here and with pyHanko's validator: the public "upload a PDF" verification and our
own tests must judge a stamp the way a relying party would, not the way our engine
thinks it wrote it. pyHanko's ``validate_pdf_signature`` checks the CMS signature,
builds the certificate path to the trust roots we give it (the issuer CA; the dev CA
in tests), and tells how much of the file the signature covers. A stamp followed by
further incremental updates is not necessarily forged (a later e-Meterai or signature
is legitimate) but it is reported, since "unmodified since stamping" is what a
verifier promises.

The SN comes from the signature's reason, ``"[SN] reason"``, the convention existing
issuer adapters use; whether that SN exists and was used once is the verification
service's question (it owns the SN registry), not this library's.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from asn1crypto import x509 as asn1_x509

from services.kernel import errors
from services.kernel.errors import BubuhError
from services.stamping import serial

_REASON_SN = re.compile(r"^\[([0-9A-Z]{22})\]")


@dataclass(frozen=True)
class SignatureReport:
    field_name: str
    signer: str  # the certificate subject, human readable
    intact: bool  # the signed bytes hash to the digest in the signature
    valid: bool  # the cryptographic signature over that digest verifies
    trusted: bool  # the certificate chains to a given trust root, key usage acceptable
    covers_entire_file: bool  # False: something was appended after this signature
    modification_level: str | None  # pyHanko's judgement of later updates (NONE, FORM_FILLING...)
    reason: str | None
    location: str | None
    sn: str | None  # from "[SN] reason"; None for signatures that are not e-Meterai
    sn_well_formed: bool  # the SN's layout and check character are right
    signing_time: datetime | None  # as the signer claims (/M); a TSA time is in timestamp_time
    timestamp_time: datetime | None  # from a trusted signature time-stamp (PAdES B-T), if any
    timestamp_trusted: bool | None
    md_algorithm: str
    subfilter: str
    revision_sha256: str  # sha256 of the file as it was when this signature was made
    summary: str

    @property
    def modified_after(self) -> bool:
        return not self.covers_entire_file

    @property
    def ok(self) -> bool:
        return self.intact and self.valid and self.trusted


@dataclass(frozen=True)
class VerificationReport:
    sha256: str
    signatures: tuple[SignatureReport, ...]  # in signing order

    @property
    def stamps(self) -> tuple[SignatureReport, ...]:
        """The signatures that carry an SN in their reason (e-Meterai)."""
        return tuple(s for s in self.signatures if s.sn is not None)


def _load_roots(trust_roots: Iterable) -> list[asn1_x509.Certificate]:
    from pyhanko.keys import load_certs_from_pemder_data

    roots: list[asn1_x509.Certificate] = []
    for item in trust_roots:
        if isinstance(item, asn1_x509.Certificate):
            roots.append(item)
        elif isinstance(item, (str, Path)):
            roots.extend(load_certs_from_pemder_data(Path(item).read_bytes()))
        elif isinstance(item, (bytes, bytearray)):
            roots.extend(load_certs_from_pemder_data(bytes(item)))
        else:  # a cryptography certificate
            from cryptography.hazmat.primitives.serialization import Encoding

            roots.append(asn1_x509.Certificate.load(item.public_bytes(Encoding.DER)))
    return roots


def verify(data: bytes, trust_roots: Iterable, *, allow_fetching: bool = False) -> VerificationReport:
    """Validate every signature in ``data`` against ``trust_roots`` (certs, PEM/DER bytes or paths).

    Raises ``BubuhError(PDF_INVALID | PDF_MALFORMED)`` when the file cannot be read at all.
    Revocation is checked in soft-fail mode: without fetching (the default, for tests and
    offline use) an unknown revocation status does not make a signature untrusted.
    """
    from pyhanko.pdf_utils.misc import PdfError
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    if not data or b"%PDF-" not in data[:1024]:
        raise BubuhError(errors.PDF_INVALID, "no %PDF- header in the first 1024 bytes")
    roots = _load_roots(trust_roots)
    try:
        reader = PdfFileReader(io.BytesIO(data))
        embedded = list(reader.embedded_regular_signatures)
    except RecursionError as exc:
        raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
    except (PdfError, ValueError, KeyError) as exc:
        raise BubuhError(errors.PDF_MALFORMED, f"cannot read: {exc}") from exc

    reports = []
    for sig in embedded:
        vc = ValidationContext(trust_roots=roots, allow_fetching=allow_fetching)
        sig_obj = sig.sig_object
        reason = _text(sig_obj.get("/Reason"))
        match = _REASON_SN.match(reason or "")
        sn = match.group(1) if match else None
        byte_range = [int(v) for v in sig_obj["/ByteRange"]]
        revision_end = byte_range[2] + byte_range[3]
        try:
            status = validate_pdf_signature(sig, vc)
        except RecursionError as exc:
            raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
        except Exception as exc:  # noqa: BLE001 - a hostile signature must not abort the report
            # e.g. a forged chain whose names match a trust root but whose key type does not:
            # pyhanko-certvalidator asserts instead of reporting. Report it as not valid.
            reports.append(_failed(sig, sn, reason, sig_obj, data[:revision_end], exc))
            continue
        ts = status.timestamp_validity
        mod_level = status.modification_level
        reports.append(SignatureReport(
            field_name=sig.field_name,
            signer=status.signing_cert.subject.human_friendly,
            intact=bool(status.intact),
            valid=bool(status.valid),
            trusted=bool(status.trusted),
            covers_entire_file=status.coverage is not None and status.coverage.name == "ENTIRE_FILE",
            modification_level=mod_level.name if mod_level is not None else None,
            reason=reason,
            location=_text(sig_obj.get("/Location")),
            sn=sn,
            sn_well_formed=bool(sn) and serial.is_valid(sn),
            signing_time=sig.self_reported_timestamp,
            timestamp_time=ts.timestamp if ts is not None else None,
            timestamp_trusted=bool(ts.trusted) if ts is not None else None,
            md_algorithm=status.md_algorithm,
            subfilter=str(sig_obj.get("/SubFilter", "")),
            revision_sha256=hashlib.sha256(data[:revision_end]).hexdigest(),
            summary=status.summary(),
        ))
    return VerificationReport(sha256=hashlib.sha256(data).hexdigest(), signatures=tuple(reports))


def _failed(sig, sn, reason, sig_obj, revision: bytes, exc: Exception) -> SignatureReport:
    try:
        signer = sig.signer_cert.subject.human_friendly
    except Exception:  # noqa: BLE001
        signer = "?"
    return SignatureReport(
        field_name=sig.field_name, signer=signer, intact=False, valid=False, trusted=False,
        covers_entire_file=False, modification_level=None, reason=reason,
        location=_text(sig_obj.get("/Location")), sn=sn, sn_well_formed=bool(sn) and serial.is_valid(sn),
        signing_time=None, timestamp_time=None, timestamp_trusted=None, md_algorithm="",
        subfilter=str(sig_obj.get("/SubFilter", "")), revision_sha256=hashlib.sha256(revision).hexdigest(),
        summary=f"VALIDATION_ERROR:{type(exc).__name__}",
    )


def _text(value) -> str | None:
    if value is None:
        return None
    return str(value)
