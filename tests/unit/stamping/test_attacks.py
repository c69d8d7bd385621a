"""`valid` means the document is what was stamped: the published attacks on PDF signatures, each refused
with its code, while what may legitimately follow a stamp (signatures, DSS, document time-stamps) stays valid.

Each attack first shows what pyHanko itself says about the stamp's signature (so the fixture is a real
attack, not a broken file: for the incremental and shadow attacks the signature stays intact, valid and
trusted), then what our verification answers (``public_verifier.judge`` on the library's report, with an
in-memory SN registry holding what the issuer delivered).
"""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime

import pytest
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.misc import PdfReadError
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields, signers
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko_certvalidator import ValidationContext

from services.stamping.document.signature_validation import _load_roots, verify
from services.stamping.public_verifier import Issued, judge
from services.stamping.serial import SerialIssuer
from services.stamping.signing import dev_ca, signing_key
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.request import StampRequest
from services.stamping.verification_answer import VerificationAnswer
from tests.unit.stamping import attacks
from tests.unit.stamping.conftest import VERIFY_BASE

SERIALS = SerialIssuer(91)
BOX = (380, 60, 560, 140)


def engine_for(ca: dev_ca.DevCA, **kw) -> StampingEngine:
    return StampingEngine(SignerConfig(p12_path=str(ca.p12_path), p12_password=ca.password, **kw), VERIFY_BASE)


def issued(*docs: tuple[str, bytes]) -> dict[str, list[Issued]]:
    """The SN registry after the issuer delivered ``docs`` ((sn, stamped file) pairs)."""
    return {sn: [Issued("completed", hashlib.sha256(pdf).hexdigest(), datetime.now(UTC))] for sn, pdf in docs}


class Victim:
    """The letter, stamped once by the issuer's dev key, and what the registry knows about it."""

    def __init__(self, dev_ca_rsa):
        self.roots = [dev_ca_rsa.ca_cert_pem]
        self.request = StampRequest(SERIALS.next(), 1, BOX, reason="Surat pernyataan")
        self.original, self.hidden_catalog = attacks.with_shadow_catalog(attacks.letter())
        self.engine = engine_for(dev_ca_rsa)
        self.stamped = self.engine.stamp(self.original, self.request)
        self.registry = issued((self.request.sn, self.stamped))

    @property
    def field(self) -> str:
        return self.request.field_name

    def answer(self, pdf: bytes, registry=None) -> dict:
        answer = judge(verify(pdf, self.roots), self.registry if registry is None else registry)
        VerificationAnswer.model_validate(answer)  # the shape the OpenAPI document promises
        return answer

    def pyhanko(self, pdf: bytes, field: str | None = None, roots=None):
        """pyHanko's own status of the stamp's signature (its default diff policy)."""
        reader = PdfFileReader(io.BytesIO(pdf))
        sig = next(s for s in reader.embedded_regular_signatures if s.field_name == (field or self.field))
        return validate_pdf_signature(sig, ValidationContext(trust_roots=_load_roots(roots or self.roots)))


@pytest.fixture(scope="module")
def victim(dev_ca_rsa) -> Victim:
    return Victim(dev_ca_rsa)


def reason_codes(answer: dict) -> list[str]:
    return [r["code"] for r in answer["reasons"]]


# --- what stays valid ------------------------------------------------------------------------


def test_the_untouched_stamp_is_valid(victim):
    answer = victim.answer(victim.stamped)
    assert answer["valid"] is True and answer["code"] is None and answer["reasons"] == [], answer
    (stamp,) = answer["stamps"]
    assert stamp["hash_matches_issued"] and stamp["unmodified_since_stamping"]
    assert stamp["only_signatures_since_stamping"]
    assert stamp["stamp_revision"] == answer["revisions"] == 3  # letter, hidden catalog, stamp


def applicant_signs(pdf: bytes, field: str = "Pelamar", box=(60, 60, 240, 110)) -> bytes:
    _ca_key, _ca_cert, key, cert = dev_ca.make_certificate_pair("p256", ca_name="Applicant Test CA",
                                                                subject_name="Calon Pelamar Uji")
    signer = signing_key.Pkcs12Key(key, signing_key.to_asn1_cert(cert), (signing_key.to_asn1_cert(_ca_cert),),
                                   "ec").pyhanko_signer()
    return signers.PdfSigner(
        signers.PdfSignatureMetadata(field_name=field, reason="Saya menyetujui", md_algorithm="sha256"),
        signer, new_field_spec=fields.SigFieldSpec(field, box=box, on_page=0),
    ).sign_pdf(IncrementalPdfFileWriter(io.BytesIO(pdf))).getvalue()


