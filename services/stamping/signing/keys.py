"""Signing keys: the development CA, and opening the key a worker signs with.

Why this module exists apart from the engine: key material has a lifecycle
(generated once, opened once per process, never written by the worker) that is
unrelated to stamping a document, and it must be swappable between a PKCS#12
file (development, tests, benchmarks) and an HSM through PKCS#11 (production)
without the engine knowing which.

* ``dev_ca`` makes a throw-away root CA and an issuer certificate so that a
  fresh checkout can sign and validate end to end. Nothing it writes is ever
  committed; put it under a tmp dir or ``.local/``.
* ``load_pkcs12`` and ``open_pkcs11`` memoise per process: opening a PKCS#12
  costs a key-derivation (PBKDF with many iterations) and an HSM login costs a
  round trip, both far more than one RSA signature. A PKCS#11 session does one
  operation at a time, so each worker process owns exactly one session and a
  lock guards it against accidental use from a second thread.
* ``softhsm_import`` puts the dev key into a SoftHSM2 token so tests exercise
  the real PKCS#11 code path. Token initialisation uses ``softhsm2-util``
  (C_InitToken is not exposed by python-pkcs11); importing key and
  certificates uses python-pkcs11 ``create_object`` so the private key never
  touches the disk unencrypted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

KEY_TYPES = ("rsa2048", "p256")
DEV_P12_PASSWORD = "bubuh-dev"


# --------------------------------------------------------------------------------------------
# the development CA
# --------------------------------------------------------------------------------------------


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
    now = _dt.datetime.now(_dt.UTC)
    ca_key = _new_key(key_type)
    ca_subject = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "ID"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
        x509.NameAttribute(NameOID.COMMON_NAME, ca_name),
    ])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = _new_key(key_type)
    leaf_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "ID"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_name),
        ]))
        .issuer_name(ca_subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=730))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=True, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
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


# --------------------------------------------------------------------------------------------
# keys as the engine sees them
# --------------------------------------------------------------------------------------------


class SigningKey(Protocol):
    """What the stamping engine needs from a key, wherever it lives."""

    signing_cert: asn1_x509.Certificate
    chain: tuple[asn1_x509.Certificate, ...]  # other certificates to embed (CA, intermediates)
    algorithm: str  # 'rsa' or 'ec'

    def sign_raw(self, data: bytes, md_algorithm: str) -> bytes:
        """Sign ``data`` (hash-then-sign with ``md_algorithm``); DER for ECDSA."""
        ...

    def pyhanko_signer(self):
        """The equivalent pyHanko ``Signer`` (used by the reference path and tests)."""
        ...


def _to_asn1_cert(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


_PYCA_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


@dataclass
class Pkcs12Key:
    """A key held in process memory, loaded from a PKCS#12 file."""

    private_key: object  # cryptography private key
    signing_cert: asn1_x509.Certificate
    chain: tuple[asn1_x509.Certificate, ...]
    algorithm: str
    _signer: object | None = field(default=None, repr=False)

    def sign_raw(self, data: bytes, md_algorithm: str) -> bytes:
        h = _PYCA_HASHES[md_algorithm]()
        if self.algorithm == "rsa":
            return self.private_key.sign(data, padding.PKCS1v15(), h)
        return self.private_key.sign(data, ec.ECDSA(h))

    def pyhanko_signer(self):
        if self._signer is None:
            from pyhanko.sign.signers import SimpleSigner
            from pyhanko_certvalidator.registry import SimpleCertificateStore

            der = self.private_key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            self._signer = SimpleSigner(
                signing_cert=self.signing_cert,
                signing_key=asn1_keys.PrivateKeyInfo.load(der),
                cert_registry=SimpleCertificateStore.from_certs(list(self.chain)),
            )
        return self._signer


