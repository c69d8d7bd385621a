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

import copy
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


def _keep_loaded_keys() -> None:
    """certomancer's crypto backend parses (and, for RSA, checks: slow) the private key on every
    signature. Our keys are our own, freshly generated: parse each once."""
    from certomancer import crypto_utils
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    class KeptKeys(crypto_utils.PycaCryptographyBackend):
        def __init__(self) -> None:
            self._loaded: dict[bytes, object] = {}

        def generic_sign(self, private_key, tbs_bytes, sd_algo):
            if sd_algo.signature_algo != "rsassa_pkcs1v15":
                return super().generic_sign(private_key, tbs_bytes, sd_algo)
            der = private_key.dump()
            key = self._loaded.get(der)
            if key is None:
                key = self._loaded[der] = serialization.load_der_private_key(
                    der, password=None, unsafe_skip_rsa_key_validation=True)
            assert isinstance(key, rsa.RSAPrivateKey)
            return key.sign(tbs_bytes, padding.PKCS1v15(), getattr(hashes, sd_algo.hash_algo.upper())())

    crypto_utils.CRYPTO_BACKEND = KeptKeys()


class _LightCertificates:
    """A kept time-stamper whose tokens embed certificates loaded afresh from DER for each request.
    asn1crypto copies a certificate to embed it; a parsed one (the arch's, which certomancer hands
    every stamper) is copied field by field: 14 of the 18 ms of CPU a token took here, while a fresh,
    unparsed one is copied as bytes (3.7 ms a token in all, measured in-process). The tokens are the
    same but for the time and serial. On a 2-core box the local TSA shares the CPU with the stamping
    worker it answers, so its cost is charged to every B-T/B-LT stamp the benchmarks time."""

    def __init__(self, stamper) -> None:
        self._stamper = stamper
        self._tsa_der = stamper.tsa_cert.dump()
        self._embed_ders = [c.dump() for c in stamper.certs_to_embed]

    def request_tsa_response(self, req):
        from asn1crypto import x509

        one = copy.copy(self._stamper)   # per request: the server is threaded
        one.tsa_cert = x509.Certificate.load(self._tsa_der)
        one.certs_to_embed = [x509.Certificate.load(der) for der in self._embed_ders]
        return one.request_tsa_response(req)

    def __getattr__(self, name: str):
        return getattr(self._stamper, name)


def _keep_timestampers(registry) -> None:
    """certomancer summons a time-stamper per request: it loads and checks the TSA's RSA key and
    re-encodes its certificates each time (about 130 ms a request). A TSA is on every stamp's path,
    so keep one per label; with no fixed time it stamps each token with the current time.
    The Animator passes its idea of the time to every summons (``at_time``): with no time override
    and no fixed time (``serve``) that is always now, which is what a kept stamper uses anyway.
    (Keeping only summonses without a time, as this did before, kept none.)"""
    summon = registry.summon_timestamper
    kept: dict = {}

    def summon_kept(label, at_time=None):
        if label not in kept:
            kept[label] = _LightCertificates(summon(label))
        return kept[label]

    registry.summon_timestamper = summon_kept


def serve(pki: DevPki) -> None:
    """Serve CRLs, OCSP and the TSA on 127.0.0.1 (threaded: several workers time-stamp at once).
    No web UI (it would offer the keys) and no time override (the services answer in real time)."""
    from certomancer.integrations.animator import Animator, AnimatorArchStore
    from certomancer.registry import CertomancerConfig
    from werkzeug.serving import run_simple

    _KeepAlive = _handler_class()
    _keep_loaded_keys()
    cfg = CertomancerConfig.from_file(str(pki.config), key_search_dir=str(pki.root))
    for arch in cfg.pki_archs.values():
        _keep_timestampers(arch.service_registry)
    app = Animator(AnimatorArchStore(cfg.pki_archs), with_web_ui=False, allow_time_override=False)
    run_simple("127.0.0.1", pki.port, app, threaded=True, request_handler=_KeepAlive)


def _handler_class():
    from werkzeug.serving import WSGIRequestHandler

    class KeepAlive(WSGIRequestHandler):
        """HTTP/1.1: a worker's time-stamp requests reuse one connection (and one server thread) instead
        of a TCP connection and a thread each, as werkzeug's HTTP/1.0 default makes them."""

        protocol_version = "HTTP/1.1"

        def log_request(self, *args, **kwargs) -> None:   # a line per time-stamp is noise, and CPU
            pass

    return KeepAlive