def test_a_later_counter_signature_keeps_the_stamp_valid(victim):
    countersigned = applicant_signs(victim.stamped)
    answer = victim.answer(countersigned)
    assert answer["valid"] is True, answer
    (stamp,) = answer["stamps"]
    assert not stamp["unmodified_since_stamping"] and stamp["only_signatures_since_stamping"]
    assert answer["signatures"] == 2


def test_a_second_e_meterai_keeps_the_first_valid(victim):
    second = StampRequest(SERIALS.next(), 1, (60, 200, 240, 280))
    twice = victim.engine.stamp(victim.stamped, second)
    answer = victim.answer(twice, {**victim.registry, **issued((second.sn, twice))})
    assert answer["valid"] is True and len(answer["stamps"]) == 2, answer


def test_a_document_time_stamp_and_dss_keep_the_stamp_valid(victim, local_tsa):
    from pyhanko.sign.timestamps import HTTPTimeStamper
    from pyhanko.sign.validation.dss import DocumentSecurityStore

    reader = PdfFileReader(io.BytesIO(victim.stamped))
    stamp_sig = next(s for s in reader.embedded_regular_signatures if s.field_name == victim.field)
    out = io.BytesIO(victim.stamped)
    DocumentSecurityStore.add_dss(out, stamp_sig.sig_object["/Contents"],
                                  certs=[stamp_sig.signer_cert, *stamp_sig.other_embedded_certs])
    with_dss = out.getvalue()
    assert len(with_dss) > len(victim.stamped) and b"/DSS" in with_dss[len(victim.stamped):]
    timestamped = signers.PdfTimeStamper(HTTPTimeStamper(local_tsa.url)).timestamp_pdf(
        IncrementalPdfFileWriter(io.BytesIO(with_dss)), md_algorithm="sha256").getvalue()
    for pdf in (with_dss, timestamped):
        answer = victim.answer(pdf)
        assert answer["valid"] is True, answer
    assert victim.pyhanko(timestamped).modification_level.name == "LTA_UPDATES"


# --- the attacks -------------------------------------------------------------------------------

MODIFIED = "MODIFIED_AFTER_STAMPING"

# name -> (build(victim) -> attacked pdf, expected code, expected revision of the change or None,
#          a path the answer must name among `changed` or None)
MODIFICATIONS = {
    "isa-content": (lambda v: attacks.isa_content(v.stamped), "/Root/Pages/Kids[0]/Contents"),
    "isa-page": (lambda v: attacks.isa_page(v.stamped), None),
    "isa-font": (lambda v: attacks.isa_font(v.stamped), "/Root/Pages/Kids[0]/Resources/Font/F1"),
    "isa-xobject": (lambda v: attacks.isa_xobject(v.stamped), "/Root/Pages/Kids[0]/Resources/XObject/Kop"),
    "isa-stamp-appearance": (lambda v: attacks.isa_stamp_appearance(v.stamped, v.field), None),
    "isa-annotation-appearance": (lambda v: attacks.isa_annotation_appearance(v.stamped), None),
    "isa-new-annotation": (lambda v: attacks.isa_new_annotation(v.stamped), None),
    "form-filled": (lambda v: attacks.form_filled(v.stamped), None),
    "unsigned-signature-field": (lambda v: attacks.unsigned_signature_field(v.stamped), "/Root/AcroForm/Fields[4]"),
    "shadow-hide": (lambda v: attacks.shadow_hide(v.stamped), None),
    "shadow-replace": (lambda v: attacks.shadow_replace(v.stamped), None),
    "shadow-hide-and-replace": (lambda v: attacks.shadow_hide_and_replace(v.stamped, v.hidden_catalog), "/Root"),
}


