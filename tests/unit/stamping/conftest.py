"""Shared fixtures for the stamping library tests.

Keys are generated once per session into pytest's tmp dirs (never into the repo), and
the external checkers (poppler's pdfsig/pdftoppm/pdftotext, zbarimg, NSS certutil,
SoftHSM2) are optional: a test that needs a missing tool is skipped and says which
Debian package provides it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from loadtests import corpus
from services.stamping.signing import dev_ca, softhsm
from tests.timestamping import running_tsa

VERIFY_BASE = "https://verify.bubuh.example"


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package {package})")
    return path


@pytest.fixture(scope="session")
def dev_cas(tmp_path_factory) -> dict[str, dev_ca.DevCA]:
    out = tmp_path_factory.mktemp("dev-ca")
    return {kt: dev_ca.dev_ca(out, kt) for kt in dev_ca.KEY_TYPES}


@pytest.fixture(scope="session")
def dev_ca_rsa(dev_cas) -> dev_ca.DevCA:
    return dev_cas["rsa2048"]


@pytest.fixture(scope="session")
def a4_pdf() -> bytes:
    return corpus.a4_text(11)


@pytest.fixture(scope="session")
def presigned_doc() -> corpus.Presigned:
    return corpus.presigned(12)


# --- poppler pdfsig with an NSS database that trusts the dev CAs ----------------------------


@dataclass(frozen=True)
class PdfSigResult:
    signatures: list[dict[str, str]]
    raw: str


@pytest.fixture(scope="session")
def pdfsig(dev_cas, tmp_path_factory):
    exe = need_tool("pdfsig", "poppler-utils")
    certutil = need_tool("certutil", "libnss3-tools")
    nss = tmp_path_factory.mktemp("nss")
    subprocess.run([certutil, "-N", "-d", f"sql:{nss}", "--empty-password"], check=True, capture_output=True)
    for kt, ca in dev_cas.items():
        subprocess.run([certutil, "-A", "-n", f"bubuh-dev-ca-{kt}", "-t", "CT,C,C", "-i", str(ca.ca_cert_pem),
                        "-d", f"sql:{nss}"], check=True, capture_output=True)
    scratch = tmp_path_factory.mktemp("pdfsig")
    counter = iter(range(1_000_000))

    def run(pdf: bytes) -> PdfSigResult:
        path = scratch / f"doc-{next(counter)}.pdf"
        path.write_bytes(pdf)
        proc = subprocess.run([exe, "-nssdir", f"sql:{nss}", str(path)], capture_output=True, text=True)
        path.unlink()
        sigs: list[dict[str, str]] = []
        for block in re.split(r"^Signature #\d+:\s*$", proc.stdout, flags=re.M)[1:]:
            entry: dict[str, str] = {}
            for line in block.splitlines():
                line = line.strip()
                if line == "- Total document signed":
                    entry["Total document signed"] = "yes"
                elif line.startswith("- "):
                    key, _, value = line[2:].partition(":")
                    entry[key.strip()] = value.strip()
            sigs.append(entry)
        return PdfSigResult(sigs, proc.stdout + proc.stderr)

    return run


def assert_pdfsig_ok(result: PdfSigResult, index: int = -1, whole: bool = True) -> None:
    """pdfsig says signature ``index`` is valid and trusted (and, if ``whole``, covers the file)."""
    assert result.signatures, result.raw
    sig = result.signatures[index]
    assert sig.get("Signature Validation") == "Signature is Valid.", result.raw
    assert sig.get("Certificate Validation") == "Certificate is Trusted.", result.raw
    if whole:
        assert sig.get("Total document signed") == "yes", result.raw


# --- a local RFC 3161 time-stamp authority ---------------------------------------------------


@pytest.fixture(scope="session")
def local_tsa():
    with running_tsa() as tsa:
        yield tsa


@pytest.fixture(scope="session")
def softhsm_tokens(dev_cas, tmp_path_factory) -> dict[str, softhsm.SoftHsmToken]:
    """One SoftHSM2 token per dev key, all created before any session is opened."""
    if softhsm.softhsm_module() is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 not installed (Debian package softhsm2)")
    pytest.importorskip("pkcs11", reason="python-pkcs11 not installed (pip install 'pyHanko[pkcs11]')")
    previous = os.environ.get("SOFTHSM2_CONF")
    where = tmp_path_factory.mktemp("softhsm")
    tokens = {kt: softhsm.softhsm_import(where, ca.p12_path, ca.password, token_label=f"bubuh-dev-{kt}")
              for kt, ca in dev_cas.items()}
    yield tokens
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def softhsm_token(softhsm_tokens) -> softhsm.SoftHsmToken:
    return softhsm_tokens["rsa2048"]


# --- reading a stamp back the way a person would: rendered pixels and extracted text ---------


def _page_height(pdf: bytes, page: int) -> float:
    import io

    import pikepdf

    with pikepdf.open(io.BytesIO(pdf)) as doc:
        llx, lly, urx, ury = (float(v) for v in doc.pages[page - 1].mediabox)
    return max(lly, ury)


@pytest.fixture(scope="session")
def read_stamp(tmp_path_factory):
    """Return (text, qr_payloads) read from the region ``box`` of ``page`` of a PDF.

    Text via poppler's pdftotext cropped to the box; QR via pdftoppm (150 dpi) and zbarimg.
    """
    pdftotext = need_tool("pdftotext", "poppler-utils")
    pdftoppm = need_tool("pdftoppm", "poppler-utils")
    zbarimg = need_tool("zbarimg", "zbar-tools")
    scratch = tmp_path_factory.mktemp("render")
    counter = iter(range(1_000_000))

    def read(pdf: bytes, page: int, box) -> tuple[list[str], list[str]]:
        n = next(counter)
        path = scratch / f"in-{n}.pdf"
        path.write_bytes(pdf)
        llx, lly, urx, ury = box
        top = _page_height(pdf, page) - ury
        text = subprocess.run(
            [pdftotext, "-f", str(page), "-l", str(page), "-x", str(int(llx)), "-y", str(int(top)),
             "-W", str(int(urx - llx) + 1), "-H", str(int(ury - lly) + 1), "-layout", str(path), "-"],
            check=True, capture_output=True, text=True).stdout
        scale = 150 / 72
        subprocess.run(
            [pdftoppm, "-png", "-r", "150", "-f", str(page), "-l", str(page), "-singlefile",
             "-x", str(int(llx * scale) - 4), "-y", str(int(top * scale) - 4),
             "-W", str(int((urx - llx) * scale) + 8), "-H", str(int((ury - lly) * scale) + 8),
             str(path), str(scratch / f"out-{n}")], check=True, capture_output=True)
        png = scratch / f"out-{n}.png"
        zbar = subprocess.run([zbarimg, "--raw", "-q", str(png)], capture_output=True, text=True)
        path.unlink()
        png.unlink()
        lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
        return lines, [line for line in zbar.stdout.splitlines() if line]

    return read


def appearance_text(pdf: bytes, field_name: str) -> list[str]:
    """Strings shown by the normal appearance of signature field ``field_name``, in drawing order.

    Reads only the stamp's own appearance stream (and the form XObjects it draws), so text of
    the page underneath the stamp does not interfere.
    """
    import io

    import pikepdf

    def shown(xobj, depth=0) -> list[str]:
        assert depth < 8
        out: list[str] = []
        for operands, op in pikepdf.parse_content_stream(xobj):
            name = str(op)
            if name in ("Tj", "'", '"'):
                out.append(bytes(operands[-1]).decode("latin-1"))
            elif name == "TJ":
                out.append("".join(bytes(p).decode("latin-1") for p in operands[0]
                                   if isinstance(p, pikepdf.String)))
            elif name == "Do":
                child = xobj.Resources.XObject[operands[0]]
                if child.get("/Subtype") == pikepdf.Name.Form:
                    out.extend(shown(child, depth + 1))
        return out

    with pikepdf.open(io.BytesIO(pdf)) as doc:
        stack = list(doc.Root.AcroForm.Fields)
        while stack:
            field = stack.pop()
            if str(field.get("/T", "")) == field_name:
                return [line.strip() for line in shown(field.AP.N) if line.strip()]
            stack.extend(field.get("/Kids", []))
    raise AssertionError(f"no field {field_name}")
