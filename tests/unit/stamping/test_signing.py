"""Signing: both paths produce PAdES signatures that pyHanko and poppler accept."""

import pytest

from loadtests import corpus
from services.kernel.errors import BubuhError
from services.stamping.document.appearance import STAMP_TEXT_LINES, verification_url
from services.stamping.document.signature_validation import verify
from services.stamping.serial import SerialIssuer
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.reference import stamp_reference
from services.stamping.signing.request import StampRequest
from tests.unit.stamping.conftest import VERIFY_BASE, appearance_text, assert_pdfsig_ok

ISSUER = SerialIssuer(77)
BOX = (380.0, 140.0, 560.0, 220.0)


def request(page=1, box=BOX, reason="Surat pernyataan CPNS"):
    return StampRequest(ISSUER.next(), page, box, reason=reason, location="Jakarta")


@pytest.fixture(scope="module")
def engines(dev_cas):
    made = {kt: StampingEngine(SignerConfig(p12_path=str(ca.p12_path), p12_password=ca.password), VERIFY_BASE)
            for kt, ca in dev_cas.items()}
    yield made
    for engine in made.values():
        engine.close()


def assert_our_stamp_ok(pdf: bytes, ca, req: StampRequest, index: int = -1):
    report = verify(pdf, [ca.ca_cert_pem])
    sig = report.signatures[index]
    assert sig.intact and sig.valid and sig.trusted, sig.summary
    assert sig.covers_entire_file
    assert sig.sn == req.sn and sig.sn_well_formed
    assert sig.reason == f"[{req.sn}] {req.reason}"
    assert sig.subfilter == "/ETSI.CAdES.detached"  # PAdES
    return sig


@pytest.mark.parametrize("key_type", ["rsa2048", "p256"])
def test_engine_output_validates(engines, dev_cas, pdfsig, a4_pdf, key_type):
    req = request()
    out = engines[key_type].stamp(a4_pdf, req)
    assert out.startswith(a4_pdf)  # incremental update: the original bytes are untouched
    sig = assert_our_stamp_ok(out, dev_cas[key_type], req)
    assert sig.md_algorithm == "sha256"
    assert_pdfsig_ok(pdfsig(out))


def test_reference_output_validates(dev_ca_rsa, pdfsig, a4_pdf):
    req = request()
    out = stamp_reference(a4_pdf, req, dev_ca_rsa.p12_path, dev_ca_rsa.password, VERIFY_BASE)
    assert out.startswith(a4_pdf)
    assert_our_stamp_ok(out, dev_ca_rsa, req)
    assert_pdfsig_ok(pdfsig(out))


def test_engine_sha512(dev_ca_rsa, pdfsig, a4_pdf):
    engine = StampingEngine(SignerConfig(p12_path=str(dev_ca_rsa.p12_path), p12_password=dev_ca_rsa.password,
                                         md_algorithm="sha512"), VERIFY_BASE)
    req = request()
    out = engine.stamp(a4_pdf, req)
    assert assert_our_stamp_ok(out, dev_ca_rsa, req).md_algorithm == "sha512"
    assert_pdfsig_ok(pdfsig(out))


@pytest.mark.parametrize("path", ["engine", "reference"])
def test_presigned_document_keeps_first_signature_valid(engines, dev_ca_rsa, pdfsig, presigned_doc, path):
    req = request(box=(60, 60, 240, 140))
    if path == "engine":
        out = engines["rsa2048"].stamp(presigned_doc.data, req)
    else:
        out = stamp_reference(presigned_doc.data, req, dev_ca_rsa.p12_path, dev_ca_rsa.password, VERIFY_BASE)
    assert out.startswith(presigned_doc.data)
    report = verify(out, [dev_ca_rsa.ca_cert_pem, presigned_doc.ca_cert_pem])
    applicant, stamp = report.signatures
    assert applicant.field_name == presigned_doc.field_name
    assert applicant.intact and applicant.valid and applicant.trusted, applicant.summary
    assert not applicant.covers_entire_file  # our stamp came after it...
    assert applicant.modification_level in ("NONE", "LTA_UPDATES", "FORM_FILLING")  # ...and is an allowed update
    assert stamp.ok and stamp.covers_entire_file and stamp.sn == req.sn
    result = pdfsig(out)
    assert result.signatures[0].get("Signature Validation") == "Signature is Valid.", result.raw
    assert_pdfsig_ok(result, index=1)