@pytest.mark.parametrize("name", list(MODIFICATIONS))
def test_a_change_after_the_stamp_is_refused(victim, name):
    build, path = MODIFICATIONS[name]
    attacked = build(victim)
    assert attacked.startswith(victim.stamped)  # the stamped file, byte for byte, plus one revision
    status = victim.pyhanko(attacked)
    assert status.intact and status.valid and status.trusted, status.summary()  # a real attack, not a broken file
    answer = victim.answer(attacked)
    assert answer["valid"] is False and answer["code"] == MODIFIED, answer
    (reason,) = answer["reasons"]
    assert reason["revision"] == 4 and reason["sn"] == victim.request.sn  # the revision after the stamp's (3)
    if path is not None:
        assert path in reason.get("changed", []), reason
    (stamp,) = answer["stamps"]
    assert stamp["hash_matches_issued"] and stamp["sn_known"]  # the registry alone would have said yes


def test_objects_appended_without_an_xref_are_refused(victim):
    """pyHanko reads the file from its last startxref, the stamp's: to it the file is untouched."""
    attacked = attacks.isa_without_xref(victim.stamped)
    assert attacked.startswith(victim.stamped) and b"1.000.000.000" in attacked[len(victim.stamped):]
    status = victim.pyhanko(attacked)
    assert status.intact and status.valid and status.trusted and status.bottom_line  # pyHanko: fine
    answer = victim.answer(attacked)
    assert answer["valid"] is False and answer["code"] == MODIFIED, answer
    assert "no revision" in answer["reasons"][0]["detail"]


def test_pyhankos_default_policy_lets_form_filling_through_ours_does_not(victim):
    """Why a stricter policy: pyHanko accepts the shadow hide/replace and form filling as FORM_FILLING."""
    for attack in (attacks.shadow_hide, attacks.shadow_replace, attacks.form_filled):
        status = victim.pyhanko(attack(victim.stamped))
        assert status.modification_level.name == "FORM_FILLING" and status.docmdp_ok, attack.__name__
        assert victim.answer(attack(victim.stamped))["code"] == MODIFIED


def test_signature_wrapping_is_refused(victim):
    attacked = attacks.signature_wrapping(victim.stamped, victim.field)
    status = victim.pyhanko(attacked)
    # the digest still matches (same bytes, moved) but pyHanko sees the ByteRange no longer spans a revision
    assert status.intact and status.valid and status.trusted
    assert status.coverage.name not in ("ENTIRE_FILE", "ENTIRE_REVISION") and not status.bottom_line
    answer = victim.answer(attacked)
    assert answer["valid"] is False and answer["code"] == "SIGNATURE_BROKEN", answer


@pytest.mark.parametrize("attack", [attacks.usf_contents_emptied, attacks.usf_byterange_removed],
                         ids=["usf-contents-emptied", "usf-byterange-removed"])
def test_universal_signature_forgery_is_refused(victim, attack):
    attacked = attack(victim.stamped, victim.field)
    with pytest.raises((PdfReadError, ValueError)):  # pyHanko cannot even load the signature
        _ = PdfFileReader(io.BytesIO(attacked)).embedded_regular_signatures
    answer = victim.answer(attacked)
    assert answer["valid"] is False and answer["code"] == "SIGNATURE_BROKEN", answer


def test_our_stamp_copied_into_another_document_is_refused(victim, dev_ca_rsa, a4_pdf):
    forger = engine_for(dev_ca_rsa)
    forger._cms = attacks.CmsOf(attacks.stamp_cms(victim.stamped, victim.field))  # no signing: the stamp's CMS
    copied = forger.stamp(a4_pdf, victim.request)
    status = victim.pyhanko(copied)
    # the CMS itself verifies (our key signed its attributes) but its digest is of the victim's bytes
    assert not status.intact and status.valid
    assert "Bubuh Dev e-Meterai Issuer" in status.signing_cert.subject.human_friendly
    answer = victim.answer(copied)
    assert answer["valid"] is False and answer["code"] == "SIGNATURE_BROKEN", answer


def test_one_sn_on_two_documents_is_refused(victim, a4_pdf):
    other = victim.engine.stamp(a4_pdf, victim.request)  # the issuer's key, the victim's SN, another file
    status = victim.pyhanko(other)
    assert status.intact and status.valid and status.trusted and status.bottom_line
    answer = victim.answer(other)
    assert answer["valid"] is False and reason_codes(answer) == ["SN_REUSED"], answer
    assert victim.answer(victim.stamped)["valid"] is True  # the document it was issued for still is


def test_an_sn_on_record_twice_is_refused(victim):
    twice = {victim.request.sn: victim.registry[victim.request.sn] * 2}
    assert reason_codes(victim.answer(victim.stamped, twice)) == ["SN_REUSED"]


