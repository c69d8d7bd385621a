import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.serialization import pkcs12

from services.stamping.signing import dev_ca, signing_key


def _verify(cert_der: bytes, signature: bytes, data: bytes):
    public = x509.load_der_x509_certificate(cert_der).public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("key_type, algorithm", [("rsa2048", "rsa"), ("p256", "ec")])
def test_dev_ca_files(dev_cas, key_type, algorithm):
    ca = dev_cas[key_type]
    raw = ca.p12_path.read_bytes()
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(raw, b"wrong password")
    key, cert, chain = pkcs12.load_key_and_certificates(raw, ca.password.encode())
    root = x509.load_pem_x509_certificate(ca.ca_cert_pem.read_bytes())
    assert [c.subject for c in chain] == [root.subject]
    assert cert.issuer == root.subject
    cert.verify_directly_issued_by(root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment
    loaded = signing_key.load_pkcs12(ca.p12_path, ca.password)
    assert loaded.algorithm == algorithm
    _verify(loaded.signing_cert.dump(), loaded.sign_raw(b"data", "sha256"), b"data")


def test_pkcs12_is_opened_once_per_process(dev_ca_rsa):
    assert signing_key.load_pkcs12(dev_ca_rsa.p12_path, dev_ca_rsa.password) is signing_key.load_pkcs12(
        str(dev_ca_rsa.p12_path), dev_ca_rsa.password)


def test_unknown_key_type(tmp_path):
    with pytest.raises(ValueError):
        dev_ca.dev_ca(tmp_path, "rsa1024")


def test_pkcs11_signer_from_softhsm(softhsm_token, dev_ca_rsa):
    key = signing_key.open_pkcs11(softhsm_token.module_path, softhsm_token.token_label, softhsm_token.pin,
                           softhsm_token.key_label)
    assert key is signing_key.open_pkcs11(softhsm_token.module_path, softhsm_token.token_label, softhsm_token.pin,
                                   softhsm_token.key_label)  # one session per process
    assert key.algorithm == "rsa"
    issuer = signing_key.load_pkcs12(dev_ca_rsa.p12_path, dev_ca_rsa.password)
    assert key.signing_cert.dump() == issuer.signing_cert.dump()
    assert [c.dump() for c in key.chain] == [c.dump() for c in issuer.chain]
    _verify(key.signing_cert.dump(), key.sign_raw(b"stamp me", "sha256"), b"stamp me")
