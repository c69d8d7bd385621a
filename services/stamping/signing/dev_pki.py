"""The development PKI: a root CA, an issuing CA, our signer, an OCSP responder, CRLs and a TSA.

Why: a stamp at PAdES B-LT carries the revocation data of its whole chain, so development and
tests need a PKI that behaves like a real one: certificates that name a CRL distribution point
and an OCSP responder, and services at those addresses. certomancer (by pyHanko's author) builds
such a PKI from a YAML description and serves its CRLs, OCSP and RFC 3161 time-stamps over HTTP
(its "Animator" WSGI app); writing our own responders would re-implement what it already gets
right (OCSP responder certificates with ocsp-nocheck, CRL update schedules, TSA tokens).

``generate`` writes everything under one directory (``.local/pki`` by default), nothing of it
committed: fresh keys (0600), the certomancer configuration that names them, our signer's
PKCS#12, and ``trust-anchor.pem``, the one file a validator must trust. The service URLs in the
certificates use ``http://127.0.0.1:<port>``; ``serve`` answers there (loopback only).

Production uses none of this: its certificate names the real CRL and OCSP addresses, and
``BUBUH_SIGNING_TSA_URL`` the real TSA.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

ARCH = "bubuh"
P12_PASSWORD = "bubuh-dev"
_KEYS = ("root", "issuing", "signer", "signer-revoked", "ocsp", "tsa", "tsa-archive")


@dataclass(frozen=True)
class DevPki:
    """Where ``generate`` wrote, and the URLs the certificates and services use."""

    root: Path
    port: int

    @property
    def prefix(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.root / "certomancer.yml"

    @property
    def trust_anchor(self) -> Path:
        return self.root / "trust-anchor.pem"

    @property
    def signer_p12(self) -> Path:
        return self.root / "signer.p12"

    @property
    def revoked_signer_p12(self) -> Path:
        """A signer whose certificate the PKI reports as revoked (tests of the revoked path)."""
        return self.root / "signer-revoked.p12"

    @property
    def tsa_url(self) -> str:
        return f"{self.prefix}/{ARCH}/tsa/tsa"

    @property
    def archive_tsa_url(self) -> str:
        """A second TSA whose certificate outlives the first one's, as after a TSA's key roll-over: what
        `bubuh renew-timestamps` time-stamps with before the first TSA's certificate expires."""
        return f"{self.prefix}/{ARCH}/tsa/tsa-archive"

    @property
    def ocsp_url(self) -> str:
        return f"{self.prefix}/{ARCH}/ocsp/issuing"

    def crl_url(self, issuer: str) -> str:
        return f"{self.prefix}/{ARCH}/crls/{issuer}/latest.crl"


def default_root(local_dir: Path) -> Path:
    return local_dir / "pki"


def default_port() -> int:
    return int(os.environ.get("BUBUH_LOCAL_PKI_PORT", "18080"))


