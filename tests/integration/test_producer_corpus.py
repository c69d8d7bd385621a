"""Every real-world PDF gets stamped (issue 13): a corpus from the producers applicants use
(``tests/pdf_producers.py``), each file stamped by the real engine at the platform's default level (PAdES
B-LT, the local test PKI) and judged by three validators that share no code: poppler's pdfsig, pyHanko
(our own verification, ``signature_validation.verify``) and the EU DSS library. Our update may touch
no existing object beyond what one signature field needs. Then the file of the reported failure, a
PyMuPDF letter pyHanko's reader refused, goes through the platform's real worker path."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from services.kernel.settings import Settings
from services.operator import dss_validator as dss
from services.stamping.document import repair, signature_validation
from services.stamping.serial import SerialIssuer
from services.stamping.signing import dev_pki
from services.stamping.signing.engine import SignerConfig, Stamped, StampingEngine
from services.stamping.signing.request import StampRequest
from tests import pdf_producers

ISSUER = SerialIssuer(82)
BOX = (380.0, 40.0, 560.0, 140.0)


@dataclass(frozen=True)
class Case:
    name: str
    original: bytes
    stamped: Stamped


@pytest.fixture(scope="module")
def cases(pki) -> dict[str, Case | pdf_producers.ProducerMissing]:
    """Every producer's file, stamped once by one engine at B-LT (the platform's default level)."""
    eng = StampingEngine(SignerConfig(p12_path=str(pki.signer_p12), p12_password=dev_pki.P12_PASSWORD,
                                      tsa_url=pki.tsa_url, level="b-lt", trust_roots=(str(pki.trust_anchor),)),
                         "https://verify.bubuh.example")
    out: dict[str, Case | pdf_producers.ProducerMissing] = {}
    try:
        for name, make in pdf_producers.PRODUCERS.items():
            try:
                data = make()
            except pdf_producers.ProducerMissing as missing:
                out[name] = missing
                continue
            out[name] = Case(name, data, eng.stamp_document(
                data, StampRequest(sn=ISSUER.next(), page=1, box=BOX, reason="Surat pernyataan", location="Jakarta")))
    finally:
        eng.close()
    return out


@pytest.fixture(scope="module")
def dss_reports(pki, cases) -> dict[str, dss.DssReport]:
    """DSS's verdicts, all files in one JVM (a JVM per file would cost seconds each)."""
    try:
        dss.ensure()
    except dss.DssUnavailable as exc:
        pytest.skip(str(exc))
    stamped = {name: case.stamped.pdf for name, case in cases.items() if isinstance(case, Case)}
    return dict(zip(stamped, dss.validate_many(list(stamped.values()), pki.trust_anchor), strict=True))


