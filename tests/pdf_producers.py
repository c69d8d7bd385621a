"""A corpus of real-world PDFs, written by the producers channels' applicants actually use.

Why generated here and not checked in: each producer writes PDF its own way (classic or stream
cross-reference tables, object streams, incremental saves, odd generation numbers, linearization),
and that is what the stamping engine must cope with; the tools are on the box (Debian packages from
deploy/local/system-packages.sh, Python packages from the ``dev`` extra), so the files cost seconds to
make and nothing to store. Every producer writes a one-page A4 letter; a few carry annotations or a
form, so that "our update touches nothing but what one signature field needs" is checked on them.

``corpus()`` returns every file as ``Produced(name, data)``; a producer whose tool is missing raises
``ProducerMissing`` naming the package, so a test can skip it with that reason.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

A4 = (595.276, 841.89)
LETTER_LINES = (
    "SURAT PERNYATAAN",
    "Yang bertanda tangan di bawah ini menyatakan dengan sesungguhnya",
    "bahwa data yang saya sampaikan dalam pendaftaran seleksi calon",
    "aparatur sipil negara adalah benar dan saya bersedia menerima",
    "sanksi apabila di kemudian hari terbukti tidak benar.",
)


class ProducerMissing(RuntimeError):
    """The producer's tool is not installed (the message names the package that provides it)."""


@dataclass(frozen=True)
class Produced:
    name: str
    data: bytes


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ProducerMissing(f"{name} not installed (Debian package {package}, deploy/local/system-packages.sh)")
    return path


def _run(args: list[str], **kw) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)
    # qpdf exits 3 when it succeeded with warnings
    if done.returncode not in (0, 3) or (done.returncode == 3 and Path(args[0]).name != "qpdf"):
        raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")


# --- Python producers ------------------------------------------------------------------------------


def reportlab_letter() -> bytes:
    from reportlab.lib.pagesizes import A4 as RL_A4
    from reportlab.pdfgen import canvas

    out = io.BytesIO()
    c = canvas.Canvas(out, pagesize=RL_A4, invariant=1)
    y = 780
    for line in LETTER_LINES:
        c.drawString(56, y, line)
        y -= 16
    c.save()
    return out.getvalue()


def reportlab_form() -> bytes:
    """An application form: an AcroForm (text field, check box, choice), a link and a note on the page."""
    from reportlab.lib.pagesizes import A4 as RL_A4
    from reportlab.pdfgen import canvas

    out = io.BytesIO()
    c = canvas.Canvas(out, pagesize=RL_A4, invariant=1)
    c.drawString(56, 780, "FORMULIR PENDAFTARAN")
    c.drawString(56, 740, "Nama:")
    c.acroForm.textfield(name="nama", value="Siti Rahayu", x=120, y=730, width=250, height=20)
    c.drawString(56, 700, "Setuju:")
    c.acroForm.checkbox(name="setuju", checked=True, x=120, y=695, size=16)
    c.drawString(56, 660, "Formasi:")
    c.acroForm.choice(name="formasi", value="Guru", options=["Guru", "Perawat", "Dokter"],
                      x=120, y=650, width=150, height=20)
    c.linkURL("https://example.org/syarat", (56, 600, 300, 620), relative=0)
    c.drawString(56, 605, "Syarat dan ketentuan")
    c.save()
    # reportlab draws no text annotations: add a note with pikepdf, as an editor would
    import pikepdf

    pdf = pikepdf.open(io.BytesIO(out.getvalue()))
    page = pdf.pages[0]
    note = pdf.make_indirect(pikepdf.Dictionary(Type=pikepdf.Name.Annot, Subtype=pikepdf.Name.Text,
                                                Rect=[400, 760, 420, 780], Contents="catatan pemeriksa"))
    annots = page.obj.get("/Annots")
    if annots is None:
        page.obj["/Annots"] = pdf.make_indirect(pikepdf.Array([note]))
    else:
        annots.append(note)
    rewritten = io.BytesIO()
    pdf.save(rewritten, deterministic_id=True)
    return rewritten.getvalue()


def pymupdf_letter() -> bytes:
    """A one-page A4 letter as PyMuPDF writes it (the file of the reported failure)."""
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=A4[0], height=A4[1])
    y = 72
    for line in LETTER_LINES:
        page.insert_text((56, y), line, fontsize=11, fontname="helv")
        y += 16
    data = doc.tobytes()
    doc.close()
    return data