def _read_pkcs12(data: bytes, password: str | bytes | None) -> Pkcs12Key:
    pw = password.encode() if isinstance(password, str) else password
    key, cert, others = pkcs12.load_key_and_certificates(data, pw)
    if key is None or cert is None:
        raise ValueError("the PKCS#12 file holds no key and certificate")
    algorithm = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ec"
    if algorithm == "ec" and not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return Pkcs12Key(key, _to_asn1_cert(cert), tuple(_to_asn1_cert(c) for c in others), algorithm)


_P12_CACHE: dict[tuple[str, bytes], Pkcs12Key] = {}
_P12_LOCK = threading.Lock()


def load_pkcs12(path: str | os.PathLike, password: str | bytes | None) -> Pkcs12Key:
    """Open a PKCS#12 once per process (keyed by path, mtime and password digest)."""
    p = Path(path).resolve()
    pw = password.encode() if isinstance(password, str) else (password or b"")
    cache_key = (f"{p}:{p.stat().st_mtime_ns}", hashlib.sha256(pw).digest())
    with _P12_LOCK:
        cached = _P12_CACHE.get(cache_key)
        if cached is None:
            cached = _P12_CACHE[cache_key] = _read_pkcs12(p.read_bytes(), password)
        return cached


# --------------------------------------------------------------------------------------------
# PKCS#11
# --------------------------------------------------------------------------------------------


class Pkcs11Key:
    """A key inside a PKCS#11 token, reached through one session owned by this process.

    The session is pyHanko's (``open_pkcs11_session``) and the signing parameters come
    from pyHanko's ``PKCS11Signer``, so mechanism selection (and raw ECDSA for tokens
    such as SoftHSM2 that lack CKM_ECDSA_SHA256) stays pyHanko's responsibility.
    """

    def __init__(self, module_path: str, token_label: str, pin: str, key_label: str,
                 cert_label: str | None = None) -> None:
        from pyhanko.config.pkcs11 import TokenCriteria
        from pyhanko.sign.pkcs11 import PKCS11Signer, open_pkcs11_session

        self._lock = threading.Lock()
        self.session = open_pkcs11_session(
            module_path, token_criteria=TokenCriteria(label=token_label), user_pin=pin
        )
        probe = PKCS11Signer(self.session, cert_label=cert_label or key_label, key_label=key_label,
                             other_certs_to_pull=None)
        probe._load_objects()
        self.signing_cert: asn1_x509.Certificate = probe.signing_cert
        self.chain = tuple(
            c for c in probe.cert_registry if c.sha256 != self.signing_cert.sha256
        )
        self.algorithm = "rsa" if self.signing_cert.public_key.algorithm == "rsa" else "ec"
        self._signer = PKCS11Signer(
            self.session, signing_cert=self.signing_cert, ca_chain=list(self.chain),
            key_label=key_label, use_raw_mechanism=self.algorithm == "ec",
        )
        self._signer._load_objects()
        self._specs: dict[str, object] = {}

    def sign_raw(self, data: bytes, md_algorithm: str) -> bytes:
        spec = self._specs.get(md_algorithm)
        if spec is None:
            spec = self._specs[md_algorithm] = self._signer._select_pkcs11_signing_params(md_algorithm, {})
        if spec.pre_sign_transform is not None:
            data = spec.pre_sign_transform(data)
        with self._lock:
            signature = self._signer._key_handle.sign(data, **spec.sign_kwargs)
        if spec.post_sign_transform is not None:
            signature = spec.post_sign_transform(signature)
        return signature

    def pyhanko_signer(self):
        return self._signer

    def close(self) -> None:
        try:
            self.session.close()
        except Exception:  # noqa: BLE001 - closing a dead session
            pass


_P11_CACHE: dict[tuple[str, str, str], Pkcs11Key] = {}
_P11_LOCK = threading.Lock()


