"""Property: for any one-page document and placement, the engine and pyHanko's default path agree.

Both outputs must validate (pyHanko's validator and poppler's pdfsig), show the same stamp
text (read from each stamp's own appearance stream) and carry the same QR payload (decoded
from the rendered page). The engine's speed comes from shortcuts; this is the test that
catches a shortcut that changes what a person or a verifier sees.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtests import corpus
from services.kernel.document_profiles import A4_PT
from services.stamping.document.appearance import STAMP_TEXT_LINES, verification_url
from services.stamping.document.inspection import inspect
from services.stamping.document.signature_validation import verify
from services.stamping.serial import SerialIssuer
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.reference import stamp_reference
from services.stamping.signing.request import StampRequest
from tests.unit.stamping.conftest import VERIFY_BASE, appearance_text, assert_pdfsig_ok

ISSUER = SerialIssuer(79)
_ENGINES: dict = {}


@st.composite
def documents_and_placements(draw):
    landscape = draw(st.booleans())
    width, height = (A4_PT[1], A4_PT[0]) if landscape else A4_PT
    doc = dict(seed=draw(st.integers(0, 10_000)), object_streams=draw(st.booleans()),
               version=draw(st.sampled_from(["1.6", "1.7"])), page_size=(width, height),
               lines=draw(st.integers(0, 45)))
    # big enough for a QR code that a phone (and zbar at 150 dpi) can read
    w = draw(st.floats(150, 260))
    h = draw(st.floats(70, 120))
    llx = draw(st.floats(0, width - w))
    lly = draw(st.floats(0, height - h))
    return doc, (round(llx, 2), round(lly, 2), min(round(llx + w, 2), width), min(round(lly + h, 2), height))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=documents_and_placements())
def test_engine_and_reference_agree(case, dev_ca_rsa, pdfsig, read_stamp):
    doc_args, box = case
    data = corpus.a4_text(**doc_args)
    inspect(data, "cpns", 1, box)  # a request intake would accept
    engine = _ENGINES.get("rsa")
    if engine is None:
        engine = _ENGINES["rsa"] = StampingEngine(
            SignerConfig(p12_path=str(dev_ca_rsa.p12_path), p12_password=dev_ca_rsa.password), VERIFY_BASE)

    url_of = {}
    texts = {}
    for path in ("engine", "reference"):
        req = StampRequest(ISSUER.next(), 1, box, reason="Uji properti")
        if path == "engine":
            out = engine.stamp(data, req)
        else:
            out = stamp_reference(data, req, dev_ca_rsa.p12_path, dev_ca_rsa.password, VERIFY_BASE)
        (sig,) = verify(out, [dev_ca_rsa.ca_cert_pem]).signatures
        assert sig.ok and sig.covers_entire_file and sig.sn == req.sn, (path, sig.summary)
        assert_pdfsig_ok(pdfsig(out))
        # the same words, with this request's SN in its place
        texts[path] = [line.replace(req.sn, "<SN>") for line in appearance_text(out, req.field_name)]
        _, qr = read_stamp(out, 1, box)
        assert qr == [verification_url(VERIFY_BASE, req.sn)], path
        url_of[path] = qr[0].replace(req.sn, "<SN>")

    assert texts["engine"] == texts["reference"] == [*STAMP_TEXT_LINES, "<SN>"]
    assert url_of["engine"] == url_of["reference"]
