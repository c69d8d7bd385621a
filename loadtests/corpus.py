"""Test documents for the stamping tier: what channels really send, and what they should not.

Why generated instead of checked in: the interesting properties (an 800 KB scan that
does not compress, a document already signed by an applicant with a key we do not
own, a 50 MB upload) are cheap to build and expensive to store, and a generator keeps
every test and benchmark on identical, reproducible bytes (seeded).

Used by ``tests/unit/stamping`` and ``loadtests/bench_engine.py``.
"""

from __future__ import annotations

import io
import random
import zlib
from dataclasses import dataclass

import pikepdf

A4 = (595.276, 841.89)

_LOREM = (
    "Yang bertanda tangan di bawah ini menyatakan dengan sesungguhnya bahwa data yang "
    "saya sampaikan dalam pendaftaran seleksi calon aparatur sipil negara adalah benar "
    "dan saya bersedia menerima sanksi apabila di kemudian hari terbukti tidak benar."
).split()


def _escape(text: str) -> bytes:
    return text.encode("latin-1").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _save(pdf: pikepdf.Pdf, version: str | None, object_streams: bool) -> bytes:
    out = io.BytesIO()
    pdf.save(
        out,
        force_version=version,
        object_stream_mode=(
            pikepdf.ObjectStreamMode.generate if object_streams else pikepdf.ObjectStreamMode.disable
        ),
        deterministic_id=True,
    )
    return out.getvalue()


def a4_text(seed: int = 0, *, pages: int = 1, version: str = "1.7", object_streams: bool = False,
            page_size: tuple[float, float] = A4, lines: int = 40) -> bytes:
    """A plain text statement letter ("surat pernyataan") on A4, Helvetica, ``pages`` pages."""
    rng = random.Random(seed)
    pdf = pikepdf.new()
    font = pdf.make_indirect(pikepdf.Dictionary(
        Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont=pikepdf.Name.Helvetica,
        Encoding=pikepdf.Name.WinAnsiEncoding,
    ))
    for n in range(pages):
        page = pdf.add_blank_page(page_size=page_size)
        page.Resources = pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font))
        body = [b"BT /F1 11 Tf 14 TL 56 %.2f Td" % (page_size[1] - 72)]
        body.append(b"(SURAT PERNYATAAN - halaman %d) Tj T*" % (n + 1))
        for _ in range(lines):
            words = " ".join(rng.choice(_LOREM) for _ in range(rng.randint(6, 12)))
            body.append(b"(" + _escape(words) + b") Tj T*")
        body.append(b"ET")
        page.Contents = pdf.make_stream(b"\n".join(body))
    return _save(pdf, version, object_streams)