def free_head_generation_65536(data: bytes) -> bytes:
    """``data`` (a classic table) with the free-list head of generation 65536 (``0000000000 65536 f``), the
    same length as 65535: every offset stays right. qpdf and poppler read it without a warning; pyHanko's
    strict reader refuses it ("Illegal generation 65536 for object ID 0")."""
    head = b"0000000000 65535 f"
    if head not in data:
        raise RuntimeError("no classic cross-reference table with a free-list head of 65535")
    return data.replace(head, b"0000000000 65536 f", 1)


def pymupdf_letter_generation_65536() -> bytes:
    """PyMuPDF's letter as the file of the reported failure had it: accepted at intake, then
    ``PDF_MALFORMED`` in the worker. The MuPDF here (1.28) writes 65535; the channel's file, from
    another version, carried 65536."""
    return free_head_generation_65536(pymupdf_letter())


def pymupdf_annotated() -> bytes:
    """PyMuPDF's letter with a highlight, a note and a form field (widget), saved compressed."""
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=A4[0], height=A4[1])
    page.insert_text((56, 72), LETTER_LINES[0], fontsize=11, fontname="helv")
    page.add_highlight_annot(pymupdf.Rect(54, 60, 200, 76))
    page.add_text_annot((400, 80), "diperiksa")
    widget = pymupdf.Widget()
    widget.field_name, widget.field_type = "nip", pymupdf.PDF_WIDGET_TYPE_TEXT
    widget.rect, widget.field_value = pymupdf.Rect(56, 120, 300, 140), "198001012005011001"
    page.add_widget(widget)
    data = doc.tobytes(garbage=3, deflate=True)
    doc.close()
    return data


