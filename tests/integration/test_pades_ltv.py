"""PAdES B-LT and B-LTA against the local test PKI the stack serves (deploy/local/pki.sh): real CRLs,
a real OCSP responder and a real RFC 3161 TSA on 127.0.0.1, certificates that name them."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import urllib.request

import pytest
from asn1crypto import crl as asn1_crl
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import pem
from asn1crypto import x509 as asn1_x509

from loadtests import corpus
from services.kernel import errors
from services.kernel.errors import BubuhError
from services.kernel.settings import Settings
from services.stamping import archive
from services.stamping.document import signature_validation
from services.stamping.serial import SerialIssuer
from services.stamping.signing import dev_pki, signing_key
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.request import StampRequest

BOX = (380.0, 40.0, 560.0, 140.0)
ISSUER = SerialIssuer(79)


@pytest.fixture(scope="module")
def anchor(pki) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(pem.unarmor(pki.trust_anchor.read_bytes())[2])


def engine(pki, level: str, p12=None, **kw) -> StampingEngine:
    return StampingEngine(SignerConfig(p12_path=str(p12 or pki.signer_p12), p12_password=dev_pki.P12_PASSWORD,
                                       tsa_url=pki.tsa_url, level=level, **kw), "https://verify.bubuh.example")


def request() -> StampRequest:
    return StampRequest(sn=ISSUER.next(), page=1, box=BOX, reason="Surat pernyataan", location="Jakarta")


def _get(url: str, body: bytes | None = None, ctype: str = "") -> bytes:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype} if ctype else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()


def _ocsp_status(pki, label: str) -> str:
    signer = signing_key.load_pkcs12(pki.root / f"{label}.p12", dev_pki.P12_PASSWORD)
    issuer = next(c for c in signer.chain if c.subject == signer.signing_cert.issuer)
    cert_id = asn1_ocsp.CertId({
        "hash_algorithm": {"algorithm": "sha1"},
        "issuer_name_hash": issuer.subject.sha1, "issuer_key_hash": issuer.public_key.sha1,
        "serial_number": signer.signing_cert.serial_number})
    req = asn1_ocsp.OCSPRequest({"tbs_request": {"request_list": [{"req_cert": cert_id}]}})
    url = signer.signing_cert.ocsp_urls[0]
    resp = asn1_ocsp.OCSPResponse.load(_get(url, req.dump(), "application/ocsp-request"))
    assert resp["response_status"].native == "successful"
    return resp.basic_ocsp_response["tbs_response_data"]["responses"][0]["cert_status"].name


def test_the_stack_serves_crls_ocsp_and_a_tsa_named_by_the_certificates(pki, anchor):
    signer = signing_key.load_pkcs12(pki.signer_p12, dev_pki.P12_PASSWORD)
    cert = signer.signing_cert
    assert cert.ocsp_urls == [pki.ocsp_url]
    assert cert.crl_distribution_points[0].url == pki.crl_url("issuing")
    assert all(u.startswith("http://127.0.0.1:") for u in cert.ocsp_urls + [pki.tsa_url])
    # issuing CA <- root, root is the one trust anchor
    issuing = next(c for c in signer.chain if c.subject == cert.issuer)
    assert issuing.issuer == anchor.subject and anchor.self_signed == "maybe"
    root_crl = asn1_crl.CertificateList.load(_get(pki.crl_url("root")))
    assert root_crl.issuer == anchor.subject and root_crl["tbs_cert_list"]["next_update"].native is not None
    assert _ocsp_status(pki, "signer") == "good"
    assert _ocsp_status(pki, "signer-revoked") == "revoked"


def _dss(out: bytes):
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation.dss import DocumentSecurityStore

    return DocumentSecurityStore.read_dss(PdfFileReader(io.BytesIO(out)))


def _validate_offline(out: bytes, anchor, index: int = 0):
    """pyHanko with no network and revocation required: the DSS alone must carry what is needed."""
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import async_validate_pdf_signature
    reader = PdfFileReader(io.BytesIO(out))
    vc = _dss(out).as_validation_context(dict(trust_roots=[anchor], allow_fetching=False,
                                               revocation_mode="require"))
    sig = reader.embedded_regular_signatures[index]
    return asyncio.run(async_validate_pdf_signature(sig, signer_validation_context=vc, ts_validation_context=vc))


def test_b_lt_stamp_carries_the_chains_validation_data_after_the_signature(pki, anchor):
    eng = engine(pki, "b-lt")
    try:
        data = corpus.a4_text(2)
        out = eng.stamp(data, request())
    finally:
        eng.close()
    assert out.startswith(data)
    assert signature_validation.pades_level(out) == "B-LT"
    dss = _dss(out)
    names = {c.subject.native["common_name"] for c in dss.load_certs()}
    assert {"Bubuh Dev e-Meterai Issuer", "Bubuh Dev Issuing CA", "Bubuh Dev Time-Stamp Authority"} <= names
    assert len(dss.ocsps) >= 1 and len(dss.crls) >= 1
    status = _validate_offline(out, anchor)
    assert status.bottom_line, status.pretty_print_details()
    assert status.timestamp_validity is not None and status.timestamp_validity.trusted
    # our own verification accepts a DSS after the stamp (issue 9's policy)
    report = signature_validation.verify(out, [pki.trust_anchor])
    (stamp,) = report.stamps
    assert stamp.ok and not stamp.findings, stamp.findings
    assert stamp.timestamp_trusted
    # ETSI validation with time on the DSS it carries: good, proven to exist at the signature time-stamp
    assert (stamp.certificate_status.status, stamp.certificate_status.indication) == ("good", "PASSED")
    assert stamp.timestamp.tsa.startswith("Common Name: Bubuh Dev Time-Stamp Authority") and stamp.timestamp.trusted
    assert stamp.proof_of_existence == stamp.timestamp.time == stamp.timestamp_time
    assert stamp.document_timestamp is None


def test_revocation_data_is_fetched_once_per_validity_period_not_per_stamp(pki):
    eng = engine(pki, "b-lt")
    try:
        eng.stamp(corpus.a4_text(1), request())
        before = eng.validation.fetches
        outs = [eng.stamp(corpus.a4_text(1), request()) for _ in range(5)]
    finally:
        eng.close()
    assert eng.validation.fetches == before
    assert all(len(_dss(o).ocsps) >= 1 for o in outs)


def test_b_lta_adds_a_document_time_stamp_over_signature_and_dss(pki, anchor):
    from pyhanko.pdf_utils.reader import PdfFileReader

    eng = engine(pki, "b-lta")
    try:
        out = eng.stamp(corpus.a4_text(2), request())
    finally:
        eng.close()
    reader = PdfFileReader(io.BytesIO(out))
    kinds = [s.sig_object_type for s in reader.embedded_signatures]
    assert kinds == ["/Sig", "/DocTimeStamp"]
    assert signature_validation.pades_level(out) == "B-LTA"
    assert _validate_offline(out, anchor).bottom_line
    (stamp,) = signature_validation.verify(out, [pki.trust_anchor]).stamps
    assert stamp.ok and not stamp.findings, stamp.findings
    assert stamp.certificate_status.status == "good"
    doc_ts = stamp.document_timestamp
    assert doc_ts is not None and doc_ts.trusted and doc_ts.tsa == stamp.timestamp.tsa
    assert doc_ts.time >= stamp.timestamp.time


def test_renewing_the_archive_time_stamp_adds_one_over_the_last_ones_validation_data(pki, anchor):
    from pyhanko.pdf_utils.reader import PdfFileReader

    eng = engine(pki, "b-lta")
    try:
        out = eng.stamp(corpus.a4_text(2), request())
    finally:
        eng.close()
    expires = archive.last_timestamp_expiry(out)
    assert expires is not None and expires > dt.datetime.now(dt.UTC)
    renewed = asyncio.run(archive.renew(out, pki.tsa_url, [pki.trust_anchor]))
    assert renewed.startswith(out)
    reader = PdfFileReader(io.BytesIO(renewed))
    assert [s.sig_object_type for s in reader.embedded_signatures] == ["/Sig", "/DocTimeStamp", "/DocTimeStamp"]
    assert _validate_offline(renewed, anchor).bottom_line
    (stamp,) = signature_validation.verify(renewed, [pki.trust_anchor]).stamps
    assert stamp.ok and not stamp.findings, stamp.findings
    (before,) = signature_validation.verify(out, [pki.trust_anchor]).stamps
    assert stamp.document_timestamp.trusted and stamp.document_timestamp.time >= before.document_timestamp.time
    import hashlib
    assert hashlib.sha256(out).hexdigest() in stamp.later_revision_sha256s  # the delivered file is a prefix


def test_a_revoked_signing_certificate_stops_stamping_before_any_time_stamp(pki):
    eng = engine(pki, "b-lt", p12=pki.revoked_signer_p12)
    try:
        with pytest.raises(BubuhError) as caught:
            eng.stamp(corpus.a4_text(1), request())
    finally:
        eng.close()
    assert caught.value.code is errors.SIGNING_CERT_REVOKED
    assert eng._tsa_certs == ()  # no time-stamp was spent on it


def test_unreachable_revocation_data_is_retryable_never_a_lower_level(pki, tmp_path):
    # a PKI whose certificates name a port nothing serves; the TSA is the stack's
    closed = dev_pki.generate(tmp_path / "pki", _closed_port())
    eng = engine(pki, "b-lt", p12=closed.signer_p12, revocation_timeout_s=1.0)
    try:
        with pytest.raises(BubuhError) as caught:
            eng.stamp(corpus.a4_text(1), request())
    finally:
        eng.close()
    assert caught.value.code is errors.VALIDATION_DATA_UNAVAILABLE and caught.value.code.retryable


def test_a_level_above_b_b_without_a_tsa_is_refused_at_start(pki):
    with pytest.raises(ValueError, match="time-stamp authority"):
        StampingEngine(SignerConfig(p12_path=str(pki.signer_p12), p12_password=dev_pki.P12_PASSWORD,
                                    level="b-lt"), "https://verify.bubuh.example")


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the platform: B-LT by default, a revoked key stops stamping -----------------------------------


def _platform_defaults(settings):
    """The test's isolated settings with the platform's own signing defaults (B-LT, the PKI's signer
    and TSA) instead of the B-B the other tests pin."""
    return settings.model_copy(update={"pades_level": Settings.model_fields["pades_level"].default,
                                       "signing_p12_path": ""})


async def test_the_platform_stamps_at_b_lt_by_default(settings, pki, anchor):
    import httpx

    from tests.flows import auth, buy, post_stamp, stamp_finished, stamp_meta
    from tests.platform import PlatformProcess, add_channel

    s = _platform_defaults(settings)
    assert s.pades_level == "b-lt" and s.signing_tsa_url == pki.tsa_url
    proc = await PlatformProcess(s, BUBUH_TRUST_ROOTS=str(pki.trust_anchor)).start()
    try:
        channel = add_channel(s)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=60) as api:
            await buy(api, channel, "ltv", 1)
            r = await post_stamp(api, channel, corpus.a4_text(4), stamp_meta("ltv"))
            done = await stamp_finished(api, channel, r.json()["request_id"])
            assert done["status"] == "completed", done
            pdf = (await api.get(f"/v1/stamps/{r.json()['request_id']}/document", headers=auth(channel))).content
            verdict = (await api.post("/v1/verify", files={"file": ("x.pdf", pdf, "application/pdf")})).json()
            assert verdict["valid"] is True, verdict
            assert verdict["stamps"][0]["timestamp_trusted"] is True
            assert verdict["stamps"][0]["certificate_status"]["status"] == "good", verdict
            assert verdict["stamps"][0]["proof_of_existence"] == verdict["stamps"][0]["timestamped_at"]
            assert len(_dss(pdf).ocsps) >= 1
            assert await asyncio.to_thread(lambda: _validate_offline(pdf, anchor).bottom_line)

            # `bubuh renew-timestamps`: nothing due within a day; everything due within the TSA's lifetime
            s_roots = s.model_copy(update={"trust_roots": str(pki.trust_anchor)})
            assert not any(x.renewed for x in await archive.renew_stored(s_roots, 1))
            (renewal,) = [x for x in await archive.renew_stored(s_roots, 100_000)
                          if x.request_id == r.json()["request_id"]]
            assert renewal.renewed
            renewed = (await api.get(f"/v1/stamps/{r.json()['request_id']}/document", headers=auth(channel))).content
            assert renewed.startswith(pdf) and len(renewed) > len(pdf)
            again = (await api.post("/v1/verify", files={"file": ("x.pdf", renewed, "application/pdf")})).json()
            assert again["valid"] is True, again
            assert again["stamps"][0]["document_timestamp"]["trusted"] is True, again
    finally:
        await proc.stop()


async def test_a_revoked_signing_certificate_holds_every_stamp_and_raises_the_alert(settings, pki):
    import httpx

    from tests.flows import auth, buy, post_stamp, stamp_meta, wait_for
    from tests.platform import PlatformProcess, add_channel, free_port

    s = _platform_defaults(settings)
    metrics_port = free_port()
    front = await PlatformProcess(s, api="all", workers="purchase,quota", name="front").start()
    worker = await PlatformProcess(s, api="none", workers="stamping", name="revoked-worker",
                                   BUBUH_SIGNING_P12_PATH=str(pki.revoked_signer_p12),
                                   BUBUH_METRICS_PORT=str(metrics_port), BUBUH_STAMP_RETRY_BASE_S="60").start()
    try:
        channel = add_channel(s)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=60) as api:
            await buy(api, channel, "revoked", 2)
            rids = [(await post_stamp(api, channel, corpus.a4_text(2), stamp_meta("revoked"))).json()["request_id"]
                    for _ in range(2)]

            async def held():
                states = [(await api.get(f"/v1/stamps/{rid}", headers=auth(channel))).json() for rid in rids]
                return states if all(st.get("code") == "SIGNING_CERT_REVOKED" for st in states) else None
            states = await wait_for(held, timeout=60, what="both requests held for SIGNING_CERT_REVOKED")
            assert all(st["status"] not in ("completed", "failed") for st in states), states
            quota = (await api.get("/v1/accounts/revoked/quota", headers=auth(channel))).json()
            assert quota["pending"] == 2, quota  # units stay reserved: nothing refunded, nothing charged
        async with httpx.AsyncClient(timeout=10) as client:
            metrics = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert "bubuh_signing_certificate_revoked 1.0" in metrics
        assert 'bubuh_stamp_outcomes_total{code="SIGNING_FAILED"' not in metrics
    finally:
        await worker.stop()
        await front.stop()


@pytest.mark.parametrize("update, says", [
    ({"pades_level": "b-lt", "signing_tsa_url": ""}, "needs a time-stamp authority"),
    ({"pades_level": "b-x"}, "BUBUH_PADES_LEVEL"),
])
def test_a_level_the_settings_cannot_deliver_stops_the_worker_at_start(update, says):
    from services.stamping.service import signer_config

    with pytest.raises(Exception, match=says) as caught:
        signer_config(Settings().model_copy(update=update))
    assert type(caught.value).__name__ == "ConfigError"
