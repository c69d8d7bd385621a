"""Serving the development PKI (``dev_pki.py``): CRLs, OCSP and RFC 3161 time-stamps on 127.0.0.1.

certomancer's Animator (a WSGI app) answers every request, except time-stamp requests to a TSA whose
key is RSA: those are answered by ``FastTimeStamper``, which builds the same token from DER parts
encoded once. Why: on a 2-core box the local TSA shares the CPU with the stamping it answers, and
every B-T/B-LT stamp asks for a token, so its cost is charged to every stamp the surge measures
(issue 13: B-LT against B-B). certomancer's stamper re-encodes the whole SignedData through asn1crypto
for each token (about 2.4 ms of CPU, plus about 1.2 ms in the WSGI server); the spliced token costs a
fraction of that. What it writes is checked against certomancer's own token field by field
(tests/unit/stamping/test_dev_pki_server.py), and the stamps it time-stamps pass pyHanko, pdfsig and
EU DSS as before.

Production uses none of this: ``BUBUH_SIGNING_TSA_URL`` names the real TSA.
"""

from __future__ import annotations

import copy
import hashlib
from datetime import UTC, datetime

from asn1crypto import core, tsp, x509

from services.stamping.signing.dev_pki import ARCH, DevPki


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
    same but for the time and serial."""

    def __init__(self, stamper) -> None:
        self._stamper = stamper
        self._tsa_der = stamper.tsa_cert.dump()
        self._embed_ders = [c.dump() for c in stamper.certs_to_embed]

    def request_tsa_response(self, req):
        one = copy.copy(self._stamper)   # per request: the server is threaded
        one.tsa_cert = x509.Certificate.load(self._tsa_der)
        one.certs_to_embed = [x509.Certificate.load(der) for der in self._embed_ders]
        return one.request_tsa_response(req)

    def __getattr__(self, name: str):
        return getattr(self._stamper, name)


def _keep_timestampers(registry) -> dict:
    """certomancer summons a time-stamper per request: it loads and checks the TSA's RSA key and
    re-encodes its certificates each time (about 130 ms a request). A TSA is on every stamp's path,
    so keep one per label; with no fixed time it stamps each token with the current time.
    The Animator passes its idea of the time to every summons (``at_time``): with no time override
    and no fixed time (``serve``) that is always now, which is what a kept stamper uses anyway.
    Returns the kept stampers by label (filled as they are summoned)."""
    summon = registry.summon_timestamper
    kept: dict = {}

    def summon_kept(label, at_time=None):
        if label not in kept:
            kept[label] = _LightCertificates(summon(label))
        return kept[label]

    registry.summon_timestamper = summon_kept
    return kept


# --- the spliced token ------------------------------------------------------------------------------


def _der(tag: int, *parts: bytes) -> bytes:
    """One DER TLV: ``tag``, the definite length of the concatenated ``parts``, the parts."""
    body = b"".join(parts)
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


class FastTimeStamper:
    """RFC 3161 responses as certomancer's ``TimeStamper`` makes them (same fields, same order, same
    certificates, same signed attributes), with everything that does not change between tokens
    encoded once, from a response certomancer made. Per token: the TSTInfo (policy, the request's
    message imprint, a fresh serial, the time, the request's nonce, the TSA's name), four signed
    attributes, one RSA PKCS#1 v1.5 signature."""

    def __init__(self, stamper) -> None:
        from cryptography.hazmat.primitives import hashes, serialization

        if stamper.signature_algo.signature_algo != "rsassa_pkcs1v15":
            raise ValueError(f"only RSA PKCS#1 v1.5 TSAs are spliced, not {stamper.signature_algo.signature_algo}")
        probe = tsp.TimeStampReq({"version": 1, "message_imprint": {
            "hash_algorithm": {"algorithm": "sha256"}, "hashed_message": bytes(32)}, "cert_req": True})
        template = stamper.request_tsa_response(probe)
        signed = template["time_stamp_token"]["content"]
        info = signed["signer_infos"][0]
        attrs = info["signed_attrs"]
        kinds = [a["type"].native for a in attrs]
        if kinds != ["content_type", "signing_time", "signing_certificate", "message_digest"]:
            raise ValueError(f"unexpected signed attributes {kinds}")
        self._md = stamper.md_algorithm
        self._hash = getattr(hashes, self._md.upper())()
        self._key = serialization.load_der_private_key(stamper.tsa_key.dump(), password=None,
                                                       unsafe_skip_rsa_key_validation=True)
        self._status = template["status"].dump()
        self._signed_data_oid = template["time_stamp_token"]["content_type"].dump()
        self._v1, self._v3 = core.Integer(1).dump(), core.Integer(3).dump()
        self._policy = tsp.ObjectIdentifier(stamper.policy.dotted).dump()
        self._tsa_name = _der(0xA0, x509.GeneralName(name="directory_name", value=stamper.tsa_cert.subject).dump())
        self._digest_algorithms = signed["digest_algorithms"].dump()
        self._tst_info_oid = signed["encap_content_info"]["content_type"].dump()
        self._certificates = signed["certificates"].dump()
        self._sid = info["sid"].dump()
        self._digest_algorithm = info["digest_algorithm"].dump()
        self._signature_algorithm = info["signature_algorithm"].dump()
        self._content_type_attr = attrs[0].dump()
        self._signing_certificate_attr = attrs[2].dump()
        self._signing_time_oid = attrs[1]["type"].dump()
        self._message_digest_oid = attrs[3]["type"].dump()

    def respond(self, body: bytes) -> bytes:
        """The DER TimeStampResp for the DER TimeStampReq ``body`` (ValueError when it is not one)."""
        from certomancer.services import get_nonce
        from cryptography.hazmat.primitives.asymmetric import padding

        req = tsp.TimeStampReq.load(body, strict=True)
        imprint = req["message_imprint"]
        imprint.native   # noqa: B018 - parses it: a malformed request fails here, not in a client's validator
        nonce = req["nonce"]
        now = datetime.now(UTC)
        tst_info = _der(0x30, self._v1, self._policy, imprint.dump(), core.Integer(get_nonce()).dump(),
                        core.GeneralizedTime(now).dump(),
                        nonce.dump() if isinstance(nonce, core.Integer) else b"", self._tsa_name)
        digest = hashlib.new(self._md, tst_info).digest()
        attrs = b"".join((
            self._content_type_attr,
            _der(0x30, self._signing_time_oid, _der(0x31, core.UTCTime(now).dump())),
            self._signing_certificate_attr,
            _der(0x30, self._message_digest_oid, _der(0x31, core.OctetString(digest).dump())),
        ))
        signature = self._key.sign(_der(0x31, attrs), padding.PKCS1v15(), self._hash)
        signer_info = _der(0x30, self._v1, self._sid, self._digest_algorithm, _der(0xA0, attrs),
                           self._signature_algorithm, core.OctetString(signature).dump())
        encap = _der(0x30, self._tst_info_oid, _der(0xA0, core.OctetString(tst_info).dump()))
        signed_data = _der(0x30, self._v3, self._digest_algorithms, encap, self._certificates,
                           _der(0x31, signer_info))
        return _der(0x30, self._status, _der(0x30, self._signed_data_oid, _der(0xA0, signed_data)))


