"""Opening the key a worker signs with: a PKCS#12 file (development, tests, benchmarks) or an HSM key
through PKCS#11 (production), behind one ``SigningKey`` interface so the engine does not know which.

Why apart from the engine: key material has a lifecycle (generated once, opened once per process,
never written by the worker) unrelated to stamping a document. ``load_pkcs12`` and ``open_pkcs11``
memoise per process: opening a PKCS#12 costs a key derivation (PBKDF with many iterations) and an
HSM login costs a round trip, both far more than one RSA signature. A PKCS#11 session does one
operation at a time, so each worker process owns exactly one session and a lock guards it against
accidental use from a second thread.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from services.kernel import logs

log = logs.get(__name__)


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


def to_asn1_cert(cert: x509.Certificate) -> asn1_x509.Certificate:
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


def read_pkcs12(data: bytes, password: str | bytes | None) -> Pkcs12Key:
    pw = password.encode() if isinstance(password, str) else password
    key, cert, others = pkcs12.load_key_and_certificates(data, pw)
    if key is None or cert is None:
        raise ValueError("the PKCS#12 file holds no key and certificate")
    algorithm = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ec"
    if algorithm == "ec" and not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return Pkcs12Key(key, to_asn1_cert(cert), tuple(to_asn1_cert(c) for c in others), algorithm)


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
            cached = _P12_CACHE[cache_key] = read_pkcs12(p.read_bytes(), password)
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
            key = _P11_CACHE[cache_key] = _open_with_retries(module_path, token_label, pin, key_label, cert_label)
        return key


# Opening the token is retried, with the module re-initialised in between, for a few seconds at most.
# Why: a module can answer from the state it read at C_Initialize. SoftHSM2's file store, for one,
# rewrites token.object on every login, and a process that reads the token while another logs in
# lists no token (NoSuchToken) or fails with GeneralError, and keeps that answer until it is
# re-initialised. With two signing children starting at once this happened in CI; 8 processes
# opening one token together hit it in 39 of 320 opens, with the retry in none
# (tests/integration/test_stamping_keys.py). A wrong or locked PIN is never retried: each retry
# would count against the token's PIN tries.
OPEN_ATTEMPTS = 6
_OPEN_PAUSE_S = 0.1
_PIN_ERRORS = ("PinIncorrect", "PinInvalid", "PinLenRange", "PinLocked", "PinExpired")


def _open_with_retries(module_path: str, token_label: str, pin: str, key_label: str,
                       cert_label: str | None) -> Pkcs11Key:
    from pkcs11.exceptions import PKCS11Error  # pyHanko's "no token matching" is this class too
    from pyhanko.sign.pkcs11 import p11_lib

    attempt = 1
    while True:
        try:
            return Pkcs11Key(module_path, token_label, pin, key_label, cert_label)
        except PKCS11Error as exc:
            if attempt == OPEN_ATTEMPTS or type(exc).__name__ in _PIN_ERRORS:
                raise
            log.warning("signing_token_open_retried", attempt=attempt, of=OPEN_ATTEMPTS, error=repr(exc)[:200])
        time.sleep(_OPEN_PAUSE_S * attempt)
        attempt += 1
        try:
            p11_lib(module_path).reinitialize()  # C_Finalize, C_Initialize: the tokens are read afresh
        except PKCS11Error:
            pass


def forget_pkcs11(module_path: str, token_label: str, key_label: str) -> None:
    """Drop the cached session (after a token error) so the next call logs in afresh."""
    with _P11_LOCK:
        key = _P11_CACHE.pop((module_path, token_label, key_label), None)
    if key is not None:
        key.close()

