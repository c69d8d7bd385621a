"""The development CA: a throw-away root CA and issuer certificate, so a fresh checkout signs end to end.

Made by ``bubuh keys`` (and by test fixtures); nothing it writes is ever committed: put it under a tmp
dir or ``.local/``. Production keys come from an HSM (``signing_key.open_pkcs11``), never from here.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

KEY_TYPES = ("rsa2048", "p256")
DEV_P12_PASSWORD = "bubuh-dev"


@dataclass(frozen=True)
class DevCA:
    """Where ``dev_ca`` wrote its files."""

    key_type: str
    p12_path: Path  # issuer key + issuer cert + CA cert, password protected
    password: str
    ca_cert_pem: Path  # the trust anchor validators are given
    issuer_cert_pem: Path


def _new_key(key_type: str):
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key type {key_type!r}; expected one of {KEY_TYPES}")


def _name(organisation: str, common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "ID"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _certificate(subject: x509.Name, public_key, issuer: x509.Name, issuer_key, *, days: int,
                 ca: bool) -> x509.Certificate:
    """A CA certificate (signs certificates and CRLs) or a leaf (digitalSignature + nonRepudiation)."""
    now = _dt.datetime.now(_dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=not ca, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if not ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificate_pair(
    key_type: str = "rsa2048",
    ca_name: str = "Bubuh Dev Root CA",
    subject_name: str = "Bubuh Dev e-Meterai Issuer",
    organisation: str = "Bubuh Development (NOT FOR PRODUCTION)",
):
    """Generate (ca_key, ca_cert, leaf_key, leaf_cert) in memory (cryptography objects).

    The leaf carries digitalSignature + nonRepudiation and no extended key usage:
    pyHanko's default signer key-usage policy asks for non-repudiation, and NSS
    (pdfsig) rejects an EKU that lacks emailProtection, so none is the portable choice.
    """
    ca_key = _new_key(key_type)
    ca_subject = _name(organisation, ca_name)
    ca_cert = _certificate(ca_subject, ca_key.public_key(), ca_subject, ca_key, days=3650, ca=True)
    leaf_key = _new_key(key_type)
    leaf_cert = _certificate(_name(organisation, subject_name), leaf_key.public_key(), ca_subject, ca_key,
                             days=730, ca=False)
    return ca_key, ca_cert, leaf_key, leaf_cert


def dev_ca(out_dir: str | os.PathLike, key_type: str = "rsa2048", password: str = DEV_P12_PASSWORD) -> DevCA:
    """Write a fresh test root CA and issuer identity into ``out_dir``.

    Files: ``issuer-<key>.p12`` (issuer key, issuer cert, CA cert; ``password``),
    ``ca-<key>.pem`` (the trust anchor) and ``issuer-<key>.pem``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _ca_key, ca_cert, leaf_key, leaf_cert = make_certificate_pair(key_type)
    p12 = pkcs12.serialize_key_and_certificates(
        name=b"bubuh-issuer",
        key=leaf_key,
        cert=leaf_cert,
        cas=[ca_cert],
        encryption_algorithm=serialization.BestAvailableEncryption(password.encode()),
    )
    p12_path = out / f"issuer-{key_type}.p12"
    ca_pem = out / f"ca-{key_type}.pem"
    leaf_pem = out / f"issuer-{key_type}.pem"
    p12_path.write_bytes(p12)
    os.chmod(p12_path, 0o600)
    ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    leaf_pem.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    return DevCA(key_type, p12_path, password, ca_pem, leaf_pem)
