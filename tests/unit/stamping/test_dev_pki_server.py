"""The test PKI's spliced time-stamp tokens (services/stamping/signing/dev_pki_server.py) against the
tokens certomancer makes itself: the same fields, and a signature that verifies, for any request."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta

import pytest
from asn1crypto import core, tsp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from services.stamping.signing import dev_pki, dev_pki_server


@pytest.fixture(scope="module")
def stampers(tmp_path_factory):
    pki = dev_pki.generate(tmp_path_factory.mktemp("pki"), 9)
    arch = dev_pki.load_arch(pki)
    out = {}
    for tsa in arch.service_registry.list_time_stamping_services():
        slow = arch.service_registry.summon_timestamper(tsa.label)
        out[tsa.label] = (slow, dev_pki_server.FastTimeStamper(slow))
    return out


def _request(nonce: int | None, digest: bytes = b"\x01" * 32, cert_req: bool = True) -> tsp.TimeStampReq:
    fields = {"version": 1, "message_imprint": {"hash_algorithm": {"algorithm": "sha256"}, "hashed_message": digest},
              "cert_req": cert_req}
    if nonce is not None:
        fields["nonce"] = nonce
    return tsp.TimeStampReq(fields)


def _without_moments(token: dict) -> dict:
    """The token's TSTInfo and signer info as native values, less what differs between any two tokens."""
    signed = token["content"]
    info = signed["encap_content_info"]["content"].parsed.native
    del info["serial_number"], info["gen_time"]
    signer = signed["signer_infos"][0].native
    attrs = {a["type"]: a["values"] for a in signer.pop("signed_attrs")}
    del attrs["signing_time"], attrs["message_digest"]
    del signer["signature"]
    return {"version": signed["version"].native, "digest_algorithms": signed["digest_algorithms"].native,
            "content_type": signed["encap_content_info"]["content_type"].native,
            "certificates": sorted(c.chosen.dump() for c in signed["certificates"]),
            "tst_info": info, "signer": signer, "attrs": attrs}


@pytest.mark.parametrize("label", ["tsa", "tsa-archive"])
@pytest.mark.parametrize("nonce", [None, 7, 2**64 + 5])
def test_a_spliced_token_is_certomancers_token_but_for_time_serial_and_signature(stampers, label, nonce):
    slow, fast = stampers[label]
    digest = hashlib.sha256(os.urandom(8)).digest()
    expected = slow.request_tsa_response(_request(nonce, digest))
    before = datetime.now(UTC).replace(microsecond=0)
    raw = fast.respond(_request(nonce, digest).dump())
    got = tsp.TimeStampResp.load(raw, strict=True)
    assert got.dump(force=True) == raw                  # DER: re-encoding changes nothing
    assert got["status"].native == expected["status"].native
    assert _without_moments(got["time_stamp_token"]) == _without_moments(expected["time_stamp_token"])

    token = got["time_stamp_token"]["content"]
    info = token["encap_content_info"]["content"].parsed
    assert info["message_imprint"]["hashed_message"].native == digest
    assert info["nonce"].native == nonce
    assert before <= info["gen_time"].native <= datetime.now(UTC) + timedelta(seconds=1)
    signer = token["signer_infos"][0]
    attrs = {a["type"].native: a["values"][0] for a in signer["signed_attrs"]}
    assert attrs["message_digest"].native == hashlib.sha256(info.dump()).digest()
    assert attrs["signing_time"].native == info["gen_time"].native.replace(microsecond=0)
    tsa_cert = next(c.chosen for c in token["certificates"]
                    if c.chosen.serial_number == signer["sid"].chosen["serial_number"].native)
    as_set = b"\x31" + signer["signed_attrs"].dump()[1:]   # signed as a SET, embedded as [0] IMPLICIT
    x509.load_der_x509_certificate(tsa_cert.dump()).public_key().verify(
        signer["signature"].native, as_set, padding.PKCS1v15(), hashes.SHA256())


def test_serials_differ_and_a_non_request_is_refused(stampers):
    _, fast = stampers["tsa"]
    serials = {tsp.TimeStampResp.load(fast.respond(_request(1).dump()))["time_stamp_token"]["content"][
        "encap_content_info"]["content"].parsed["serial_number"].native for _ in range(20)}
    assert len(serials) == 20
    for junk in (b"", b"not der", core.Integer(5).dump(), _request(1).dump()[:-3]):
        with pytest.raises(ValueError):
            fast.respond(junk)