def open_pkcs11(module_path: str, token_label: str, pin: str, key_label: str,
                cert_label: str | None = None) -> Pkcs11Key:
    """Open (once per process) a session on the token and find the key and its certificate.

    The certificate is looked up by ``cert_label`` (default: the key label); every other
    certificate on the token is embedded as chain.
    """
    cache_key = (module_path, token_label, key_label)
    with _P11_LOCK:
        key = _P11_CACHE.get(cache_key)
        if key is None:
            key = _P11_CACHE[cache_key] = Pkcs11Key(module_path, token_label, pin, key_label, cert_label)
        return key


def forget_pkcs11(module_path: str, token_label: str, key_label: str) -> None:
    """Drop the cached session (after a token error) so the next call logs in afresh."""
    with _P11_LOCK:
        key = _P11_CACHE.pop((module_path, token_label, key_label), None)
    if key is not None:
        key.close()


SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def softhsm_module() -> str | None:
    """Path of the SoftHSM2 PKCS#11 module, or None when SoftHSM2 is not installed."""
    for candidate in SOFTHSM_MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class SoftHsmToken:
    conf_path: Path  # export SOFTHSM2_CONF=<this> before the module is first loaded
    module_path: str
    token_label: str
    pin: str
    key_label: str


def softhsm_import(
    token_dir: str | os.PathLike,
    p12_path: str | os.PathLike,
    p12_password: str,
    token_label: str = "bubuh-dev",
    pin: str = "1234",
    so_pin: str = "123456",
    key_label: str = "issuer",
) -> SoftHsmToken:
    """Initialise a SoftHSM2 token in ``token_dir`` and import the key and certs of a PKCS#12.

    Sets ``SOFTHSM2_CONF`` in this process's environment: SoftHSM2 reads it when the module
    is initialised, which python-pkcs11 does once per process, so call this before any
    other use of the module in the process (tests do it in a session fixture).
    The key and its certificate share ``key_label`` and CKA_ID 01; CA certificates get
    labels ``ca-1``, ``ca-2``...
    """
    import pkcs11
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.util.ec import decode_ec_private_key
    from pkcs11.util.rsa import decode_rsa_private_key

    module = softhsm_module()
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        raise RuntimeError("SoftHSM2 is not installed (Debian package softhsm2)")
    tdir = Path(token_dir).resolve()
    (tdir / "tokens").mkdir(parents=True, exist_ok=True)
    conf = tdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tdir / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    subprocess.run(
        [util, "--init-token", "--free", "--label", token_label, "--pin", pin, "--so-pin", so_pin],
        check=True, env=env, capture_output=True,
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)

    loaded = _read_pkcs12(Path(p12_path).read_bytes(), p12_password)
    lib = pkcs11.lib(module)
    try:
        lib.reinitialize()  # the module may have been loaded with an older SOFTHSM2_CONF
    except Exception:  # noqa: BLE001 - nothing to reinitialise on first load
        pass
    token = lib.get_token(token_label=token_label)
    with token.open(rw=True, user_pin=pin) as session:
        if loaded.algorithm == "rsa":
            der = loaded.private_key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            attrs = decode_rsa_private_key(der)
        else:
            der = loaded.private_key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            attrs = decode_ec_private_key(der)
        attrs.update({
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.LABEL: key_label, Attribute.ID: b"\x01",
            Attribute.SIGN: True,
        })
        session.create_object(attrs)
        for label, cid, cert in [(key_label, b"\x01", loaded.signing_cert)] + [
            (f"ca-{i}", bytes([i + 1]), c) for i, c in enumerate(loaded.chain, start=1)
        ]:
            session.create_object({
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                Attribute.TOKEN: True, Attribute.PRIVATE: False,
                Attribute.LABEL: label, Attribute.ID: cid,
                Attribute.SUBJECT: cert.subject.dump(),
                Attribute.ISSUER: cert.issuer.dump(),
                Attribute.SERIAL_NUMBER: cert["tbs_certificate"]["serial_number"].dump(),
                Attribute.VALUE: cert.dump(),
            })
    return SoftHsmToken(conf, module, token_label, pin, key_label)