def test_stamping_twice_keeps_both_valid(engines, dev_ca_rsa, pdfsig, a4_pdf):
    first, second = request(), request(box=(60, 60, 240, 140))
    once = engines["rsa2048"].stamp(a4_pdf, first)
    twice = engines["rsa2048"].stamp(once, second)
    a, b = verify(twice, [dev_ca_rsa.ca_cert_pem]).signatures
    assert (a.sn, b.sn) == (first.sn, second.sn)
    assert a.ok and b.ok and b.covers_entire_file and not a.covers_entire_file
    result = pdfsig(twice)
    assert all(s.get("Signature Validation") == "Signature is Valid." for s in result.signatures), result.raw


def test_scan_and_object_streams_and_second_page(engines, dev_cas, pdfsig):
    for data, page in [(corpus.scan_800k(3), 1), (corpus.a4_text(5, pages=3, object_streams=True), 2)]:
        req = request(page=page)
        out = engines["p256"].stamp(data, req)
        assert_our_stamp_ok(out, dev_cas["p256"], req)
        assert_pdfsig_ok(pdfsig(out))


@pytest.mark.parametrize("path", ["engine", "reference"])
def test_stamp_shows_words_sn_and_qr(engines, dev_ca_rsa, read_stamp, a4_pdf, path):
    req = request(box=(380, 60, 560, 140))  # below the letter's text: the region holds only the stamp
    if path == "engine":
        out = engines["rsa2048"].stamp(a4_pdf, req)
    else:
        out = stamp_reference(a4_pdf, req, dev_ca_rsa.p12_path, dev_ca_rsa.password, VERIFY_BASE)
    text, qr = read_stamp(out, req.page, req.box)
    assert text == [*STAMP_TEXT_LINES, req.sn]  # what poppler extracts from the rendered page
    assert appearance_text(out, req.field_name) == [*STAMP_TEXT_LINES, req.sn]
    assert qr == [verification_url(VERIFY_BASE, req.sn)]


@pytest.mark.parametrize("page, box", [(2, BOX), (0, BOX), (1, (300, 100, 300, 200))])
def test_engine_placement_errors(engines, a4_pdf, page, box):
    with pytest.raises(BubuhError) as info:
        engines["rsa2048"].stamp(a4_pdf, request(page=page, box=box))
    assert info.value.code.code == "PLACEMENT_INVALID"


@pytest.mark.parametrize("data, code", [
    (b"%PDF-1.7\nnot really", "PDF_MALFORMED"),
    (corpus.a4_text()[:500], "PDF_MALFORMED"),
    (corpus.deeply_nested(), "PDF_MALFORMED"),  # no RecursionError escapes
    (corpus.encrypted(), "PDF_ENCRYPTED"),
    (corpus.encrypted(""), "PDF_ENCRYPTED"),
], ids=["junk", "truncated", "deeply-nested", "encrypted", "encrypted-empty-password"])
def test_engine_refuses_what_intake_should_have(engines, data, code):
    # defence in depth: a worker given a bad file answers with a code, it does not crash
    with pytest.raises(BubuhError) as info:
        engines["rsa2048"].stamp(data, request())
    assert info.value.code.code == code


def test_engine_reserves_fixed_space(engines, a4_pdf):
    # no size estimation per document: the /Contents placeholder is the same for every stamp
    import io

    from pyhanko.pdf_utils.reader import PdfFileReader

    engine = engines["rsa2048"]
    for _ in range(3):
        out = engine.stamp(a4_pdf, request())
        (sig,) = PdfFileReader(io.BytesIO(out)).embedded_signatures
        byte_range = [int(v) for v in sig.sig_object["/ByteRange"]]
        assert byte_range[2] - byte_range[1] == engine.bytes_reserved + 2  # <hex digits>


# --- time-stamps (PAdES B-T) ------------------------------------------------------------------


