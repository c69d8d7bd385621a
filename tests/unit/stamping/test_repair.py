"""Unsigned files the stamp cannot be appended to as they are get stamped on a rewrite; signed ones never do."""

import hashlib

import pytest

from loadtests import corpus
from services.kernel.errors import BubuhError
from services.stamping.document import repair
from services.stamping.document.inspection import inspect
from services.stamping.document.signature_validation import verify
from services.stamping.serial import SerialIssuer
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.request import StampRequest
from tests import pdf_producers
from tests.unit.stamping.conftest import VERIFY_BASE, assert_pdfsig_ok

ISSUER = SerialIssuer(81)
BOX = (380.0, 40.0, 560.0, 140.0)
BREAKERS = {"offsets-shifted": pdf_producers.offsets_shifted, "xref-cut-out": pdf_producers.xref_cut_out,
            "startxref-cut-off": pdf_producers.startxref_cut_off}


def request() -> StampRequest:
    return StampRequest(ISSUER.next(), 1, BOX, reason="Surat pernyataan", location="Jakarta")


@pytest.fixture(scope="module")
def engine(dev_ca_rsa):
    made = StampingEngine(SignerConfig(p12_path=str(dev_ca_rsa.p12_path), p12_password=dev_ca_rsa.password),
                          VERIFY_BASE)
    yield made
    made.close()


@pytest.mark.parametrize("name", BREAKERS)
def test_intake_accepts_an_unsigned_file_whose_cross_reference_table_qpdf_rebuilt(name):
    facts = inspect(BREAKERS[name](corpus.a4_text(21)), "standard", 1, BOX)
    assert facts.xref_damaged and not facts.has_signatures
    assert not inspect(corpus.a4_text(21), "standard", 1, BOX).xref_damaged


def test_intake_refuses_a_signed_file_whose_cross_reference_table_is_damaged(presigned_doc):
    with pytest.raises(BubuhError) as info:
        inspect(pdf_producers.startxref_cut_off(presigned_doc.data), "standard", 1, BOX)
    assert info.value.code.code == "PDF_MALFORMED" and "signature" in info.value.detail


def test_intake_refuses_a_signed_file_pyhanko_cannot_read(presigned_doc):
    """Refused at the door: the worker could only fail it after its unit was reserved."""
    with pytest.raises(BubuhError) as info:
        inspect(pdf_producers.free_head_generation_65536(presigned_doc.data), "standard", 1, BOX)
    assert info.value.code.code == "PDF_MALFORMED" and "Illegal generation 65536" in info.value.detail
    # unsigned, the same quirk passes intake: the worker stamps a rewrite
    assert inspect(pdf_producers.free_head_generation_65536(corpus.a4_text(26)), "standard", 1, BOX)


@pytest.mark.parametrize("name", ["generation-65536", *BREAKERS])
def test_the_engine_stamps_a_rewrite_and_names_its_hash(engine, dev_ca_rsa, pdfsig, name):
    original = corpus.a4_text(22)
    broken = (pdf_producers.free_head_generation_65536 if name == "generation-65536" else BREAKERS[name])(original)
    stamped = engine.stamp_document(broken, request())
    assert stamped.rewritten_sha256 and stamped.rewrite_reason
    assert not stamped.pdf.startswith(broken)
    # the stamp's /ByteRange starts at 0: the file is the rewrite followed by our updates
    rewrite = repair.rewrite(broken, "again").data
    assert stamped.pdf.startswith(rewrite) and hashlib.sha256(rewrite).hexdigest() == stamped.rewritten_sha256
    (sig,) = verify(stamped.pdf, [dev_ca_rsa.ca_cert_pem]).signatures
    assert sig.intact and sig.valid and sig.trusted and sig.covers_entire_file, sig.summary
    assert_pdfsig_ok(pdfsig(stamped.pdf))


def test_a_file_pyhanko_reads_is_stamped_as_it_is(engine):
    data = corpus.a4_text(23)
    stamped = engine.stamp_document(data, request())
    assert stamped.rewritten_sha256 is None and stamped.pdf.startswith(data)


def test_a_signed_file_is_never_rewritten(engine, presigned_doc):
    unreadable = pdf_producers.free_head_generation_65536(presigned_doc.data)
    with pytest.raises(BubuhError) as info:
        engine.stamp_document(unreadable, request())
    assert info.value.code.code == "PDF_MALFORMED"
    assert "Illegal generation 65536" in info.value.detail and "signature" in info.value.detail


def test_a_file_whose_objects_are_damaged_is_not_guessed_at(engine):
    good = corpus.a4_text(24)
    cut = good[: len(good) * 8 // 10]   # cut mid-object: content is lost, not only the table
    with pytest.raises(BubuhError) as info:
        engine.stamp_document(cut, request())
    assert info.value.code.code == "PDF_MALFORMED"


def test_the_rewrite_is_deterministic():
    broken = pdf_producers.offsets_shifted(corpus.a4_text(25))
    assert repair.rewrite(broken, "x").data == repair.rewrite(broken, "y").data