@pytest.fixture(scope="module")
def pdfsig(pki, tmp_path_factory):
    """poppler's pdfsig with an NSS database that trusts only the PKI's anchor; returns its verdict on the
    certificate ("Certificate is Trusted." or what it said instead) after asserting the signature is valid.

    Debian 12's poppler (22.12) reads NSS's last error code after ``CERT_PKIXVerifyCert`` even when the
    call succeeded (later poppler checks the return value first). With our three-level chain, whose signer
    names an OCSP responder, NSS leaves a stale code behind a successful verification and pdfsig prints
    "Unknown issue with Certificate or corrupted data.". Then the same NSS verification (libpkix, the
    e-mail signer usage pdfsig asks for, revocation by OCSP) is run by NSS's own ``vfychain`` on the chain
    the signature carries, and its answer stands in for pdfsig's misreport.
    """
    for tool, package in (("pdfsig", "poppler-utils"), ("certutil", "libnss3-tools"), ("vfychain", "libnss3-tools")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (Debian {package})")
    nss = tmp_path_factory.mktemp("nss")
    subprocess.run(["certutil", "-N", "-d", f"sql:{nss}", "--empty-password"], check=True, capture_output=True)
    subprocess.run(["certutil", "-A", "-n", "bubuh-dev-root", "-t", "CT,C,C", "-i", str(pki.trust_anchor),
                    "-d", f"sql:{nss}"], check=True, capture_output=True)
    scratch = tmp_path_factory.mktemp("pdfsig")

    def run(name: str, pdf: bytes) -> str:
        path = scratch / f"{name}.pdf"
        path.write_bytes(pdf)
        report = subprocess.run(["pdfsig", "-nssdir", f"sql:{nss}", str(path)], capture_output=True, text=True,
                                timeout=60).stdout
        assert report.count("Signature Validation: Signature is Valid.") == 1, report
        assert re.search(r"^\s*- Signed Ranges: \[0 - \d+\], \[\d+ - \d+\]$", report, re.M), report
        said = re.search(r"Certificate Validation: (.*)$", report, re.M)
        assert said, report
        if said.group(1) != "Unknown issue with Certificate or corrupted data.":
            return said.group(1)
        chain = _signer_chain(pdf, scratch / name)
        checked = subprocess.run(["vfychain", "-d", f"sql:{nss}", "-pp", "-u", "4", "-g", "leaf", "-m", "ocsp",
                                  "-s", "requireFreshInfo", *map(str, chain)],
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and "Chain is good!" in checked.stdout + checked.stderr, \
            report + checked.stdout + checked.stderr
        return "Certificate is Trusted."

    return run


def _signer_chain(pdf: bytes, where) -> list:
    """Our signature's signer certificate, then the intermediate CA certificates it carries, as DER files
    (the anchor is the NSS database's, as for pdfsig)."""
    from pyhanko.pdf_utils.reader import PdfFileReader

    sig = PdfFileReader(io.BytesIO(pdf)).embedded_regular_signatures[-1]
    where.mkdir(exist_ok=True)
    certs = [sig.signer_cert] + [c.chosen for c in sig.signed_data["certificates"]
                                 if c.name == "certificate" and c.chosen.sha256 != sig.signer_cert.sha256
                                 and c.chosen.self_signed == "no"]
    paths = []
    for n, cert in enumerate(certs):
        paths.append(where / f"{n}.der")
        paths[-1].write_bytes(cert.dump())
    return paths


def _opens_in_qpdf_and_poppler(name: str, data: bytes, tmp_path) -> None:
    """The issue's premise for each file: qpdf and poppler open it (qpdf may warn about what it rebuilt)."""
    path = tmp_path / f"{name}.pdf"
    path.write_bytes(data)
    qpdf = subprocess.run(["qpdf", "--check", str(path)], capture_output=True, text=True, timeout=60)
    allowed = (0, 3) if name in pdf_producers.NEEDS_REWRITE else (0,)
    assert qpdf.returncode in allowed, qpdf.stdout + qpdf.stderr
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and re.search(r"^Pages:\s+1$", info.stdout, re.M), info.stdout + info.stderr
    assert b"/Encrypt" not in data


def _touched_beyond_one_signature_field(pdf: bytes) -> list[str]:
    """Existing objects our updates rewrote other than what adding one signature field (and the DSS) needs:
    the catalog, the page that shows the widget and its /Annots array, the form dictionary, and the
    document information and XMP metadata pyHanko keeps current."""
    from pyhanko.pdf_utils import generic
    from pyhanko.pdf_utils.reader import PdfFileReader

    reader = PdfFileReader(io.BytesIO(pdf))
    ours = reader.embedded_regular_signatures[-1]
    base = reader.get_historical_resolver(ours.signed_revision - 1)
    root = base.root
    page = ours.sig_field.get("/P") if "/P" in ours.sig_field else None
    allowed = {base.root_ref.idnum}
    for holder, key in ((root, "/AcroForm"), (root, "/Metadata"), (base.trailer_view, "/Info")):
        ref = holder.raw_get(key) if key in holder else None
        if isinstance(ref, generic.IndirectObject):
            allowed.add(ref.idnum)
    page_ref = ours.sig_field.raw_get("/P") if page is not None else None
    if isinstance(page_ref, generic.IndirectObject):
        allowed.add(page_ref.idnum)
        old_page = base.get_object(page_ref.reference)
        annots = old_page.raw_get("/Annots") if "/Annots" in old_page else None
        if isinstance(annots, generic.IndirectObject):
            allowed.add(annots.idnum)
    existing: set[int] = set()
    for revision in range(ours.signed_revision):
        existing |= {ref.idnum for ref in reader.xrefs.explicit_refs_in_revision(revision)}
    touched = []
    for revision in range(ours.signed_revision, reader.xrefs.total_revisions):
        for ref in reader.xrefs.explicit_refs_in_revision(revision):
            if ref.idnum in existing and ref.idnum not in allowed:
                obj = base.get_object(generic.Reference(ref.idnum, 0))
                kind = obj.get("/Type") or obj.get("/Subtype") if isinstance(obj, generic.DictionaryObject) else ""
                touched.append(f"revision {revision + 1}: object {ref.idnum} {kind or type(obj).__name__}")
    return touched


@pytest.mark.parametrize("name", list(pdf_producers.PRODUCERS))
def test_every_producers_file_is_stamped_and_valid_in_all_three_validators(name, cases, dss_reports, pdfsig, pki,
                                                                          tmp_path):
    case = cases[name]
    if isinstance(case, pdf_producers.ProducerMissing):
        pytest.skip(str(case))
    _opens_in_qpdf_and_poppler(name, case.original, tmp_path)
    out = case.stamped.pdf
    # stamped as it came, unless it had to be rewritten (and then on the rewrite whose hash it names)
    if name in pdf_producers.NEEDS_REWRITE:
        assert case.stamped.rewritten_sha256 and case.stamped.rewrite_reason, name
        assert not out.startswith(case.original)
    else:
        assert case.stamped.rewritten_sha256 is None and out.startswith(case.original), case.stamped.rewrite_reason

    assert pdfsig(name, out) == "Certificate is Trusted."

    verdict = signature_validation.verify(out, [pki.trust_anchor])
    (stamp,) = verdict.stamps
    assert stamp.ok and not stamp.findings, stamp.findings
    assert stamp.timestamp_trusted and signature_validation.pades_level(out) == "B-LT"

    judged = dss_reports[name]
    (sig,) = judged.signatures
    assert (sig.indication, sig.subindication, sig.format) == ("TOTAL_PASSED", None, "PAdES-BASELINE-LT"), judged.raw
    assert not judged.modifications, judged.raw

    assert _touched_beyond_one_signature_field(out) == []


def test_the_corpus_has_annotations_and_a_form_for_the_untouched_check(cases):
    """What makes the check above bite: files with annotations of several kinds and AcroForm fields."""
    import pikepdf

    with_form = with_annots = 0
    for case in cases.values():
        if not isinstance(case, Case):
            continue
        with pikepdf.open(io.BytesIO(case.original)) as pdf:
            with_form += len(pdf.Root.get("/AcroForm", {}).get("/Fields", [])) >= 2
            with_annots += len(pdf.pages[0].obj.get("/Annots", [])) >= 2
    assert with_form >= 2 and with_annots >= 3, (with_form, with_annots)


# --- the reported failure, through the platform's real worker path --------------------------------


async def test_the_pymupdf_letter_pyhanko_refused_is_stamped_by_the_platform(settings, pki):
    import httpx

    from tests.flows import auth, buy, post_stamp, stamp_finished, stamp_meta
    from tests.platform import PlatformProcess, add_channel

    letter = await asyncio.to_thread(pdf_producers.pymupdf_letter_generation_65536)
    s = settings.model_copy(update={"pades_level": Settings.model_fields["pades_level"].default,
                                    "signing_p12_path": ""})
    assert s.pades_level == "b-lt"
    proc = await PlatformProcess(s, BUBUH_TRUST_ROOTS=str(pki.trust_anchor)).start()
    try:
        channel = add_channel(s)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=60) as api:
            await buy(api, channel, "pymupdf", 1)
            r = await post_stamp(api, channel, letter, stamp_meta("pymupdf"))
            assert r.status_code == 202, r.text
            done = await stamp_finished(api, channel, r.json()["request_id"])
            assert done["status"] == "completed", done
            assert done["document_sha256"] == hashlib.sha256(letter).hexdigest()
            rewritten = done["rewritten_sha256"]
            pdf = (await api.get(f"/v1/stamps/{r.json()['request_id']}/document", headers=auth(channel))).content
            verdict = (await api.post("/v1/verify", files={"file": ("x.pdf", pdf, "application/pdf")})).json()
            assert verdict["valid"] is True, verdict
        # the stamped file starts with the rewrite the request names (qpdf's rewrite is deterministic)
        rewrite = repair.rewrite(letter, "the same rewrite").data
        assert hashlib.sha256(rewrite).hexdigest() == rewritten and pdf.startswith(rewrite)
    finally:
        await proc.stop()