def test_engine_with_tsa_is_pades_b_t(dev_ca_rsa, local_tsa, pdfsig, a4_pdf):
    engine = StampingEngine(SignerConfig(p12_path=str(dev_ca_rsa.p12_path), p12_password=dev_ca_rsa.password,
                                         tsa_url=local_tsa.url), VERIFY_BASE)
    try:
        req = request()
        before = local_tsa.requests
        out = engine.stamp(a4_pdf, req)
        assert local_tsa.requests == before + 1
        report = verify(out, [dev_ca_rsa.ca_cert_pem, local_tsa.ca_cert_pem])
        sig = report.signatures[-1]
        assert sig.ok and sig.covers_entire_file, sig.summary
        assert sig.timestamp_time is not None and sig.timestamp_trusted
        assert_pdfsig_ok(pdfsig(out))
    finally:
        engine.close()


def test_tsa_unreachable_is_retryable(dev_ca_rsa, a4_pdf):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = StampingEngine(SignerConfig(p12_path=str(dev_ca_rsa.p12_path), p12_password=dev_ca_rsa.password,
                                         tsa_url=f"http://127.0.0.1:{port}/tsa", tsa_timeout_s=2), VERIFY_BASE)
    try:
        with pytest.raises(BubuhError) as info:
            engine.stamp(a4_pdf, request())
        assert info.value.code.code == "TSA_UNAVAILABLE"
        assert info.value.code.retryable
    finally:
        engine.close()


# --- PKCS#11 (SoftHSM2) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hsm_engine(softhsm_token):
    engine = StampingEngine(SignerConfig(
        pkcs11_module=softhsm_token.module_path, pkcs11_token_label=softhsm_token.token_label,
        pkcs11_pin=softhsm_token.pin, pkcs11_key_label=softhsm_token.key_label), VERIFY_BASE)
    yield engine
    engine.close()


def test_engine_on_pkcs11_token(hsm_engine, dev_ca_rsa, pdfsig, a4_pdf):
    req = request()
    out = hsm_engine.stamp(a4_pdf, req)
    assert_our_stamp_ok(out, dev_ca_rsa, req)
    assert_pdfsig_ok(pdfsig(out))


def test_engine_on_pkcs11_token_ecdsa(softhsm_tokens, dev_cas, pdfsig, a4_pdf):
    # SoftHSM2 lacks CKM_ECDSA_SHA256: the key hashes first and uses raw CKM_ECDSA
    token = softhsm_tokens["p256"]
    engine = StampingEngine(SignerConfig(
        pkcs11_module=token.module_path, pkcs11_token_label=token.token_label,
        pkcs11_pin=token.pin, pkcs11_key_label=token.key_label), VERIFY_BASE)
    req = request()
    out = engine.stamp(a4_pdf, req)
    assert_our_stamp_ok(out, dev_cas["p256"], req)
    assert_pdfsig_ok(pdfsig(out))


def test_token_failure_is_token_busy_then_recovers(hsm_engine, dev_ca_rsa, a4_pdf):
    hsm_engine.key.session.close()  # the HSM drops our session (restart, failover)
    with pytest.raises(BubuhError) as info:
        hsm_engine.stamp(a4_pdf, request())
    assert info.value.code.code == "TOKEN_BUSY" and info.value.code.retryable
    req = request()  # the engine logged in again; the retry succeeds
    assert_our_stamp_ok(hsm_engine.stamp(a4_pdf, req), dev_ca_rsa, req)


def test_placeholder_grows_when_a_tsa_token_is_bigger_than_planned(dev_ca_rsa, local_tsa, a4_pdf):
    engine = StampingEngine(SignerConfig(p12_path=str(dev_ca_rsa.p12_path), p12_password=dev_ca_rsa.password,
                                         tsa_url=local_tsa.url, bytes_reserved=4000), VERIFY_BASE)
    try:
        req = request()
        out = engine.stamp(a4_pdf, req)  # 4000 hex digits cannot hold CMS + token: grown, signed again
        assert engine.bytes_reserved > 4000
        report = verify(out, [dev_ca_rsa.ca_cert_pem, local_tsa.ca_cert_pem])
        assert report.signatures[-1].ok and report.signatures[-1].timestamp_trusted
    finally:
        engine.close()