def _write_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _config(port: int, now: _dt.datetime) -> dict:
    def at(days: int) -> str:
        return (now + _dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S+0000")

    def key_usage(*names: str) -> dict:
        return {"id": "key_usage", "critical": True, "smart-value": {"schema": "key-usage", "params": list(names)}}

    def crl_dp(repo: str) -> dict:
        return {"id": "crl_distribution_points",
                "smart-value": {"schema": "crl-dist-url", "params": {"crl-repo-names": [repo]}}}

    def validity(days: int) -> dict:
        return {"valid-from": at(-1), "valid-to": at(days)}

    def tsa(days: int) -> dict:
        return {"issuer": "root", "validity": validity(days),
                "extensions": [key_usage("digital_signature"),
                               {"id": "extended_key_usage", "critical": True, "value": ["time_stamping"]},
                               crl_dp("root")]}

    ca = {"id": "basic_constraints", "critical": True, "value": {"ca": True}}
    leaf_aia = {"id": "authority_information_access",
                "smart-value": {"schema": "aia-urls", "params": {
                    "ocsp-responder-names": ["issuing"],
                    "ca-issuer-links": [{"repo": "root", "cert-labels": ["issuing"],
                                         "include-repo-authority": False}]}}}
    signer = {"issuer": "issuing", "validity": validity(730),
              "extensions": [key_usage("digital_signature", "non_repudiation"), leaf_aia, crl_dp("issuing")]}
    return {
        "external-url-prefix": f"http://127.0.0.1:{port}",
        "keysets": {ARCH: {"path-prefix": "keys", "keys": {k: {"path": f"{k}.key.pem"} for k in _KEYS}}},
        "pki-architectures": {ARCH: {
            "keyset": ARCH,
            "entity-defaults": {"country-name": "ID", "organization-name": "Bubuh Development (NOT FOR PRODUCTION)"},
            "entities": {
                "root": {"common-name": "Bubuh Dev Root CA"},
                "issuing": {"common-name": "Bubuh Dev Issuing CA"},
                "signer": {"common-name": "Bubuh Dev e-Meterai Issuer"},
                "signer-revoked": {"common-name": "Bubuh Dev e-Meterai Issuer (revoked)"},
                "ocsp": {"common-name": "Bubuh Dev OCSP Responder"},
                "tsa": {"common-name": "Bubuh Dev Time-Stamp Authority"},
                "tsa-archive": {"common-name": "Bubuh Dev Time-Stamp Authority (after roll-over)"},
            },
            "certs": {
                "root": {"subject": "root", "issuer": "root", "validity": validity(3650),
                         "extensions": [ca, key_usage("digital_signature", "key_cert_sign", "crl_sign")]},
                "issuing": {"issuer": "root", "validity": validity(1825),
                            "extensions": [{"id": "basic_constraints", "critical": True,
                                            "value": {"ca": True, "path_len_constraint": 0}},
                                           key_usage("digital_signature", "key_cert_sign", "crl_sign"),
                                           crl_dp("root")]},
                "signer": signer,
                "signer-revoked": {**signer, "subject": "signer-revoked",
                                   "revocation": {"revoked-since": at(0), "reason": "key_compromise"}},
                "ocsp": {"issuer": "issuing", "validity": validity(1825),
                         "extensions": [key_usage("digital_signature"),
                                        {"id": "extended_key_usage", "critical": True, "value": ["ocsp_signing"]},
                                        {"id": "ocsp_no_check"}]},
                "tsa": tsa(1825),
                "tsa-archive": {**tsa(3000), "subject": "tsa-archive"},
            },
            "services": {
                "ocsp": {"issuing": {"for-issuer": "issuing", "responder-cert": "ocsp", "signing-key": "ocsp"}},
                "crl-repo": {
                    "root": {"for-issuer": "root", "signing-key": "root", "simulated-update-schedule": "P7D"},
                    "issuing": {"for-issuer": "issuing", "signing-key": "issuing", "simulated-update-schedule": "P1D"},
                },
                "cert-repo": {"root": {"for-issuer": "root", "publish-issued-certs": True}},
                "time-stamping": {"tsa": {"signing-key": "tsa", "signing-cert": "tsa"},
                                  "tsa-archive": {"signing-key": "tsa-archive", "signing-cert": "tsa-archive"}},
            },
        }},
    }


def load_arch(pki: DevPki):
    from certomancer.registry import CertomancerConfig

    return CertomancerConfig.from_file(str(pki.config), key_search_dir=str(pki.root)).get_pki_arch(ARCH)


def generate(root: Path, port: int) -> DevPki:
    """Fresh keys and a fresh PKI under ``root`` whose services live at 127.0.0.1:``port``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    pki = DevPki(Path(root), port)
    (pki.root / "keys").mkdir(parents=True, exist_ok=True)
    os.chmod(pki.root / "keys", 0o700)
    for name in _KEYS:
        _write_key(pki.root / "keys" / f"{name}.key.pem")
    # certomancer reads YAML; JSON is YAML, and needs no writer of ours
    pki.config.write_text(json.dumps(_config(port, _dt.datetime.now(_dt.UTC)), indent=1))
    arch = load_arch(pki)
    from cryptography import x509

    def pyca(label: str) -> x509.Certificate:
        return x509.load_der_x509_certificate(arch.get_cert(label).dump())

    pki.trust_anchor.write_bytes(pyca("root").public_bytes(serialization.Encoding.PEM))
    for label, path in (("signer", pki.signer_p12), ("signer-revoked", pki.revoked_signer_p12)):
        key = serialization.load_pem_private_key((pki.root / "keys" / f"{label}.key.pem").read_bytes(), None)
        blob = pkcs12.serialize_key_and_certificates(
            name=label.encode(), key=key, cert=pyca(label), cas=[pyca("issuing"), pyca("root")],
            encryption_algorithm=serialization.BestAvailableEncryption(P12_PASSWORD.encode()))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
    return pki


def existing(root: Path) -> DevPki | None:
    """The PKI under ``root`` (with the port its certificates name), or None when there is none."""
    config = Path(root) / "certomancer.yml"
    if not config.exists() or not (Path(root) / "signer.p12").exists():
        return None
    if any(not (Path(root) / "keys" / f"{name}.key.pem").exists() for name in _KEYS):
        return None   # made before a certificate was added: made anew
    prefix = json.loads(config.read_text())["external-url-prefix"]
    return DevPki(Path(root), int(prefix.rsplit(":", 1)[1]))
