"""ETSI revocation semantics (issue 13): a certificate revoked after a trusted time-stamp leaves the stamp
valid; revoked before it, the stamp is not. Our verifier and the EU DSS library judge the same files.

A throwaway copy of the dev PKI (``dev_pki.generate`` in a temporary directory, nothing served) whose
second signer is revoked 30 minutes ago. certomancer's Python API plays its services at chosen times:
its TSA stamps "as of" a time (pyHanko's ``DummyTimeStamper`` with the TSA's key and a fixed genTime),
its OCSP responder and CRL repositories answer "as of" a time. So one certificate gives both cases:

* revoked after: the stamp is time-stamped two hours ago and carries the data of that moment (good),
  as our engine's B-LT output does; a later DSS update adds the data of a minute ago (revoked).
* revoked before: the stamp is time-stamped ten minutes ago (after the revocation) with the data of
  that moment (revoked), which our engine would refuse to produce (SIGNING_CERT_REVOKED) but another
  signer holding the key could.

The stamp itself is our engine's (B-T, with that time-stamper); the DSS updates are pyHanko's
``DocumentSecurityStore.add_dss``, as the engine writes them. No clock is frozen: every time is in the past.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json

import pytest
from asn1crypto import ocsp as asn1_ocsp

from loadtests import corpus
from services.operator import dss_validator as dss
from services.stamping import public_verifier
from services.stamping.document import signature_validation
from services.stamping.serial import SerialIssuer
from services.stamping.signing import dev_pki
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.request import StampRequest

ISSUER = SerialIssuer(82)
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
REVOKED_AT = NOW - dt.timedelta(minutes=30)


@pytest.fixture(scope="module")
def throwaway(tmp_path_factory):
    """The dev PKI's description with the second signer revoked at REVOKED_AT; port 9 is never asked."""
    pki = dev_pki.generate(tmp_path_factory.mktemp("pki"), 9)
    config = json.loads(pki.config.read_text())
    certs = config["pki-architectures"][dev_pki.ARCH]["certs"]
    certs["signer-revoked"]["revocation"]["revoked-since"] = REVOKED_AT.strftime("%Y-%m-%dT%H:%M:%S+0000")
    pki.config.write_text(json.dumps(config))
    return pki, dev_pki.load_arch(pki)


def _ocsp(arch, at: dt.datetime) -> asn1_ocsp.OCSPResponse:
    signer, issuer = arch.get_cert("signer-revoked"), arch.get_cert("issuing")
    cert_id = asn1_ocsp.CertId({"hash_algorithm": {"algorithm": "sha1"}, "issuer_name_hash": issuer.subject.sha1,
                                "issuer_key_hash": issuer.public_key.sha1, "serial_number": signer.serial_number})
    request = asn1_ocsp.OCSPRequest({"tbs_request": {"request_list": [{"req_cert": cert_id}]}})
    return arch.service_registry.summon_responder("issuing", at).build_ocsp_response(request)


def _with_validation_data(pdf: bytes, arch, at: dt.datetime) -> bytes:
    """``pdf`` plus an incremental DSS update with the chains' OCSP response and CRLs as of ``at``."""
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation.dss import DocumentSecurityStore

    stamp = PdfFileReader(io.BytesIO(pdf)).embedded_regular_signatures[0]
    out = io.BytesIO(pdf)
    registry = arch.service_registry
    DocumentSecurityStore.add_dss(
        out, stamp.pkcs7_content, certs=[arch.get_cert(c) for c in ("root", "issuing", "ocsp", "tsa")],
        ocsps=[_ocsp(arch, at)], crls=[registry.get_crl("root", at), registry.get_crl("issuing", at)])
    return out.getvalue()


def _status_in(ocsp: asn1_ocsp.OCSPResponse) -> str:
    return ocsp.basic_ocsp_response["tbs_response_data"]["responses"][0]["cert_status"].name


def _stamp_at(throwaway, at: dt.datetime) -> bytes:
    """Our engine's B-T stamp time-stamped at ``at``, delivered with the validation data of that moment (B-LT)."""
    from pyhanko.sign.timestamps import DummyTimeStamper

    pki, arch = throwaway
    tsa = DummyTimeStamper(tsa_cert=arch.get_cert("tsa"), tsa_key=arch.key_set.get_private_key("tsa"),
                           certs_to_embed=[arch.get_cert("root")], fixed_dt=at)
    engine = StampingEngine(SignerConfig(p12_path=str(pki.revoked_signer_p12), p12_password=dev_pki.P12_PASSWORD,
                                         level="b-t"), "https://verify.bubuh.example", timestamper=tsa)
    try:
        out = engine.stamp(corpus.a4_text(1), StampRequest(sn=ISSUER.next(), page=1, box=(380, 40, 560, 140),
                                                           reason="Surat pernyataan", location="Jakarta"))
    finally:
        engine.close()
    return _with_validation_data(out, arch, at + dt.timedelta(seconds=30))


@pytest.fixture(scope="module")
def revoked_after(throwaway) -> tuple[bytes, bytes]:
    """(as delivered: good at the time-stamp two hours ago, the same file with the later data: revoked)."""
    _, arch = throwaway
    delivered = _stamp_at(throwaway, NOW - dt.timedelta(hours=2))
    assert _status_in(_ocsp(arch, NOW - dt.timedelta(hours=2))) == "good"
    later = NOW - dt.timedelta(minutes=1)
    assert _status_in(_ocsp(arch, later)) == "revoked"
    return delivered, _with_validation_data(delivered, arch, later)


