"""Verifying a stamped PDF: is each signature intact, valid, trusted, and is ours the last word?

Why here and with pyHanko's validator: the public "upload a PDF" verification and our
own tests must judge a stamp the way a relying party would, not the way our engine
thinks it wrote it. pyHanko's ``validate_pdf_signature`` checks the CMS signature,
builds the certificate path to the trust roots we give it (the issuer CA; the dev CA
in tests), and tells how much of the file the signature covers. A stamp followed by
further incremental updates is not necessarily forged (a later e-Meterai or signature
is legitimate) but it is reported, since "unmodified since stamping" is what a
verifier promises.

Revocation follows ETSI EN 319 102-1 (its "validation with time", pyHanko's ``ades_with_time_validation``):
each stamp's certificate status is what the revocation data the file carries (its DSS, the CMS's
revocation archival attribute) establish, whatever their age, and the signature time-stamp is the
proof that the stamp existed at its genTime. A certificate revoked after that time leaves the stamp
valid (the signature was made while the key was trusted); revoked before it, or with no time-stamp to
prove otherwise, the stamp is ``CERT_REVOKED``. Data that say nothing about the certificate leave its
status ``unknown``, which does not by itself invalidate a stamp (B-B and B-T stamps carry none).

The SN comes from the signature's reason, ``"[SN] reason"``, the convention existing
issuer adapters use; whether that SN exists and was used once is the verification
service's question (it owns the SN registry), not this library's.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from asn1crypto import x509 as asn1_x509

from services.kernel import errors
from services.kernel.errors import BubuhError
from services.stamping import serial

_REASON_SN = re.compile(r"^\[([0-9A-Z]{22})\]")
_REF_IN_MESSAGE = re.compile(r"Reference\(idnum=(\d+), generation=(\d+)\)")
_MAX_CHANGED = 20  # paths named per finding: enough to see what moved, bounded for hostile files


@dataclass(frozen=True)
class Finding:
    """Why a signature does not vouch for the document: a catalogue code plus where and what."""

    code: str  # a code of services.kernel.errors
    detail: str
    revision: int | None = None  # 1-based: revision 1 is the file as first written
    changed: tuple[str, ...] = ()  # paths from the trailer to what changed, e.g. /Root/Pages/Kids[0]/Contents

    def as_dict(self) -> dict:
        out: dict = {"code": self.code, "detail": self.detail}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.changed:
            out["changed"] = list(self.changed)
        return out


@functools.cache
def stamp_diff_policy():
    """pyHanko's default policy without form filling: after a stamp only signatures, DSS, time-stamps.

    Kept from pyHanko's defaults: catalog comparison (only /AcroForm, /DSS, /Extensions,
    /Metadata, /MarkInfo, /Version may change, each vetted by its rule), document info and
    XMP metadata updates (signers touch /ModDate and /Producer), new xref and object
    streams, DSS additions, new signature fields and their widgets and appearances, and
    filling an empty signature field. Dropped: ``GenericFieldModificationRule`` (changing
    any other field's value, flags or appearance) and in-place rewrites of an existing
    appearance stream. ``/NeedAppearances``, ``/DA`` and ``/Q`` of the form may not change
    either: they make viewers redraw fields from values the signature never showed.
    """
    from pyhanko.sign.diff_analysis import (
        CatalogModificationRule,
        DocInfoRule,
        DSSCompareRule,
        FormUpdatingRule,
        MetadataUpdateRule,
        ModificationLevel,
        ObjectStreamRule,
        SigFieldCreationRule,
        SigFieldModificationRule,
        StandardDiffPolicy,
        XrefStreamRule,
    )

    lta = ModificationLevel.LTA_UPDATES
    return StandardDiffPolicy(
        global_rules=[
            CatalogModificationRule(),
            DocInfoRule().as_qualified(lta),
            XrefStreamRule().as_qualified(lta),
            ObjectStreamRule().as_qualified(lta),
            DSSCompareRule().as_qualified(lta),
            MetadataUpdateRule().as_qualified(lta),
        ],
        form_rule=FormUpdatingRule(
            field_rules=[SigFieldCreationRule(),
                         SigFieldModificationRule(allow_in_place_appearance_stream_changes=False)],
            ignored_acroform_keys=frozenset({"/Fields", "/DR"}),
        ),
    )




@dataclass(frozen=True)
class TimeStamp:
    """An RFC 3161 time-stamp the verdict relies on: when (genTime), by whom, and whether its TSA is trusted."""

    time: datetime
    tsa: str  # the TSA certificate's subject, human readable
    trusted: bool

    def as_dict(self) -> dict:
        return {"time": self.time.isoformat(), "tsa": self.tsa, "trusted": self.trusted}


@dataclass(frozen=True)
class CertificateStatus:
    """The signing certificate's revocation status, as the validation data in the file establish it.

    ``status``: ``good`` (the data vouch for the whole path), ``revoked`` (the signing certificate, or
    a CA above it when ``ca_revoked``, since ``revoked_at``), ``unknown`` (the data do not settle it,
    e.g. a B-T stamp that carries none). ``indication`` is pyHanko's ETSI EN 319 102-1 result of the
    validation with time: ``PASSED`` for a revoked certificate means revoked after the time-stamp.
    """

    status: str
    indication: str
    revoked_at: datetime | None = None
    reason: str | None = None  # the CRL reason, e.g. key_compromise
    ca_revoked: bool = False

    @property
    def revoked_before_proof(self) -> bool:
        """Revoked, and no trusted time proves the stamp existed before: it does not vouch for anything."""
        return self.status == "revoked" and self.indication != "PASSED"


@dataclass(frozen=True)
class SignatureReport:
    field_name: str
    signer: str  # the certificate subject, human readable
    intact: bool  # the signed bytes hash to the digest in the signature
    valid: bool  # the cryptographic signature over that digest verifies
    trusted: bool  # the certificate chains to a given trust root, key usage acceptable
    covers_entire_file: bool  # False: something was appended after this signature
    modification_level: str | None  # pyHanko's judgement of later updates (for stamps under stamp_diff_policy())
    reason: str | None
    location: str | None
    sn: str | None  # from "[SN] reason"; None for signatures that are not e-Meterai
    sn_well_formed: bool  # the SN's layout and check character are right
    signing_time: datetime | None  # as the signer claims (/M); a TSA time is in timestamp_time
    timestamp_time: datetime | None  # from a trusted signature time-stamp (PAdES B-T), if any
    timestamp_trusted: bool | None
    md_algorithm: str
    subfilter: str
    revision_sha256: str  # sha256 of the bytes the signature's ByteRange spans: the file as it was signed
    summary: str
    revision: int = 0  # 1-based revision of the file this signature was added in (0: unknown)
    after_level: str | None = None  # stamps: stamp_diff_policy()'s level for what follows (NONE, LTA_UPDATES...)
    findings: tuple[Finding, ...] = ()  # why it does not vouch for the document; empty when it does
    # stamps: sha256 of the file as it ended at each of the next few revisions. A B-LT stamp is delivered
    # with its DSS (and a B-LTA one with its document time-stamp) appended: the delivered file is one of these
    later_revision_sha256s: tuple[str, ...] = ()
    # stamps: ETSI revocation semantics (None when not judged: the signature is broken or not ours)
    certificate_status: CertificateStatus | None = None
    timestamp: TimeStamp | None = None  # the signature time-stamp (timestamp_time, with its TSA)
    # the earliest time the stamp provably existed (ETSI's best-signature-time): what a revocation is compared with
    proof_of_existence: datetime | None = None
    document_timestamp: TimeStamp | None = None  # B-LTA: the latest document time-stamp after the stamp

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
    revisions: int = 0  # incremental revisions in the file

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
        embedded = _signatures(reader)
    except RecursionError as exc:
        raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
    except (PdfError, ValueError, KeyError) as exc:
        raise BubuhError(errors.PDF_MALFORMED, f"cannot read: {exc}") from exc

    junk = _bytes_after_last_eof(data)
    doc_timestamps: dict = {}  # revision -> TimeStamp | None: judged once, however many stamps precede it
    reports = []
    for sig in embedded:
        vc = ValidationContext(trust_roots=roots, allow_fetching=allow_fetching)
        sig_obj = sig.sig_object
        reason = _text(sig_obj.get("/Reason"))
        match = _REASON_SN.match(reason or "")
        sn = match.group(1) if match else None
        if isinstance(sig, _Unreadable):
            reports.append(_failed(sig, sn, reason, sig_obj, b"", sig.error))
            continue
        try:
            byte_range = [int(v) for v in sig_obj["/ByteRange"]]
            revision_end = byte_range[2] + byte_range[3]
        except (KeyError, TypeError, ValueError, IndexError):  # universal signature forgery: no usable ByteRange
            revision_end = 0
        try:
            # a stamp's later revisions are judged once, by our policy (pyHanko's default for the rest)
            status = validate_pdf_signature(sig, vc, diff_policy=stamp_diff_policy() if sn is not None else None)
        except RecursionError as exc:
            raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
        except Exception as exc:  # noqa: BLE001 - a hostile signature must not abort the report
            # e.g. a chain whose names match a trust root but whose key type does not:
            # pyhanko-certvalidator asserts instead of reporting. Judged again without any
            # trust root: intact and valid then means a real signature by someone else.
            status = _validate_untrusted(sig, allow_fetching, stamp_diff_policy() if sn is not None else None)
            if status is None:
                reports.append(_failed(sig, sn, reason, sig_obj, data[:revision_end], exc))
                continue
        ts = status.timestamp_validity
        mod_level = status.modification_level
        after_level, after_finding = (None, None)
        if sn is not None:
            try:
                after_level, after_finding = _review_after_stamp(sig, status.coverage, status.diff_result)
            except RecursionError as exc:
                raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
            except Exception as exc:  # noqa: BLE001 - what cannot be analysed is not vouched for
                after_finding = Finding(errors.MODIFIED_AFTER_STAMPING.code,
                                        f"the revisions after the stamp cannot be analysed: {type(exc).__name__}")
        findings = _signature_findings(status, sn)
        cert_status, poe = None, None
        if sn is not None and status.intact and status.valid and status.trusted:
            cert_status, poe = _certificate_status(sig, roots)
            if poe is None and ts is not None and ts.trusted:
                poe = ts.timestamp  # not enough for ETSI's PASSED, still the time the verdict compared with
            if cert_status.revoked_before_proof:
                findings.append(Finding(errors.CERT_REVOKED.code, _revocation_words(cert_status, ts)))
        if after_finding is not None:
            findings.append(after_finding)
        if sn is not None and junk:
            findings.append(Finding(
                errors.MODIFIED_AFTER_STAMPING.code,
                f"{junk} bytes after the file's last %%EOF belong to no revision (objects appended without a "
                f"cross-reference section: a validator skips them, a viewer that repairs files may show them)"))
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
            revision=sig.signed_revision + 1,
            after_level=after_level,
            findings=tuple(findings),
            later_revision_sha256s=_later_revision_hashes(data, revision_end) if sn is not None else (),
            certificate_status=cert_status,
            timestamp=TimeStamp(ts.timestamp, ts.signing_cert.subject.human_friendly, bool(ts.trusted))
            if ts is not None else None,
            proof_of_existence=poe,
            document_timestamp=_latest_document_timestamp(reader, sig.signed_revision, roots, doc_timestamps)
            if sn is not None else None,
        ))
    return VerificationReport(sha256=hashlib.sha256(data).hexdigest(), signatures=tuple(reports),
                              revisions=reader.xrefs.total_revisions)


_RECENT_ENOUGH = timedelta(days=365 * 100)  # any revocation data the file carries counts, however old


def _certificate_status(sig, roots: list[asn1_x509.Certificate]) -> tuple[CertificateStatus, datetime | None]:
    """ETSI EN 319 102-1 validation with time (pyHanko's ``ades_with_time_validation``) on the data the file carries.

    The basic validation runs now, with every CRL and OCSP response of the DSS and of the CMS's revocation
    archival attribute accepted however old (no fetching: a verifier judges the file, and a B-LT stamp's
    data are as old as the stamp). pyHanko's revocation check decides: the newest OCSP response about a
    certificate first, its CRLs when no response settles it. When it says
    revoked (``REVOKED_NO_POE``), the signature time-stamp is the proof of existence: before the
    revocation, the result is ``PASSED`` (the stamp stays valid); at or after it, it stays
    ``INDETERMINATE``. Returns the status and, when it passed, that proof-of-existence time.
    """
    from pyhanko.sign.ades.report import AdESPassed
    from pyhanko.sign.validation import ades
    from pyhanko.sign.validation.policy_decl import (
        CertificateFetchingRule,
        RevinfoOnlineFetchingRule,
        RevocationInfoGatheringSpec,
        SignatureValidationSpec,
    )
    from pyhanko_certvalidator import policy_decl
    from pyhanko_certvalidator.context import CertValidationPolicySpec
    from pyhanko_certvalidator.ltv.types import ValidationTimingInfo
    from pyhanko_certvalidator.registry import SimpleTrustManager

    try:
        knowledge = _carried_validation_data(sig)
    except RecursionError as exc:
        raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
    except Exception as exc:  # noqa: BLE001 - a DSS pyHanko cannot read carries nothing it could judge
        return CertificateStatus("unknown", f"NOT_JUDGED/{type(exc).__name__}"), None
    spec = SignatureValidationSpec(
        cert_validation_policy=CertValidationPolicySpec(
            trust_manager=SimpleTrustManager.build(roots),
            revinfo_policy=policy_decl.CertRevTrustPolicy(
                revocation_checking_policy=policy_decl.REQUIRE_REVINFO,
                freshness_req_type=policy_decl.FreshnessReqType.MAX_DIFF_REVOCATION_VALIDATION,
                freshness=_RECENT_ENOUGH)),
        # the file's data only: a verifier never follows URLs a hostile file names (and judges what it carries)
        revinfo_gathering_policy=RevocationInfoGatheringSpec(
            online_fetching_rule=RevinfoOnlineFetchingRule.LOCAL_ONLY,
            certificate_fetching_rule=CertificateFetchingRule.NEVER_FETCH),
        local_knowledge=knowledge)
    now = datetime.now(UTC)
    try:
        result = asyncio.run(ades.ades_with_time_validation(
            sig.signed_data, spec, timing_info=ValidationTimingInfo(now, now, False), raw_digest=sig.compute_digest()))
    except RecursionError as exc:
        raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
    except Exception as exc:  # noqa: BLE001 - what cannot be judged is not known
        return CertificateStatus("unknown", f"NOT_JUDGED/{type(exc).__name__}"), None
    indic = result.ades_subindic
    passed = isinstance(indic, AdESPassed)
    indication = "PASSED" if passed else f"{indic.status.name}/{indic.name}"
    revoked = result.api_status.revocation_details if result.api_status is not None else None
    poe = result.best_signature_time if passed else None
    if revoked is not None:
        reason = revoked.revocation_reason.native if revoked.revocation_reason is not None else None
        return CertificateStatus("revoked", indication, revoked.revocation_date, reason or "unspecified",
                                 bool(revoked.ca_revoked)), poe
    return CertificateStatus("good" if passed else "unknown", indication), poe


def _carried_validation_data(sig):
    """The certificates, CRLs and OCSP responses in the file's DSS and in the signature's archival attribute."""
    from asn1crypto import crl as asn1_crl
    from asn1crypto import ocsp as asn1_ocsp
    from pyhanko.pdf_utils.decode_limits import DecodePurpose
    from pyhanko.sign.general import find_unique_cms_attribute
    from pyhanko.sign.validation.dss import DocumentSecurityStore
    from pyhanko.sign.validation.errors import NoDSSFoundError
    from pyhanko.sign.validation.policy_decl import LocalKnowledge
    from pyhanko_certvalidator.revinfo.archival import CRLContainer, OCSPContainer

    ocsps, crls, certs = [], [], []
    try:
        dss = DocumentSecurityStore.read_dss(sig.reader)
        for resp in dss.ocsps:
            ocsps.extend(OCSPContainer.load_multi(asn1_ocsp.OCSPResponse.load(
                resp.get_object().read_data(DecodePurpose.OCSP_RESPONSE))))
        crls.extend(CRLContainer(asn1_crl.CertificateList.load(c.get_object().read_data(DecodePurpose.CRL)))
                    for c in dss.crls)
        certs.extend(dss.load_certs())
    except NoDSSFoundError:
        pass
    try:
        archival = find_unique_cms_attribute(sig.signer_info["signed_attrs"], "adobe_revocation_info_archival")
        crls.extend(CRLContainer(c) for c in archival["crl"])
        ocsps.extend(OCSPContainer(o) for o in archival["ocsp"])
    except Exception:  # noqa: BLE001 - absent (the usual case) or malformed: nothing carried there
        pass
    return LocalKnowledge(known_ocsps=ocsps, known_crls=crls, known_certs=certs)


def _revocation_words(status: CertificateStatus, ts) -> str:
    who = "a CA certificate on the stamp's path" if status.ca_revoked else "the stamp's signing certificate"
    when = status.revoked_at.isoformat() if status.revoked_at else "?"
    if ts is not None and ts.trusted:
        return (f"{who} was revoked at {when} ({status.reason}), before the signature time-stamp at "
                f"{ts.timestamp.isoformat()} [{status.indication}]")
    return f"{who} was revoked at {when} ({status.reason}) and no trusted time-stamp proves the stamp existed " \
           f"before [{status.indication}]"


def _latest_document_timestamp(reader, revision: int, roots, cache: dict) -> TimeStamp | None:
    """The last document time-stamp added after ``revision`` (B-LTA), judged by pyHanko against ``roots``."""
    from pyhanko.sign.validation import validate_pdf_timestamp
    from pyhanko_certvalidator import ValidationContext

    try:
        later = [s for s in reader.embedded_signatures
                 if s.sig_object_type == "/DocTimeStamp" and s.signed_revision > revision]
    except Exception:  # noqa: BLE001 - the signatures themselves were read above; a broken time-stamp is none
        return None
    if not later:
        return None
    last = max(later, key=lambda s: s.signed_revision)
    if last.signed_revision not in cache:
        try:
            status = validate_pdf_timestamp(last, validation_context=ValidationContext(trust_roots=roots))
            cache[last.signed_revision] = TimeStamp(
                status.timestamp, status.signing_cert.subject.human_friendly,
                bool(status.intact and status.valid and status.trusted))
        except RecursionError as exc:
            raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
        except Exception:  # noqa: BLE001 - a document time-stamp pyHanko cannot judge proves nothing
            cache[last.signed_revision] = None
    return cache[last.signed_revision]


def pades_level(data: bytes) -> str:
    """The PAdES baseline level of the file's last e-Meterai, by what it carries: "B-B" (signature only),
    "B-T" (a signature time-stamp), "B-LT" (and a DSS after it), "B-LTA" (and a document time-stamp
    after that); "" when there is no stamp. What it carries, not whether it validates (``verify``)."""
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation.generic_cms import extract_tst_data_iter

    reader = PdfFileReader(io.BytesIO(data))
    sigs = reader.embedded_signatures
    stamps = [s for s in sigs
              if s.sig_object_type == "/Sig" and _REASON_SN.match(_text(s.sig_object.get("/Reason")) or "")]
    if not stamps:
        return ""
    stamp = stamps[-1]
    if next(extract_tst_data_iter(stamp.signer_info, signed=False), None) is None:
        return "B-B"
    if not _dss_after(reader, stamp.signed_revision):
        return "B-T"
    later_ts = [s for s in sigs if s.sig_object_type == "/DocTimeStamp" and s.signed_revision > stamp.signed_revision]
    return "B-LTA" if later_ts else "B-LT"


def _dss_after(reader, revision: int) -> bool:
    """A DSS written in a revision after ``revision`` (an applicant's earlier one does not count)."""
    from pyhanko.pdf_utils import generic

    if "/DSS" not in reader.root:
        return False
    ref = reader.root.raw_get("/DSS")
    if isinstance(ref, generic.IndirectObject):
        return reader.xrefs.get_last_change(ref.reference) > revision
    return True


_LATER_REVISIONS = 3  # a B-LTA stamp is followed by its DSS and its document time-stamp; bounded for hostile files


def _later_revision_hashes(data: bytes, revision_end: int) -> tuple[str, ...]:
    """sha256 of ``data`` cut at the end of each of the next revisions after ``revision_end``."""
    out, at = [], revision_end
    while len(out) < _LATER_REVISIONS:
        eof = data.find(b"%%EOF", at)
        if eof < 0:
            break
        end = eof + 5
        if data[end:end + 2] == b"\r\n":
            end += 2
        elif data[end:end + 1] in (b"\n", b"\r"):
            end += 1
        out.append(hashlib.sha256(data[:end]).hexdigest())
        at = end
    return tuple(out)


def _bytes_after_last_eof(data: bytes) -> int:
    """How many bytes follow the last ``%%EOF``, end-of-line padding aside (0 for a well-formed file).

    Validators read a PDF from its last ``startxref``, so objects appended without their own
    cross-reference section and trailer are invisible to the difference analysis, yet the
    incremental saving attacks of Mladenov et al. show viewers that pick them up.
    """
    end = data.rfind(b"%%EOF")
    if end < 0:
        return 0
    tail = data[end + len(b"%%EOF"):]
    return len(tail) if tail.strip(b" \t\r\n\f\x00") else 0


def _validate_untrusted(sig, allow_fetching: bool, diff_policy):
    from pyhanko.sign.validation import validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    try:
        status = validate_pdf_signature(sig, ValidationContext(trust_roots=[], allow_fetching=allow_fetching),
                                        diff_policy=diff_policy)
    except Exception:  # noqa: BLE001 - not even that: the signature itself is broken
        return None
    return status if status.intact and status.valid and not status.trusted else None


@dataclass(frozen=True)
class _Unreadable:
    """A filled signature field pyHanko cannot even load (no /ByteRange, /Contents not a CMS: USF)."""

    field_name: str
    sig_object: object
    error: Exception
    signed_revision: int

    @property
    def signer_cert(self):
        raise self.error


def _signatures(reader) -> list:
    """pyHanko's ``embedded_regular_signatures``, except that one unloadable signature does not hide the others.

    ``reader.embedded_regular_signatures`` raises for the whole file when one signature has
    no ``/ByteRange`` or a ``/Contents`` that is not a CMS; a verifier must instead say that
    this signature is broken (a universal signature forgery) and still judge the rest.
    """
    from pyhanko.pdf_utils.misc import PdfError
    from pyhanko.sign.fields import enumerate_sig_fields
    from pyhanko.sign.validation.pdf_embedded import EmbeddedPdfSignature

    out = []
    for fq_name, sig_obj, sig_field in enumerate_sig_fields(reader, filled_status=True):
        sig_dict = sig_obj.get_object()
        if sig_dict.get("/Type") == "/DocTimeStamp":
            continue
        try:
            out.append(EmbeddedPdfSignature(reader, sig_field, fq_name))
        except (PdfError, ValueError, KeyError, TypeError, IndexError) as exc:
            try:
                revision = reader.xrefs.get_last_change(sig_obj.reference)
            except Exception:  # noqa: BLE001 - a direct object or a dangling reference
                revision = -1
            out.append(_Unreadable(fq_name, sig_dict, exc, revision))
    return sorted(out, key=lambda s: s.signed_revision)


def _signature_findings(status, sn: str | None) -> list[Finding]:
    out: list[Finding] = []
    if not (status.intact and status.valid):
        what = "the signed bytes do not match the signature" if not status.intact else \
            "the signature value does not verify"
        out.append(Finding(errors.SIGNATURE_BROKEN.code, what))
    elif not status.trusted:
        out.append(Finding(errors.NOT_OUR_ISSUER.code,
                           f"signed by {status.signing_cert.subject.human_friendly}, which does not chain to the "
                           f"issuer's trust roots"))
    if sn is not None and not serial.is_valid(sn):
        out.append(Finding(errors.SN_UNKNOWN.code, f"{sn} is not a well-formed serial number"))
    return out


def _review_after_stamp(sig, coverage, diff_result) -> tuple[str | None, Finding | None]:
    """What follows the stamp, judged by stamp_diff_policy(); the first refused revision is the finding.

    ``diff_result`` is the verdict pyHanko's validator already reached with that policy
    (``review_file``: each later revision compared with the stamped one, not with its
    predecessor, so a change that a later revision undoes is still caught). Only when it
    refuses are the revisions walked again, to name which one changed what.
    """
    from pyhanko.pdf_utils.misc import PdfError
    from pyhanko.sign.diff_analysis import DiffResult, ModificationLevel, SuspiciousModification
    from pyhanko.sign.validation.status import SignatureCoverageLevel

    if coverage is None or coverage < SignatureCoverageLevel.ENTIRE_REVISION:
        return None, Finding(errors.SIGNATURE_BROKEN.code,
                             "the signature's /ByteRange does not span a whole revision of the file "
                             f"(coverage {coverage.name if coverage is not None else 'unknown'})",
                             revision=sig.signed_revision + 1)
    if coverage == SignatureCoverageLevel.ENTIRE_FILE:
        return ModificationLevel.NONE.name, None
    if isinstance(diff_result, DiffResult):
        unsigned = _unsigned_new_fields(sig)
        if unsigned:
            return None, unsigned
        return diff_result.modification_level.name, None
    reader = sig.reader
    stamped = reader.get_historical_resolver(sig.signed_revision)
    level = ModificationLevel.NONE
    for revision in range(sig.signed_revision + 1, reader.xrefs.total_revisions):
        later = reader.get_historical_resolver(revision)
        try:
            result = stamp_diff_policy().apply(stamped, later)
        except (SuspiciousModification, PdfError, ValueError, KeyError, TypeError, AssertionError) as exc:
            return None, Finding(errors.MODIFIED_AFTER_STAMPING.code, _one_based(exc),
                                 revision=revision + 1, changed=_changed_paths(exc, stamped, later))
        level = max(level, result.modification_level)
    # pyHanko refused as a whole but no single revision on its own: still a refusal
    return None, Finding(errors.MODIFIED_AFTER_STAMPING.code,
                         f"pyHanko: {str(diff_result).splitlines()[0][:500] if diff_result else 'not judged'}")


def _unsigned_new_fields(sig) -> Finding | None:
    """A signature field added after the stamp must carry a signature by the end of the file.

    pyHanko accepts new empty signature fields, appearance included (a signer may prepare
    a field for someone else); but an appearance with no signature behind it is just a
    drawing over the page, so after a stamp it counts as a change.
    """
    from pyhanko.sign.fields import enumerate_sig_fields

    reader = sig.reader
    before = {name for name, _value, _ref in enumerate_sig_fields(reader.get_historical_resolver(sig.signed_revision))}
    for name, _value, ref in enumerate_sig_fields(reader, filled_status=False):
        if name in before:
            continue
        try:
            revision = reader.xrefs.get_introducing_revision(ref.reference) + 1
        except Exception:  # noqa: BLE001 - a direct field object: the revision stays unnamed
            revision = None
        fields = list(reader.root["/AcroForm"].get("/Fields", []))
        where = next((f"/Root/AcroForm/Fields[{i}]" for i, f in enumerate(fields)
                      if getattr(f, "reference", None) == getattr(ref, "reference", ref)), "/Root/AcroForm/Fields")
        return Finding(errors.MODIFIED_AFTER_STAMPING.code,
                       f"signature field {name!r} was added after the stamp and carries no signature (only an "
                       f"appearance)", revision=revision, changed=(where,))
    return None


def _one_based(exc: Exception) -> str:
    """pyHanko's first line of explanation, its 0-based revision numbers shifted to ours."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0][:500]
    return "pyHanko: " + re.sub(r"\brevision (\d+)", lambda m: f"revision {int(m.group(1)) + 1}", text)


def _changed_paths(exc: Exception, stamped, later) -> tuple[str, ...]:
    """Where the objects pyHanko could not explain live: paths in the stamped revision, else in the later one."""
    from pyhanko.pdf_utils.generic import Reference

    refs = [Reference(int(i), int(g)) for i, g in _REF_IN_MESSAGE.findall(str(exc))]
    paths: list[str] = []
    try:
        if stamped.root_ref != later.root_ref:  # the trailer now names another catalog (shadow hide-and-replace)
            paths.append("/Root")
    except Exception:  # noqa: BLE001
        pass
    if not refs:
        return tuple(paths)
    try:
        for resolver in (stamped, later):
            resolver._load_reverse_xref_cache()  # pyHanko's own index of paths to each object
        for ref in refs:
            found = stamped._get_usages_of_ref(ref) or later._get_usages_of_ref(ref)
            paths.extend(sorted(_path_text(p) for p in found) or [f"object {ref.idnum} {ref.generation} R"])
            if len(paths) >= _MAX_CHANGED:
                break
    except Exception:  # noqa: BLE001 - naming the place is a courtesy; the verdict stands without it
        paths.extend(f"object {r.idnum} {r.generation} R" for r in refs)
    return tuple(dict.fromkeys(paths))[:_MAX_CHANGED]


def _path_text(path) -> str:
    out = ""
    for node in path:
        out += f"[{node}]" if isinstance(node, int) else str(node)
    return out


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
        revision=sig.signed_revision + 1,
        findings=(Finding(errors.SIGNATURE_BROKEN.code, f"pyHanko cannot validate it: {type(exc).__name__}"),),
    )


def _text(value) -> str | None:
    if value is None:
        return None
    return str(value)
