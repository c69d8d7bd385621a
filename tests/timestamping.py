"""A local RFC 3161 time-stamp authority for tests: its own throw-away root and TSA certificate."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import threading
import time
from dataclasses import dataclass


def _tsa_identity():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    # RSA: pyHanko's DummyTimeStamper signs with RSA only
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bubuh Test TSA Root")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bubuh Test TSA")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
            .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False, False),
                           critical=True)
            .sign(ca_key, hashes.SHA256()))
    der_key = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca_cert, cert, der_key


@dataclass
class LocalTsa:
    url: str
    ca_cert_pem: bytes
    requests: int = 0
    connections: int = 0  # TCP connections accepted
    # what the next answers do wrong, for client tests: None (nothing), "http-500", "html", "huge",
    # "wrong-nonce", "drop" (answer, then close the kept-alive connection without saying so), "silent"
    fault: str | None = None


@contextlib.contextmanager
def running_tsa(delay_s: float = 0.0, keep_alive: bool = False):
    """A real RFC 3161 responder over HTTP on loopback (pyHanko's DummyTimeStamper signs the replies);
    ``delay_s``: a slow one, answering that long after each request; ``keep_alive``: HTTP/1.1, connections
    stay open between requests (HTTP/1.0 otherwise: one request per connection)."""
    from asn1crypto import keys as asn1_keys
    from asn1crypto import tsp
    from asn1crypto import x509 as asn1_x509
    from cryptography.hazmat.primitives import serialization
    from pyhanko.sign.timestamps import DummyTimeStamper

    ca_cert, cert, der_key = _tsa_identity()
    ca_asn1 = asn1_x509.Certificate.load(ca_cert.public_bytes(serialization.Encoding.DER))
    stamper = DummyTimeStamper(
        tsa_cert=asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER)),
        tsa_key=asn1_keys.PrivateKeyInfo.load(der_key),
        certs_to_embed=[ca_asn1],
    )
    state = LocalTsa("", ca_cert.public_bytes(serialization.Encoding.PEM))

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

        def setup(self):
            state.connections += 1
            super().setup()

        def do_POST(self):  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay_s)
            fault = state.fault
            if fault == "silent":
                time.sleep(30)
                return
            req = tsp.TimeStampReq.load(body)
            if fault == "wrong-nonce":
                req = tsp.TimeStampReq({**req.native, "nonce": req["nonce"].native + 1})
            resp = stamper.request_tsa_response(req).dump()
            state.requests += 1
            status, ctype = 200, "application/timestamp-reply"
            if fault == "http-500":
                status, resp = 500, b"internal error"
            elif fault == "html":
                ctype, resp = "text/html", b"<html>maintenance</html>"
            elif fault == "huge":
                resp = b"\x30" * (2 << 20)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(resp)))
            self.end_headers()
            self.wfile.write(resp)
            if fault == "drop":
                self.close_connection = True

        def log_message(self, *args):  # keep test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/tsa"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