def _asgi(wsgi_app, fast: dict[str, FastTimeStamper]):
    """POSTs to a spliced TSA's path answered here; everything else by the Animator (WSGI)."""
    from uvicorn.middleware.wsgi import WSGIMiddleware

    animator = WSGIMiddleware(wsgi_app)

    async def app(scope, receive, send) -> None:
        stamper = fast.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if stamper is None:
            await animator(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > 64 * 1024:
                break
        try:
            reply, status, kind = stamper.respond(body), 200, b"application/timestamp-reply"
        except ValueError as exc:
            reply, status, kind = f"not a time-stamp request: {exc}".encode()[:300], 400, b"text/plain"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(reply)).encode())]})
        await send({"type": "http.response.body", "body": reply})

    return app


def serve(pki: DevPki) -> None:
    """Serve CRLs, OCSP and the TSAs on 127.0.0.1 until stopped. No web UI (it would offer the keys)
    and no time override (the services answer in real time).

    Served by uvicorn (the platform's own HTTP server) with HTTP/1.1 keep-alive: a signing child's
    time-stamp requests reuse one connection. werkzeug's server, used before, answers every request
    with ``Connection: close`` whatever the protocol version, so each token cost a TCP connection and
    a server thread."""
    import uvicorn
    from certomancer.integrations.animator import Animator, AnimatorArchStore
    from certomancer.registry import CertomancerConfig

    _keep_loaded_keys()
    cfg = CertomancerConfig.from_file(str(pki.config), key_search_dir=str(pki.root))
    fast: dict[str, FastTimeStamper] = {}
    for arch in cfg.pki_archs.values():
        _keep_timestampers(arch.service_registry)
        for tsa in arch.service_registry.list_time_stamping_services():
            stamper = arch.service_registry.summon_timestamper(tsa.label)
            try:
                fast[f"/{ARCH}{tsa.internal_url}"] = FastTimeStamper(stamper)
            except ValueError:
                pass   # another key type: certomancer answers it
    app = Animator(AnimatorArchStore(cfg.pki_archs), with_web_ui=False, allow_time_override=False)
    uvicorn.run(_asgi(app, fast), host="127.0.0.1", port=pki.port, access_log=False, log_level="warning",
                timeout_keep_alive=60)