@pytest.fixture(scope="module")
def revoked_before(throwaway) -> bytes:
    return _stamp_at(throwaway, NOW - dt.timedelta(minutes=10))


@pytest.fixture(scope="module")
def validator():
    try:
        dss.ensure()
    except dss.DssUnavailable as exc:
        pytest.skip(str(exc))


def _judged(pdf: bytes, delivered: bytes, throwaway) -> dict:
    pki, _ = throwaway
    report = signature_validation.verify(pdf, [pki.trust_anchor])
    (stamp,) = report.stamps
    issued = public_verifier.Issued("completed", hashlib.sha256(delivered).hexdigest(), NOW)
    return public_verifier.judge(report, {stamp.sn: [issued]})


def test_as_delivered_the_certificate_is_good_at_the_time_stamp(revoked_after, throwaway):
    delivered, _ = revoked_after
    answer = _judged(delivered, delivered, throwaway)
    assert answer["valid"] is True, answer
    (stamp,) = answer["stamps"]
    assert stamp["certificate_status"]["status"] == "good", stamp
    assert stamp["certificate_status"]["etsi_indication"] == "PASSED"
    assert stamp["timestamp"]["time"] == (NOW - dt.timedelta(hours=2)).isoformat()
    assert stamp["timestamp"]["tsa"].startswith("Common Name: Bubuh Dev Time-Stamp Authority")
    assert stamp["timestamp"]["trusted"] is True
    assert stamp["proof_of_existence"] == stamp["timestamp"]["time"]
    assert stamp["document_timestamp"] is None


def test_revoked_after_the_time_stamp_the_stamp_stays_valid(revoked_after, throwaway):
    delivered, with_revocation = revoked_after
    answer = _judged(with_revocation, delivered, throwaway)
    assert answer["valid"] is True, answer
    (stamp,) = answer["stamps"]
    status = stamp["certificate_status"]
    assert (status["status"], status["revoked_at"], status["revocation_reason"], status["ca_revoked"]) == \
        ("revoked", REVOKED_AT.isoformat(), "key_compromise", False), status
    assert status["etsi_indication"] == "PASSED"
    t0 = (NOW - dt.timedelta(hours=2)).isoformat()
    assert stamp["proof_of_existence"] == t0
    assert status["detail"] == f"the signing certificate was revoked at {REVOKED_AT.isoformat()}, after the " \
                               f"time-stamp at {t0}: the stamp stays valid"


def test_revoked_before_the_time_stamp_the_stamp_is_not_valid(revoked_before, throwaway):
    answer = _judged(revoked_before, revoked_before, throwaway)
    assert answer["valid"] is False and answer["code"] == "CERT_REVOKED", answer
    (stamp,) = answer["stamps"]
    assert stamp["signature_valid"] and stamp["trusted"] and stamp["hash_matches_issued"]
    status = stamp["certificate_status"]
    assert (status["status"], status["revoked_at"]) == ("revoked", REVOKED_AT.isoformat()), status
    assert status["etsi_indication"] == "INDETERMINATE/REVOKED_NO_POE"
    (reason,) = stamp["reasons"]
    assert f"revoked at {REVOKED_AT.isoformat()} (key_compromise), before the signature time-stamp at " \
           f"{(NOW - dt.timedelta(minutes=10)).isoformat()}" in reason["detail"], reason


def test_dss_agrees_revoked_after_passes_revoked_before_does_not(revoked_after, revoked_before, throwaway,
                                                               validator):
    """DSS 6.x, default policy, offline: what ETSI EN 319 102-1 § 5.5 says for a signature with time."""
    pki, _ = throwaway
    _, with_revocation = revoked_after
    judged_after, judged_before = dss.validate_many([with_revocation, revoked_before], pki.trust_anchor)
    (after,) = judged_after.signatures
    assert (after.indication, after.subindication, after.format) == \
        ("TOTAL_PASSED", None, "PAdES-BASELINE-LT"), after
    (before,) = judged_before.signatures
    assert (before.indication, before.subindication) == ("INDETERMINATE", "REVOKED_NO_POE"), before
    assert "The certificate is revoked!" in before.errors
    assert "The revocation time is not after best-signature-time!" in before.errors


def test_verification_fetches_nothing_the_file_names(revoked_after, throwaway, monkeypatch):
    """The certificates name OCSP and CRL addresses (here 127.0.0.1:9); a verifier of uploads must not call
    what a hostile file names: pyHanko's fetchers are never even set up."""
    from pyhanko_certvalidator.fetchers.aiohttp_fetchers import AIOHttpFetcherBackend
    from pyhanko_certvalidator.fetchers.requests_fetchers import RequestsFetcherBackend

    asked = []
    for backend in (AIOHttpFetcherBackend, RequestsFetcherBackend):
        original = backend.get_fetchers
        monkeypatch.setattr(backend, "get_fetchers", lambda self, _o=original: asked.append(self) or _o(self))
    _, with_revocation = revoked_after
    pki, _ = throwaway
    (stamp,) = signature_validation.verify(with_revocation, [pki.trust_anchor]).stamps
    assert stamp.certificate_status.status == "revoked" and stamp.ok
    assert asked == []