def form_with_fields(fields: int = 4000, seed: int = 0) -> bytes:
    """The letter with an AcroForm of ``fields`` text fields whose widgets all sit in object streams:
    small (about 14 bytes a field) and cheap for qpdf, but costly for a pure-Python reader such as
    pyHanko's (seconds of CPU at a few thousand fields). Hostile-document test material."""
    pdf = pikepdf.open(io.BytesIO(a4_text(seed)))
    page = pdf.pages[0]
    widgets = pikepdf.Array()
    for i in range(fields):
        widgets.append(pdf.make_indirect(pikepdf.Dictionary(
            Type=pikepdf.Name.Annot, Subtype=pikepdf.Name.Widget, FT=pikepdf.Name.Tx, T=pikepdf.String(f"f{i}"),
            Rect=[40 + (i % 50) * 10, 40 + (i // 50 % 20) * 10, 48 + (i % 50) * 10, 48 + (i // 50 % 20) * 10],
            P=page.obj)))
    page.obj.Annots = widgets
    pdf.Root.AcroForm = pdf.make_indirect(pikepdf.Dictionary(Fields=widgets))
    return _save(pdf, "1.7", object_streams=True)


def scan_800k(seed: int = 0, *, target_bytes: int = 790_000, version: str = "1.7") -> bytes:
    """A one-page A4 "scan": a noise image that does not compress, about ``target_bytes`` long.

    Just under 800 KB so that it passes the ``cpns`` profile; the point is the hashing and
    copying cost of a large input, not its image quality.
    """
    rng = random.Random(seed)
    width = 1000
    height = max(1, (target_bytes - 2500) // width)
    raw = rng.randbytes(width * height)
    pdf = pikepdf.new()
    page = pdf.add_blank_page(page_size=A4)
    image = pdf.make_stream(
        zlib.compress(raw, 1),
        Type=pikepdf.Name.XObject, Subtype=pikepdf.Name.Image, Width=width, Height=height,
        ColorSpace=pikepdf.Name.DeviceGray, BitsPerComponent=8, Filter=pikepdf.Name.FlateDecode,
    )
    page.Resources = pikepdf.Dictionary(XObject=pikepdf.Dictionary(Im1=image))
    page.Contents = pdf.make_stream(b"q %.3f 0 0 %.3f 0 0 cm /Im1 Do Q" % A4)
    return _save(pdf, version, False)


@dataclass(frozen=True)
class Presigned:
    data: bytes
    ca_cert_pem: bytes  # trust anchor of the applicant's (test) signature
    field_name: str


def presigned(seed: int = 0, key_type: str = "rsa2048", base: bytes | None = None) -> Presigned:
    """An A4 letter (or ``base``) already signed by an "applicant" (CPNS asks applicants to sign first).

    The applicant key and CA are generated here, separate from the issuer's dev CA, so a
    test can tell the two signatures apart and check that ours leaves theirs valid.
    """
    from cryptography.hazmat.primitives import serialization
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import fields, signers

    from services.stamping.signing.dev_ca import make_certificate_pair
    from services.stamping.signing.signing_key import Pkcs12Key, to_asn1_cert

    _ca_key, ca_cert, key, cert = make_certificate_pair(
        key_type, ca_name="Applicant Test CA", subject_name="Calon Pelamar Uji",
        organisation="Applicant Test (NOT FOR PRODUCTION)",
    )
    applicant = Pkcs12Key(key, to_asn1_cert(cert), (to_asn1_cert(ca_cert),),
                          "rsa" if key_type == "rsa2048" else "ec")
    writer = IncrementalPdfFileWriter(io.BytesIO(base if base is not None else a4_text(seed)))
    out = signers.PdfSigner(
        signers.PdfSignatureMetadata(field_name="Pelamar", reason="Saya menyetujui isi dokumen ini",
                                     md_algorithm="sha256"),
        applicant.pyhanko_signer(),
        new_field_spec=fields.SigFieldSpec("Pelamar", box=(380, 60, 540, 110), on_page=0),
    ).sign_pdf(writer)
    return Presigned(out.getvalue(), ca_cert.public_bytes(serialization.Encoding.PEM), "Pelamar")


def _raw_pdf(objects: list[bytes], version: bytes = b"1.7") -> bytes:
    """Serialise numbered objects (1..n; 1 must be the catalog) with a correct xref table."""
    out = bytearray(b"%PDF-" + version + b"\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def deeply_nested(depth: int = 50_000) -> bytes:
    """A syntactically valid PDF whose page carries an array nested ``depth`` levels deep."""
    nested = b"[" * depth + b"]" * depth
    return _raw_pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595.276 841.89] /Bomb " + nested + b" >>",
    ])


def large(size: int = 50 * 1024 * 1024) -> bytes:
    """A valid PDF of about ``size`` bytes (one page plus a big unreferenced stream of zeros)."""
    small = _raw_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                      b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595.276 841.89] /Resources << >> >>"])
    pad = max(0, size - len(small) - 64)
    return _raw_pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595.276 841.89] /Resources << >> >>",
        b"<< /Length %d >>\nstream\n" % pad + bytes(pad) + b"\nendstream",
    ])


@dataclass(frozen=True)
class PoisonItem:
    name: str
    data: bytes
    expected_code: str  # the services.kernel.errors code inspection must answer
    profile: str = "standard"


def encrypted(user_password: str = "rahasia") -> bytes:
    pdf = pikepdf.open(io.BytesIO(a4_text(7)))
    out = io.BytesIO()
    pdf.save(out, encryption=pikepdf.Encryption(owner="pemilik", user=user_password, R=6))
    return out.getvalue()