def test_a_stamp_with_an_sn_never_issued_is_refused(victim, a4_pdf):
    unissued = victim.engine.stamp(a4_pdf, StampRequest(SERIALS.next(), 1, BOX))
    assert victim.pyhanko(unissued, field=verify(unissued, victim.roots).stamps[0].field_name).bottom_line
    answer = victim.answer(unissued)
    assert answer["valid"] is False and reason_codes(answer) == ["SN_UNKNOWN"], answer


def other_issuer(tmp_path_factory, ca_name: str) -> dev_ca.DevCA:
    """A CA of someone else's that issued a certificate named like ours (the names are free to choose)."""
    return dev_ca.dev_ca(tmp_path_factory.mktemp("other-ca"), "rsa2048") if ca_name == "same-name" else \
        _other_named_ca(tmp_path_factory.mktemp("other-ca"))


def _other_named_ca(where) -> dev_ca.DevCA:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    _ca_key, ca_cert, key, cert = dev_ca.make_certificate_pair("rsa2048", ca_name="Penerbit Lain Root CA",
                                                               subject_name="Bubuh Dev e-Meterai Issuer")
    p12 = where / "other.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"other", key, cert, [ca_cert], serialization.BestAvailableEncryption(b"x")))
    pem = where / "other-ca.pem"
    pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return dev_ca.DevCA("rsa2048", p12, "x", pem, pem)


@pytest.mark.parametrize("ca_name", ["other-name", "same-name"])
def test_another_cas_signature_with_our_sn_is_refused(victim, a4_pdf, tmp_path_factory, ca_name):
    """Same drawing, same SN, same issuer name in the certificate; another CA's key.

    "same-name": the other root CA is even named like ours (a fresh dev CA); pyhanko-certvalidator
    then matches our root by name and trips over the key (an AssertionError, not a verdict), so
    the library judges the signature again without trust roots.
    """
    other = other_issuer(tmp_path_factory, ca_name)
    lookalike = engine_for(other).stamp(a4_pdf, victim.request)
    theirs = victim.pyhanko(lookalike, roots=[other.ca_cert_pem])
    assert theirs.intact and theirs.valid and theirs.trusted  # a real signature, just not ours
    if ca_name == "other-name":
        ours = victim.pyhanko(lookalike)
        assert ours.intact and ours.valid and not ours.trusted
    answer = victim.answer(lookalike)
    assert answer["valid"] is False and reason_codes(answer) == ["NOT_OUR_ISSUER"], answer


def test_a_document_without_a_stamp(victim):
    answer = victim.answer(applicant_signs(victim.original))
    assert answer["valid"] is False and answer["code"] == "NO_STAMP", answer


# --- damaged after the stamp: an answer or a coded refusal, never a crash ------------------------


@pytest.mark.parametrize("which", ["countersigned", "isa-content", "swa"])
def test_damage_after_the_stamp_never_crashes_verification(victim, which):
    """Truncations and flipped bytes in what follows the stamp: a verdict or PDF_INVALID/PDF_MALFORMED.

    Only bytes after the stamp's revision are touched, so the stamped revision itself stays
    what was issued; whether the damaged tail still parses is pyHanko's business, but the
    verifier must answer either way (an exception here is a 500 for the public).
    """
    import random

    from services.kernel.errors import BubuhError

    base = {"countersigned": lambda: applicant_signs(victim.stamped),
            "isa-content": lambda: attacks.isa_content(victim.stamped),
            "swa": lambda: attacks.signature_wrapping(victim.stamped, victim.field)}[which]()
    start = len(victim.stamped)
    rng = random.Random(which)
    damaged = [base[:rng.randrange(start, len(base))] for _ in range(4)]
    for _ in range(8):
        at = rng.randrange(start, len(base))
        damaged.append(base[:at] + bytes([base[at] ^ (1 << rng.randrange(8))]) + base[at + 1:])
    for pdf in damaged:
        try:
            answer = victim.answer(pdf)
        except BubuhError as exc:
            assert exc.code.code in ("PDF_INVALID", "PDF_MALFORMED"), exc
        else:
            assert isinstance(answer["valid"], bool)
            if which != "countersigned":
                assert answer["valid"] is False, answer  # damage never turns an attack into a valid stamp
