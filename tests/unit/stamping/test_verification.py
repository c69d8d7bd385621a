"""Verification judges a stamp like a relying party: tampering, later updates, wrong trust."""

import hashlib
import io

import pytest
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter

from loadtests import corpus
from services.kernel.errors import BubuhError
from services.stamping.document.signature_validation import verify
from services.stamping.serial import SerialIssuer
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.request import StampRequest
from tests.unit.stamping.conftest import VERIFY_BASE

ISSUER = SerialIssuer(78)


@pytest.fixture(scope="module")
def stamped(dev_ca_rsa, a4_pdf):
    engine = StampingEngine(SignerConfig(p12_path=str(dev_ca_rsa.p12_path), p12_password=dev_ca_rsa.password),
                            VERIFY_BASE)
    req = StampRequest(ISSUER.next(), 1, (380, 60, 560, 140), reason="Surat lamaran")
    return req, engine.stamp(a4_pdf, req)


def test_report_of_a_good_stamp(stamped, dev_ca_rsa):
    req, pdf = stamped
    report = verify(pdf, [dev_ca_rsa.ca_cert_pem])
    (sig,) = report.stamps
    assert sig.ok and sig.covers_entire_file and not sig.modified_after
    assert sig.sn == req.sn and sig.sn_well_formed
    assert sig.reason == f"[{req.sn}] Surat lamaran"
    assert sig.location == "Indonesia"
    assert sig.signing_time is not None
    assert sig.timestamp_time is None  # B-B: no TSA configured
    assert sig.revision_sha256 == hashlib.sha256(pdf).hexdigest() == report.sha256
    assert "Bubuh Dev e-Meterai Issuer" in sig.signer


def test_untrusted_root(stamped, dev_cas):
    _, pdf = stamped
    (sig,) = verify(pdf, [dev_cas["p256"].ca_cert_pem]).signatures  # some other CA
    assert not sig.trusted and not sig.ok


def test_tampered_signed_bytes(stamped, dev_ca_rsa):
    _, pdf = stamped
    at = pdf.index(b"stream\n") + 20  # inside the (compressed) page content: covered by the signature
    tampered = pdf[:at] + bytes([pdf[at] ^ 0x01]) + pdf[at + 1:]
    (sig,) = verify(tampered, [dev_ca_rsa.ca_cert_pem]).signatures
    assert not sig.intact and not sig.ok


def test_update_after_stamp_is_reported(stamped, dev_ca_rsa):
    req, pdf = stamped
    writer = IncrementalPdfFileWriter(io.BytesIO(pdf))
    writer.root["/Lang"] = generic.TextStringObject("id-ID")  # any later change
    writer.update_root()
    out = io.BytesIO()
    writer.write(out)
    later = out.getvalue()
    assert later.startswith(pdf)
    (sig,) = verify(later, [dev_ca_rsa.ca_cert_pem]).signatures
    assert sig.intact and sig.valid  # the signed revision itself is untouched...
    assert sig.modified_after and not sig.covers_entire_file  # ...but something came after it
    assert sig.revision_sha256 == hashlib.sha256(pdf).hexdigest()
    # a catalog entry is not a signature, DSS or time-stamp: the stamp no longer vouches for the file
    (finding,) = sig.findings
    assert finding.code == "MODIFIED_AFTER_STAMPING" and finding.revision == sig.revision + 1
    assert "/Lang" in finding.detail


def test_a_good_stamp_has_no_findings(stamped, dev_ca_rsa):
    _, pdf = stamped
    (sig,) = verify(pdf, [dev_ca_rsa.ca_cert_pem]).signatures
    assert sig.findings == () and sig.after_level == "NONE" and sig.revision == 2


def test_unsigned_document_has_no_signatures(a4_pdf, dev_ca_rsa):
    assert verify(a4_pdf, [dev_ca_rsa.ca_cert_pem]).signatures == ()


@pytest.mark.parametrize("data, code", [(b"", "PDF_INVALID"), (b"hello", "PDF_INVALID"),
                                        (b"%PDF-1.7\n garbage", "PDF_MALFORMED")])
def test_unreadable(data, code, dev_ca_rsa):
    with pytest.raises(BubuhError) as info:
        verify(data, [dev_ca_rsa.ca_cert_pem])
    assert info.value.code.code == code


@pytest.mark.parametrize("item", [i for i in corpus.poison() if i.name != "50mb"], ids=lambda i: i.name)
def test_poison_never_crashes_verification(item, dev_ca_rsa):
    try:
        report = verify(item.data, [dev_ca_rsa.ca_cert_pem])
    except BubuhError as exc:
        assert exc.code.code in ("PDF_INVALID", "PDF_MALFORMED", "PDF_ENCRYPTED")
    else:
        assert report.signatures == ()
