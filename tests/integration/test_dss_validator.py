"""The EU DSS library (services/operator/dss_validator.py), offline, default policy, trusting only the local
PKI's anchor, judges our stamps: TOTAL_PASSED at PAdES-BASELINE-LT (default) and -LTA; an applicant's earlier
signature keeps its own indication and DSS sees no object modification beyond our signature field."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from loadtests import corpus
from services.operator import dss_validator as dss
from services.stamping import archive
from services.stamping.serial import SerialIssuer
from services.stamping.signing import dev_pki, signing_key
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


NOW, AFTER_SIGNER, AFTER_BOTH = "now", "after the signer expired", "after the signer and the TSA expired"


@pytest.fixture(scope="module")
def judged(pki, validator) -> dict[tuple[str, str], dss.DssReport]:
    """DSS's report on every document this module asks about, by (validation time, document). They are
    stamped first and each time's documents go to one JVM (``validate_many``): a JVM's start is ~3.8 s
    of CPU and each document in it ~0.2 s, where one JVM a document made this module the suite's fifth
    slowest."""
    signer = signing_key.load_pkcs12(pki.signer_p12, dev_pki.P12_PASSWORD).signing_cert
    arch = dev_pki.load_arch(pki)
    signer_expires, tsa_expires = (arch.get_cert(label).not_valid_after for label in ("signer", "tsa"))
    after_both = max(signer_expires, tsa_expires) + dt.timedelta(days=30)
    assert arch.get_cert("tsa-archive").not_valid_after > after_both
    lta = stamp(pki, "b-lta", corpus.a4_text(8))
    renewed = asyncio.run(archive.renew(lta, pki.archive_tsa_url, [pki.trust_anchor]))
    assert renewed.startswith(lta)
    presigned = corpus.presigned(31).data
    form = corpus.presigned(33, base=corpus.form_with_fields(20)).data
    annotated = corpus.presigned(33, base=_annotated()).data
    documents: dict[str, tuple[dt.datetime | None, dict[str, bytes]]] = {
        NOW: (None, {
            "b-lt": stamp(pki, "b-lt", corpus.a4_text(5)), "b-lta": stamp(pki, "b-lta", corpus.a4_text(5)),
            "presigned": presigned, "presigned, stamped": stamp(pki, "b-lt", presigned),
            "form": form, "form, stamped": stamp(pki, "b-lt", form),
            "annotations": annotated, "annotations, stamped": stamp(pki, "b-lt", annotated)}),
        # the TSA's certificate is still valid then
        AFTER_SIGNER: (signer.not_valid_after + dt.timedelta(days=30), {
            "b-lta": stamp(pki, "b-lta", corpus.a4_text(6)), "b-lt": stamp(pki, "b-lt", corpus.a4_text(6))}),
        AFTER_BOTH: (after_both, {"b-lta": lta, "b-lta, renewed": renewed}),
    }
    out = {}
    for when, (at, named) in documents.items():
        reports = dss.validate_many(list(named.values()), pki.trust_anchor, at=at)
        out |= {(when, name): report for name, report in zip(named, reports, strict=True)}
    return out


@pytest.mark.parametrize("level, expected", [("b-lt", "PAdES-BASELINE-LT"), ("b-lta", "PAdES-BASELINE-LTA")])
def test_dss_passes_our_stamp(judged, level, expected):
    report = judged[NOW, level]
    (sig,) = report.signatures
    assert (sig.indication, sig.subindication, sig.format) == ("TOTAL_PASSED", None, expected), report.raw
    assert not report.modifications, report.raw


def test_dss_keeps_the_applicants_signature_as_it_was_and_passes_ours(judged):
    (applicant,) = judged[NOW, "presigned"].signatures
    after = judged[NOW, "presigned, stamped"]
    assert len(after.signatures) == 2, after.raw
    first, ours = after.signatures
    assert (first.indication, first.subindication) == (applicant.indication, applicant.subindication), after.raw
    assert (ours.indication, ours.format) == ("TOTAL_PASSED", "PAdES-BASELINE-LT"), after.raw
    assert not after.modifications, after.raw


def test_b_lta_still_passes_after_the_signing_certificate_expired(judged):
    lta = judged[AFTER_SIGNER, "b-lta"]
    assert (lta.signatures[0].indication, lta.signatures[0].format) == ("TOTAL_PASSED", "PAdES-BASELINE-LTA"), lta.raw
    # B-LT too, while the TSA's certificate lasts: the signature time-stamp proves the signature existed
    # while the signer's certificate was valid, and the DSS says it was not revoked then
    lt = judged[AFTER_SIGNER, "b-lt"]
    assert (lt.signatures[0].indication, lt.signatures[0].format) == ("TOTAL_PASSED", "PAdES-BASELINE-LT"), lt.raw


def test_b_lta_renewed_before_the_tsa_expired_passes_after_the_signer_and_the_tsa_expired(judged):
    """The archive chain: before the first TSA's certificate expires, `bubuh renew-timestamps` adds its
    validation data and a time-stamp from the rolled-over TSA, whose certificate outlives it."""
    # without renewal, nothing proves the stamp existed while the first TSA's certificate was good
    stale = judged[AFTER_BOTH, "b-lta"]
    assert stale.signatures[0].indication != "TOTAL_PASSED", stale.raw
    report = judged[AFTER_BOTH, "b-lta, renewed"]
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


@pytest.mark.parametrize("signed", ["form", "annotations"])
def test_dss_sees_no_modification_beyond_our_signature_field(judged, signed):
    """Signed by the applicant first: DSS judges what our update changed after their signature."""
    (applicant,) = judged[NOW, signed].signatures
    report = judged[NOW, f"{signed}, stamped"]
    first, ours = report.signatures
    assert (first.indication, first.subindication) == (applicant.indication, applicant.subindication), report.raw
    assert (ours.indication, ours.format) == ("TOTAL_PASSED", "PAdES-BASELINE-LT"), report.raw
    assert not report.modifications, report.raw
