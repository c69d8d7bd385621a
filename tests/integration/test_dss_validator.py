"""The EU DSS library (services/operator/dss_validator.py), offline, default policy, trusting only the local
PKI's anchor, judges our stamps: TOTAL_PASSED at PAdES-BASELINE-LT (default) and -LTA; an applicant's earlier
signature keeps its own indication and DSS sees no object modification beyond our signature field."""

from __future__ import annotations

import pytest

from loadtests import corpus
from services.operator import dss_validator as dss
from services.stamping.serial import SerialIssuer
from services.stamping.signing import dev_pki
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.request import StampRequest

ISSUER = SerialIssuer(80)


@pytest.fixture(scope="module")
def validator():
    try:
        dss.ensure()
    except dss.DssUnavailable as exc:   # java and mvn are what the stack needs anyway: a failure, not a skip
        pytest.fail(str(exc))


def stamp(pki, level: str, data: bytes) -> bytes:
    eng = StampingEngine(SignerConfig(p12_path=str(pki.signer_p12), p12_password=dev_pki.P12_PASSWORD,
                                      tsa_url=pki.tsa_url, level=level), "https://verify.bubuh.example")
    try:
        return eng.stamp(data, StampRequest(sn=ISSUER.next(), page=1, box=(380, 40, 560, 140),
                                            reason="Surat pernyataan", location="Jakarta"))
    finally:
        eng.close()


@pytest.mark.parametrize("level, expected", [("b-lt", "PAdES-BASELINE-LT"), ("b-lta", "PAdES-BASELINE-LTA")])
def test_dss_passes_our_stamp(pki, validator, level, expected):
    report = dss.validate(stamp(pki, level, corpus.a4_text(5)), pki.trust_anchor)
    (sig,) = report.signatures
    assert (sig.indication, sig.subindication, sig.format) == ("TOTAL_PASSED", None, expected), report.raw
    assert not report.modifications, report.raw


def test_dss_keeps_the_applicants_signature_as_it_was_and_passes_ours(pki, validator):
    presigned = corpus.presigned(31)
    before = dss.validate(presigned.data, pki.trust_anchor)
    (applicant,) = before.signatures
    after = dss.validate(stamp(pki, "b-lt", presigned.data), pki.trust_anchor)
    assert len(after.signatures) == 2, after.raw
    first, ours = after.signatures
    assert (first.indication, first.subindication) == (applicant.indication, applicant.subindication), after.raw
    assert (ours.indication, ours.format) == ("TOTAL_PASSED", "PAdES-BASELINE-LT"), after.raw
    assert not after.modifications, after.raw


def test_b_lta_still_passes_after_the_signing_certificate_expired(pki, validator):
    import datetime as dt

    from services.stamping.signing import signing_key

    signer = signing_key.load_pkcs12(pki.signer_p12, dev_pki.P12_PASSWORD).signing_cert
    later = signer.not_valid_after + dt.timedelta(days=30)   # the TSA's certificate is still valid then
    lta = dss.validate(stamp(pki, "b-lta", corpus.a4_text(6)), pki.trust_anchor, at=later)
    assert (lta.signatures[0].indication, lta.signatures[0].format) == ("TOTAL_PASSED", "PAdES-BASELINE-LTA"), lta.raw
    # B-LT too, while the TSA's certificate lasts: the signature time-stamp proves the signature existed
    # while the signer's certificate was valid, and the DSS says it was not revoked then
    lt = dss.validate(stamp(pki, "b-lt", corpus.a4_text(6)), pki.trust_anchor, at=later)
    assert (lt.signatures[0].indication, lt.signatures[0].format) == ("TOTAL_PASSED", "PAdES-BASELINE-LT"), lt.raw


def test_b_lta_renewed_before_the_tsa_expired_passes_after_the_signer_and_the_tsa_expired(pki, validator):
    """The archive chain: before the first TSA's certificate expires, `bubuh renew-timestamps` adds its
    validation data and a time-stamp from the rolled-over TSA, whose certificate outlives it."""
    import asyncio
    import datetime as dt

    from services.stamping import archive

    arch = dev_pki.load_arch(pki)
    signer_expires, tsa_expires = (arch.get_cert(label).not_valid_after for label in ("signer", "tsa"))
    later = max(signer_expires, tsa_expires) + dt.timedelta(days=30)
    assert arch.get_cert("tsa-archive").not_valid_after > later
    lta = stamp(pki, "b-lta", corpus.a4_text(8))
    # without renewal, nothing proves the stamp existed while the first TSA's certificate was good
    stale = dss.validate(lta, pki.trust_anchor, at=later)
    assert stale.signatures[0].indication != "TOTAL_PASSED", stale.raw
    renewed = asyncio.run(archive.renew(lta, pki.archive_tsa_url, [pki.trust_anchor]))
    assert renewed.startswith(lta)
    report = dss.validate(renewed, pki.trust_anchor, at=later)
    assert (report.signatures[0].indication, report.signatures[0].format) == (
        "TOTAL_PASSED", "PAdES-BASELINE-LTA"), report.raw
    assert all(ts.indication == "PASSED" for ts in report.timestamps), report.raw


def _annotated() -> bytes:
    """A letter with a link and a note on its page (annotations our stamp's update must leave alone)."""
    import io

    import pikepdf

    pdf = pikepdf.open(io.BytesIO(corpus.a4_text(7)))
    page = pdf.pages[0]
    page.obj["/Annots"] = pdf.make_indirect(pikepdf.Array([
        pdf.make_indirect(pikepdf.Dictionary(Type=pikepdf.Name.Annot, Subtype=pikepdf.Name.Link,
                                             Rect=[72, 700, 300, 720], Border=[0, 0, 0],
                                             A=pikepdf.Dictionary(S=pikepdf.Name.URI, URI="https://example.org"))),
        pdf.make_indirect(pikepdf.Dictionary(Type=pikepdf.Name.Annot, Subtype=pikepdf.Name.Text,
                                             Rect=[400, 700, 420, 720], Contents="catatan")),
    ]))
    out = io.BytesIO()
    pdf.save(out)
    return out.getvalue()


@pytest.mark.parametrize("make", [lambda: corpus.form_with_fields(20), _annotated], ids=["form", "annotations"])
def test_dss_sees_no_modification_beyond_our_signature_field(pki, validator, make):
    """Signed by the applicant first: DSS judges what our update changed after their signature."""
    signed = corpus.presigned(33, base=make()).data
    (applicant,) = dss.validate(signed, pki.trust_anchor).signatures
    report = dss.validate(stamp(pki, "b-lt", signed), pki.trust_anchor)
    first, ours = report.signatures
    assert (first.indication, first.subindication) == (applicant.indication, applicant.subindication), report.raw
    assert (ours.indication, ours.format) == ("TOTAL_PASSED", "PAdES-BASELINE-LT"), report.raw
    assert not report.modifications, report.raw
