"""SoftHSM2 import: put a PKCS#12 key into a SoftHSM2 token so tests exercise the real PKCS#11 path.

Token initialisation uses ``softhsm2-util`` (C_InitToken is not exposed by python-pkcs11); importing
key and certificates uses python-pkcs11 ``create_object`` so the private key never touches the disk
unencrypted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from services.stamping.signing.signing_key import read_pkcs12

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

    loaded = read_pkcs12(Path(p12_path).read_bytes(), p12_password)
    lib = pkcs11.lib(module)
    try:
        lib.reinitialize()  # the module may have been loaded with an older SOFTHSM2_CONF
    except Exception:  # noqa: BLE001 - nothing to reinitialise on first load
        pass
    token = lib.get_token(token_label=token_label)
    with token.open(rw=True, user_pin=pin) as session:
        der = loaded.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        attrs = decode_rsa_private_key(der) if loaded.algorithm == "rsa" else decode_ec_private_key(der)
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
