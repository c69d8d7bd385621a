"""B-LT's DSS revision as the engine writes it (``dss_revision.py``, without re-reading the signed file):
exactly the DSS's objects and the catalogue, a cross-reference section of the signature's kind, the same
validation data pyHanko's ``add_dss`` would embed, and pyHanko's merge when the document already has a DSS."""

from __future__ import annotations

import io
import subprocess

import pikepdf
import pytest
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation.dss import DocumentSecurityStore

from loadtests import corpus
from services.stamping.document import signature_validation
from services.stamping.serial import SerialIssuer
from services.stamping.signing import dev_pki
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.request import StampRequest

ISSUER = SerialIssuer(81)
BOX = (380.0, 40.0, 560.0, 140.0)


@pytest.fixture(scope="module")
def b_lt(pki):
    eng = StampingEngine(SignerConfig(p12_path=str(pki.signer_p12), p12_password=dev_pki.P12_PASSWORD,
                                      tsa_url=pki.tsa_url, level="b-lt"), "https://verify.bubuh.example")
    yield eng
    eng.close()


def _stamp(eng: StampingEngine, data: bytes) -> bytes:
    return eng.stamp(data, StampRequest(sn=ISSUER.next(), page=1, box=BOX, reason="Surat", location="Jakarta"))


def _last_revision(out: bytes):
    reader = PdfFileReader(io.BytesIO(out))
    last = reader.xrefs.total_revisions - 1
    return reader, reader.xrefs.explicit_refs_in_revision(last), reader.xrefs.get_xref_container_info(last)


def _der_sets(dss: DocumentSecurityStore) -> tuple[set, set, set]:
    return ({c.dump() for c in dss.load_certs()},
            {r.get_object().data for r in dss.ocsps}, {r.get_object().data for r in dss.crls})


@pytest.mark.parametrize("object_streams", [False, True], ids=["xref-table", "xref-stream"])
def test_the_dss_revision_holds_the_dss_and_the_catalogue_and_nothing_else(b_lt, pki, tmp_path, object_streams):
    data = corpus.a4_text(3, object_streams=object_streams)
    out = _stamp(b_lt, data)
    assert out.startswith(data)
    reader, refs, info = _last_revision(out)
    root_ref = reader.trailer.raw_get("/Root")
    dss_ref = reader.root.raw_get("/DSS")
    dss = DocumentSecurityStore.read_dss(reader)
    streams = {*dss.certs.values(), *dss.ocsps, *dss.crls}
    # the same kind of cross-reference section as the file's own (a stream after streams)
    assert reader.has_xref_stream is object_streams
    assert (info.stream_ref is not None) is object_streams
    xref_stream = {(info.stream_ref.idnum, info.stream_ref.generation)} if object_streams else set()
    assert {(r.idnum, r.generation) for r in refs} == (
        {(root_ref.idnum, root_ref.generation), (dss_ref.idnum, dss_ref.generation)}
        | {(r.idnum, r.generation) for r in streams} | xref_stream)
    # the catalogue changed by /DSS alone
    before = PdfFileReader(io.BytesIO(out)).get_historical_root(reader.xrefs.total_revisions - 2)
    after = reader.root
    assert set(after.keys()) - set(before.keys()) == {"/DSS"}
    assert all(after.raw_get(k) == before.raw_get(k) for k in before.keys())
    # what a validator needs, and what pyHanko's add_dss would have embedded
    bundle = b_lt.validation.current(b_lt._event_loop())
    assert _der_sets(dss) == ({c.dump() for c in bundle.certs}, {o.dump() for o in bundle.ocsps},
                              {c.dump() for c in bundle.crls})
    (stamp,) = signature_validation.verify(out, [pki.trust_anchor]).stamps
    assert stamp.ok and not stamp.findings, stamp.findings
    assert signature_validation.pades_level(out) == "B-LT"
    # qpdf finds the file sound; pikepdf reads the DSS through the new trailer
    (tmp_path / "stamped.pdf").write_bytes(out)
    check = subprocess.run(["qpdf", "--check", str(tmp_path / "stamped.pdf")], capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    with pikepdf.open(io.BytesIO(out)) as pdf:
        assert len(pdf.Root.DSS.Certs) == len(dss.certs)


def test_a_document_with_a_dss_already_gets_it_merged_and_both_stamps_stay_valid(b_lt, pki):
    once = _stamp(b_lt, corpus.a4_text(4))
    first = _der_sets(DocumentSecurityStore.read_dss(PdfFileReader(io.BytesIO(once))))
    twice = _stamp(b_lt, once)
    assert twice.startswith(once)
    reader = PdfFileReader(io.BytesIO(twice))
    merged = DocumentSecurityStore.read_dss(reader)
    assert all(a <= b for a, b in zip(first, _der_sets(merged), strict=True))
    report = signature_validation.verify(twice, [pki.trust_anchor])
    assert len(report.stamps) == 2
    assert all(s.ok and not s.findings for s in report.stamps), [s.findings for s in report.stamps]


def test_a_refreshed_bundle_is_serialised_again(b_lt):
    _stamp(b_lt, corpus.a4_text(5))
    held = b_lt._dss
    _stamp(b_lt, corpus.a4_text(5))
    assert b_lt._dss is held  # the same bundle: the same serialised streams
    b_lt.validation._bundle = None  # as when the bundle's nextUpdate has passed
    out = _stamp(b_lt, corpus.a4_text(5))
    assert b_lt._dss is not held and b_lt._dss[0] is b_lt.validation.current(b_lt._event_loop())
    assert len(DocumentSecurityStore.read_dss(PdfFileReader(io.BytesIO(out))).ocsps) >= 1