def poison() -> list[PoisonItem]:
    """Inputs that must be refused with a clear code, never crash a worker."""
    good = a4_text(3)
    return [
        PoisonItem("zero-bytes", b"", "PDF_INVALID"),
        PoisonItem("not-a-pdf", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "PDF_INVALID"),
        PoisonItem("header-late", b" " * 2048 + good, "PDF_INVALID"),
        PoisonItem("truncated", good[: len(good) * 6 // 10], "PDF_MALFORMED"),
        PoisonItem("garbage-after-header", b"%PDF-1.7\n" + random.Random(1).randbytes(4096), "PDF_MALFORMED"),
        PoisonItem("encrypted", encrypted(), "PDF_ENCRYPTED"),
        PoisonItem("encrypted-empty-user-password", encrypted(""), "PDF_ENCRYPTED"),
        PoisonItem("deeply-nested", deeply_nested(), "PDF_TOO_COMPLEX"),
        PoisonItem("50mb", large(), "PDF_TOO_LARGE"),
        PoisonItem("cpns-over-800k", scan_800k(target_bytes=900_000), "PDF_TOO_LARGE", "cpns"),
        PoisonItem("cpns-letter-size", a4_text(4, page_size=(612, 792)), "PROFILE_VIOLATION", "cpns"),
        PoisonItem("cpns-pdf-1.4", a4_text(5, version="1.4"), "PROFILE_VIOLATION", "cpns"),
    ]


def crashes_signer(seed: int = 0) -> bytes:
    """Passes intake (qpdf reads it fine) but breaks the signer: the page's /Annots is a number, so
    adding the signature widget fails inside pyHanko. The worker must fail it with a code, release
    its unit, and go on with the next request."""
    pdf = pikepdf.open(io.BytesIO(a4_text(seed)))
    pdf.pages[0].obj["/Annots"] = 5
    out = io.BytesIO()
    pdf.save(out)
    return out.getvalue()


def _zeros_deflated(prefix: bytes, zeros: int, suffix: bytes) -> bytes:
    """zlib data that inflates to ``prefix + zeros x NUL + suffix``, built in a blink: after a full
    flush the compressor forgets its past, so every further megabyte of zeros compresses to the same
    bytes, written once and repeated. (Compressing 600 MB for real takes seconds.)"""
    block = 1024 * 1024
    whole, rest = divmod(zeros, block)
    c = zlib.compressobj(9)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)   # raw deflate: blocks that fit anywhere after a full flush
    one = raw.compress(bytes(block)) + raw.flush(zlib.Z_FULL_FLUSH)
    tail = c.compress(bytes(rest) + suffix) + c.flush()
    # the trailer's Adler-32 covers what went through `c` only: recompute it over everything
    adler = zlib.adler32(prefix)
    zero_block = bytes(block)
    for _ in range(whole):
        adler = zlib.adler32(zero_block, adler)
    adler = zlib.adler32(bytes(rest) + suffix, adler)
    return head + one * whole + tail[:-4] + adler.to_bytes(4, "big")


def inflating(decoded: int = 600 * 1024 * 1024, *, where: str = "object-stream", extra: bytes = b"") -> bytes:
    """A valid one-page PDF of well under 1 MB whose Flate data inflates to ``decoded`` bytes (NULs,
    which PDF syntax reads as white space): in the object stream that holds the page
    (``object-stream``: a parser must inflate it all to find the page), or in the page's content
    stream (``content``: only a renderer would). ``extra`` goes into the stream's dictionary
    after its /Filter (e.g. a string that looks like an object header, to mislead a scanner)."""
    catalog = b"<< /Type /Catalog /Pages 2 0 R >>"
    pages = b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>"
    page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595.276 841.89] /Resources << >>%s >>"
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}

    def put(num: int, body: bytes) -> None:
        offsets[num] = len(out)
        out.extend(b"%d 0 obj\n" % num + body + b"\nendobj\n")

    put(1, catalog)
    put(2, pages)
    if where == "object-stream":
        header = b"3 0 "
        data = _zeros_deflated(header, decoded, page % b"")
        put(4, b"<< /Type /ObjStm /N 1 /First %d /Filter /FlateDecode%s /Length %d >>\nstream\n"
            % (len(header), extra, len(data)) + data + b"\nendstream")
    elif where == "content":
        put(3, page % b" /Contents 4 0 R")
        data = _zeros_deflated(b"", decoded, b"")
        put(4, b"<< /Filter /FlateDecode%s /Length %d >>\nstream\n" % (extra, len(data)) + data + b"\nendstream")
    else:
        raise ValueError(where)
    # a cross-reference stream (object 3 may live in an object stream), stored unfiltered
    xref_at = len(out)
    rows = [b"\x00" + b"\x00\x00\x00\x00" + b"\xff\xff"]
    for num in (1, 2, 3, 4):
        if num == 3 and where == "object-stream":
            rows.append(b"\x02" + (4).to_bytes(4, "big") + b"\x00\x00")
        else:
            rows.append(b"\x01" + offsets[num].to_bytes(4, "big") + b"\x00\x00")
    rows.append(b"\x01" + xref_at.to_bytes(4, "big") + b"\x00\x00")
    table = b"".join(rows)
    out.extend(b"5 0 obj\n<< /Type /XRef /Size 6 /W [1 4 2] /Root 1 0 R /Length %d >>\nstream\n" % len(table)
               + table + b"\nendstream\nendobj\nstartxref\n%d\n%%%%EOF\n" % xref_at)
    return bytes(out)


def nested_flate(decoded: int = 600 * 1024 * 1024) -> bytes:
    """Like ``inflating(where="content")`` with the zeros deflated twice (``[/FlateDecode /FlateDecode]``):
    a few kilobytes on disk."""
    plain = inflating(decoded, where="content")
    inner = _zeros_deflated(b"", decoded, b"")
    outer = zlib.compress(inner, 9)
    start = plain.index(b"4 0 obj\n")
    end = plain.index(b"endobj\n", start) + len(b"endobj\n")
    stream = (b"4 0 obj\n<< /Filter [/FlateDecode /FlateDecode] /Length %d >>\nstream\n" % len(outer) + outer
              + b"\nendstream\nendobj\n")
    return _reindexed(plain[:start] + stream + plain[end:])


def _reindexed(pdf: bytes) -> bytes:
    """``pdf`` with a fresh classic xref table for its plain objects (1-4); the stream one is dropped."""
    body = pdf[:pdf.index(b"5 0 obj\n")]
    offsets = [body.index(b"\n%d 0 obj\n" % n) + 1 for n in (1, 2, 3, 4)]
    xref = len(body)
    table = b"xref\n0 5\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return body + table + b"trailer\n<< /Size 5 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
