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


def _open_token_in_a_fresh_process(conf: str, module: str, label: str, pin: str, out, together) -> None:
    """A signing child's start: open the token (counting attempts), sign once, report. ``together`` (a
    barrier) lines the crowd up so they open at once even on a loaded box, where started one after
    another they would drift apart and not overlap."""
    import os

    os.environ["SOFTHSM2_CONF"] = conf
    from services.stamping.signing import signing_key as sk

    attempts = []

    class Counting(sk.Pkcs11Key):
        def __init__(self, *args, **kwargs):
            attempts.append(1)
            super().__init__(*args, **kwargs)

    sk.Pkcs11Key = Counting
    try:
        together.wait(timeout=120)
        key = sk.open_pkcs11(module, label, pin, "issuer")
        key.sign_raw(b"data", "sha256")
        out.put(("ok", len(attempts)))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((repr(exc), len(attempts)))


def test_a_token_opened_by_many_processes_at_once_opens_in_each(dev_ca_rsa, tmp_path):
    """SoftHSM2's file store rewrites token.object on every login: a process reading the token meanwhile
    saw no token (NoSuchToken) or a GeneralError, and kept that answer until C_Initialize ran again; two
    signing children starting together failed a worker's start in CI. Eight processes open one token
    together, in rounds until at least one of them had to retry (the fault was seen): every open succeeds."""
    import multiprocessing
    import shutil
    import subprocess
    import sys

    from services.kernel.settings import REPO_ROOT
    from services.stamping.signing import softhsm

    if softhsm.softhsm_module() is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 not installed (Debian package softhsm2)")
    made = subprocess.run(  # in a child: the import sets SOFTHSM2_CONF and loads the module process-wide
        [sys.executable, "-c", "from services.stamping.signing import softhsm; "
         f"print(softhsm.softhsm_import({str(tmp_path)!r}, {str(dev_ca_rsa.p12_path)!r}, "
         f"{dev_ca_rsa.password!r}, token_label='crowd').conf_path)"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True)
    conf = made.stdout.strip().splitlines()[-1]
    ctx = multiprocessing.get_context("forkserver")  # children of a fresh process: no module loaded yet
    ctx.set_forkserver_preload(["pyhanko.sign.pkcs11", "services.stamping.signing.signing_key"])
    outcomes: list[tuple[str, int]] = []
    for _round in range(15):
        out, together = ctx.Queue(), ctx.Barrier(8)
        crowd = [ctx.Process(target=_open_token_in_a_fresh_process,
                             args=(conf, softhsm.softhsm_module(), "crowd", "1234", out, together))
                 for _ in range(8)]
        for p in crowd:
            p.start()
        outcomes += [out.get(timeout=120) for _ in crowd]
        for p in crowd:
            p.join(timeout=30)
        if _round >= 2 and any(n > 1 for _, n in outcomes):
            break
    assert [o for o in outcomes if o[0] != "ok"] == [], outcomes
    assert any(n > 1 for _, n in outcomes), f"no open needed a retry in {len(outcomes)}: the race was not seen"