def pypdf_letter() -> bytes:
    """reportlab's letter rewritten by pypdf, with a free-text annotation pypdf adds."""
    from pypdf import PdfReader, PdfWriter
    from pypdf.annotations import FreeText

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(reportlab_letter())))
    writer.add_annotation(page_number=0, annotation=FreeText(text="salinan", rect=(400, 700, 520, 730)))
    writer.add_metadata({"/Producer": "pypdf"})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _png(width: int, height: int) -> bytes:
    """A grey-scale PNG of a few text-like bars, by hand (no image library needed)."""
    rows = []
    for y in range(height):
        ink = (y // 12) % 3 == 0 and 40 < y < height - 40
        row = bytes(60 if ink and 30 < x < width - 30 and (x // 7) % 5 else 250 for x in range(width))
        rows.append(b"\x00" + row)
    raw = zlib.compress(b"".join(rows), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def img2pdf_scan() -> bytes:
    """A scanned page: one image on an A4 page, as img2pdf wraps it."""
    import img2pdf

    layout = img2pdf.get_layout_fun((img2pdf.mm_to_pt(210), img2pdf.mm_to_pt(297)))
    return img2pdf.convert(_png(620, 877), layout_fun=layout)


# --- command-line producers ------------------------------------------------------------------------


_POSTSCRIPT = """%!PS-Adobe-3.0
%%BoundingBox: 0 0 595 842
<< /PageSize [595 842] >> setpagedevice
/Helvetica findfont 11 scalefont setfont
{lines}
showpage
"""


def ps2pdf_letter() -> bytes:
    """Ghostscript's ps2pdf from a PostScript letter."""
    ps2pdf = _tool("ps2pdf", "ghostscript")
    lines = "\n".join(f"56 {780 - 16 * i} moveto ({text}) show" for i, text in enumerate(LETTER_LINES))
    with tempfile.TemporaryDirectory(prefix="bubuh-ps2pdf-") as tmp:
        src, dst = Path(tmp) / "letter.ps", Path(tmp) / "letter.pdf"
        src.write_text(_POSTSCRIPT.format(lines=lines))
        _run([ps2pdf, "-sPAPERSIZE=a4", str(src), str(dst)], cwd=tmp)
        return dst.read_bytes()


_HTML = """<!doctype html><html><head><meta charset="utf-8"><style>
@page {{ size: A4; margin: 20mm }} body {{ font-family: sans-serif; font-size: 11pt }}
</style></head><body><h1>{title}</h1>{paragraphs}<p><a href="https://example.org">tautan</a></p></body></html>"""


def chromium_letter() -> bytes:
    """Chromium's print-to-PDF (Skia's PDF backend) of an HTML letter, headless, loopback only."""
    chromium = _tool("chromium", "chromium")
    html = _HTML.format(title=LETTER_LINES[0], paragraphs="".join(f"<p>{t}</p>" for t in LETTER_LINES[1:]))
    with tempfile.TemporaryDirectory(prefix="bubuh-chromium-") as tmp:
        src, dst = Path(tmp) / "letter.html", Path(tmp) / "letter.pdf"
        src.write_text(html)
        _run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp}/profile", "--no-pdf-header-footer", f"--print-to-pdf={dst}",
              src.as_uri()], cwd=tmp)
        if not dst.exists():
            raise RuntimeError("chromium wrote no PDF")
        return dst.read_bytes()


def _qpdf(data: bytes, *args: str) -> bytes:
    qpdf = _tool("qpdf", "qpdf")
    with tempfile.TemporaryDirectory(prefix="bubuh-qpdf-") as tmp:
        src, dst = Path(tmp) / "in.pdf", Path(tmp) / "out.pdf"
        src.write_bytes(data)
        _run([qpdf, *args, str(src), str(dst)])
        return dst.read_bytes()


def qpdf_object_streams() -> bytes:
    return _qpdf(reportlab_form(), "--object-streams=generate")


def qpdf_linearized() -> bytes:
    return _qpdf(reportlab_letter(), "--linearize")


def qpdf_decrypted() -> bytes:
    """Encrypted (AES-256, an owner password) and then decrypted by qpdf: what an applicant's unlocking tool gives."""
    locked = _qpdf(reportlab_letter(), "--encrypt", "baca", "pemilik", "256", "--")
    return _qpdf(locked, "--password=baca", "--decrypt")


# --- hand-broken cross-reference tables ------------------------------------------------------------


def _classic(data: bytes) -> bytes:
    """The file with a classic cross-reference table and no object streams (the shape hand-editing breaks)."""
    return _qpdf(data, "--object-streams=disable", "--compress-streams=y")


def _last_table(data: bytes) -> tuple[int, int]:
    start = data.rindex(b"\nxref") + 1
    return start, data.index(b"trailer", start)


def offsets_shifted(data: bytes, by: int = 3) -> bytes:
    """``data`` (a classic table last) with every in-use offset of its last table off by ``by`` bytes."""
    start, end = _last_table(data)
    table = re.sub(rb"(\d{10}) (\d{5}) n", lambda m: b"%010d %s n" % (int(m.group(1)) + by, m.group(2)),
                   data[start:end])
    return data[:start] + table + data[end:]


def xref_cut_out(data: bytes) -> bytes:
    """``data`` without its last cross-reference table; the trailer kept, ``startxref`` pointing at nothing."""
    start, end = _last_table(data)
    return data[:start] + data[end:]


def startxref_cut_off(data: bytes) -> bytes:
    """``data`` ending after its trailer: no ``startxref``, no ``%%EOF`` (an upload cut at its last line)."""
    return data[:data.rindex(b"startxref")]


def broken_xref_offsets() -> bytes:
    """The form, every in-use offset of its cross-reference table off by 3 bytes: viewers recover by scanning."""
    return offsets_shifted(_classic(reportlab_form()))


def missing_xref() -> bytes:
    return xref_cut_out(_classic(reportlab_letter()))


def truncated_startxref() -> bytes:
    return startxref_cut_off(_classic(reportlab_letter()))


PRODUCERS: dict[str, Callable[[], bytes]] = {
    "reportlab": reportlab_letter,
    "reportlab-form-annotations": reportlab_form,
    "pymupdf-letter": pymupdf_letter,
    "pymupdf-letter-generation-65536": pymupdf_letter_generation_65536,
    "pymupdf-annotations-widget": pymupdf_annotated,
    "pypdf": pypdf_letter,
    "img2pdf-scan": img2pdf_scan,
    "ps2pdf": ps2pdf_letter,
    "chromium-print": chromium_letter,
    "qpdf-object-streams": qpdf_object_streams,
    "qpdf-linearized": qpdf_linearized,
    "qpdf-decrypted": qpdf_decrypted,
    "broken-xref-offsets": broken_xref_offsets,
    "missing-xref": missing_xref,
    "truncated-startxref": truncated_startxref,
}

# the ones the incremental update of the input would inherit damage from: stamped on a rewrite
NEEDS_REWRITE = {"pymupdf-letter-generation-65536", "broken-xref-offsets", "missing-xref", "truncated-startxref"}
