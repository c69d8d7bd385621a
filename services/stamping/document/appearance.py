"""The visible e-Meterai stamp: QR code to the public verification page, and its words.

Why we draw it ourselves instead of using pyHanko's ``QRStampStyle``: that style
lays text out through pyHanko's generic text box and encodes the QR with ``qrcode``,
which tries all eight masks and re-creates fonts and resources for every stamp; at a
few hundred stamps per second per core that is most of the budget. Here everything
that does not depend on the SN is computed once per process (font resources, text
widths from the Core 14 metrics, the stream dictionary template), and the QR code is
encoded by segno with a fixed version floor, error level and mask (mask choice only
changes how easy the symbol is to read for marginal scanners; any mask is valid).

The design follows the issuer's public description: a QR code taking most of the
stamp, "METERAI ELEKTRONIK", the value "10000", "SEPULUH RIBU RUPIAH" and the SN.
Fonts are the standard Helvetica and Helvetica-Bold (not embedded: every conforming
reader has them, and embedding would add kilobytes to every stamped document).
"""

from __future__ import annotations

import re

import segno
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.generic import pdf_name

STAMP_TEXT_LINES = ("METERAI ELEKTRONIK", "10000", "SEPULUH RIBU RUPIAH")
QR_ERROR = "m"  # 15% recovery: survives a smudge or a staple, keeps the symbol small
QR_MASK = 0
QR_MIN_VERSION = 4  # 33x33 modules: holds a 60-character URL at level M
QR_QUIET_ZONE = 2  # modules of white around the code (ISO asks 4; the stamp's own white box adds more)


def verification_url(verify_base_url: str, sn: str) -> str:
    """The public page a QR scan opens; the SN alone identifies the stamp."""
    return f"{verify_base_url.rstrip('/')}/v1/verify/{sn}"


# Advance widths (1/1000 em) from Adobe's Core 14 AFM files (Helvetica, Helvetica-Bold) for
# the characters a stamp uses; anything else falls back to the width of "M" (never too narrow).
_DIGITS = {c: 556 for c in "0123456789"}
_HELVETICA = {**_DIGITS, " ": 278, "-": 333, ".": 278, "/": 278, **dict(zip(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    (667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778, 667, 778, 722, 667, 611,
     722, 667, 944, 667, 667, 611), strict=True))}
_HELVETICA_BOLD = {**_DIGITS, " ": 278, "-": 333, ".": 278, "/": 278, **dict(zip(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    (722, 722, 722, 722, 667, 611, 778, 722, 278, 556, 722, 611, 833, 722, 778, 667, 778, 722, 667, 611,
     722, 667, 944, 667, 667, 611), strict=True))}


def text_width(text: str, bold: bool = False) -> float:
    """Width of ``text`` at font size 1, in text space units."""
    table = _HELVETICA_BOLD if bold else _HELVETICA
    return sum(table.get(ch, 833) for ch in text) / 1000.0


def qr_rows(payload: str, version: int | None = None) -> tuple[bytearray, ...]:
    """QR module matrix (1 = dark), without quiet zone, straight from segno."""
    code = segno.make_qr(payload, error=QR_ERROR, mask=QR_MASK, boost_error=False, mode="byte",
                         version=version or (None if len(payload) > 62 else QR_MIN_VERSION))
    return code.matrix


def _matrix_bits(rows) -> int:
    value = 0
    for row in rows:
        for module in row:
            value = (value << 1) | (module & 1)
    return value


class QrTemplate:
    """QR codes for ``prefix + SN`` with a fixed SN length, in microseconds instead of a millisecond.

    With version, error level, encoding mode and mask all fixed, every module of a QR symbol
    is an affine function over GF(2) of the payload's bits: the data codewords are the
    payload bits shifted into place, Reed-Solomon parity is linear over GF(2^8) (so over
    GF(2) too), and masking is an XOR with a constant. So ``matrix(payload)`` equals
    ``matrix(base) XOR`` the sum of one precomputed delta per payload bit that differs from
    ``base``. segno computes the base and the 8 x len(SN) deltas once; a stamp then costs a
    handful of big-integer XORs. The constructor checks the shortcut against segno on
    random payloads, and ``rows`` falls back to segno for any payload it cannot handle.
    """

    def __init__(self, prefix: str, sn_length: int = 22, sample_alphabet: str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"):
        self.prefix = prefix
        self.sn_length = sn_length
        base_sn = "0" * sn_length
        base = segno.make_qr(prefix + base_sn, error=QR_ERROR, mask=QR_MASK, boost_error=False, mode="byte",
                             version=None if len(prefix) + sn_length > 62 else QR_MIN_VERSION)
        self.version = base.version
        self.size = len(base.matrix)
        self._base_char = ord("0")
        self._base = _matrix_bits(base.matrix)
        self._bit_deltas: list[list[int]] = []
        for pos in range(sn_length):
            deltas = []
            for bit in range(8):
                sn = base_sn[:pos] + chr(self._base_char ^ (1 << bit)) + base_sn[pos + 1:]
                deltas.append(_matrix_bits(self._segno(prefix + sn)) ^ self._base)
            self._bit_deltas.append(deltas)
        self._char_deltas: dict[tuple[int, str], int] = {}
        import random

        rng = random.Random(0)
        for _ in range(8):
            sn = "".join(rng.choice(sample_alphabet) for _ in range(sn_length))
            if self.rows(sn) != [bytes(r) for r in self._segno(prefix + sn)]:
                raise RuntimeError("QR template disagrees with segno")

    def _segno(self, payload: str):
        return segno.make_qr(payload, error=QR_ERROR, mask=QR_MASK, boost_error=False, mode="byte",
                             version=self.version).matrix

    def _delta(self, pos: int, ch: str) -> int:
        key = (pos, ch)
        delta = self._char_deltas.get(key)
        if delta is None:
            diff = ord(ch) ^ self._base_char
            delta = 0
            for bit in range(8):
                if diff >> bit & 1:
                    delta ^= self._bit_deltas[pos][bit]
            self._char_deltas[key] = delta
        return delta

    def bits(self, sn: str) -> int:
        """The matrix as one integer, row-major, most significant bit = top-left module."""
        value = self._base
        for pos, ch in enumerate(sn):
            value ^= self._delta(pos, ch)
        return value

    def rows(self, sn: str) -> list[bytes]:
        if len(sn) != self.sn_length or not sn.isascii():
            return [bytes(r) for r in qr_rows(self.prefix + sn)]
        n = self.size
        text = format(self.bits(sn), f"0{n * n}b")
        return [bytes(1 if c == "1" else 0 for c in text[i:i + n]) for i in range(0, n * n, n)]

    def path(self, sn: str) -> bytes:
        """PDF path (module units, origin lower left) of the dark modules, one rectangle per run."""
        if len(sn) != self.sn_length or not sn.isascii():
            return _qr_path(qr_rows(self.prefix + sn))
        n = self.size
        text = format(self.bits(sn), f"0{n * n}b")
        parts = []
        for y in range(n):
            row = text[y * n:(y + 1) * n]
            yy = n - 1 - y
            parts.extend(b"%d %d %d 1 re" % (m.start(), yy, m.end() - m.start()) for m in _RUNS.finditer(row))
        parts.append(b"f")
        return b"\n".join(parts)


_RUNS = re.compile("1+")


def _qr_path(rows) -> bytes:
    """One rectangle per horizontal run of dark modules, in module units, y growing downwards."""
    n = len(rows)
    parts = []
    for y, row in enumerate(rows):
        yy = n - 1 - y
        text = "".join("1" if m else "0" for m in row)
        parts.extend(b"%d %d %d 1 re" % (m.start(), yy, m.end() - m.start()) for m in _RUNS.finditer(text))
    parts.append(b"f")
    return b"\n".join(parts)


def _fmt(value: float) -> bytes:
    return (b"%.3f" % value).rstrip(b"0").rstrip(b".") or b"0"


_LINE_STYLE = ((True, 1.0), (True, 1.15), (False, 1.0))  # (bold, relative size) per fixed line; SN: regular


class StampArtist:
    """Builds the appearance stream of one stamp; one instance per process, reused across documents."""

    def __init__(self, verify_base_url: str) -> None:
        self.verify_base_url = verify_base_url
        self.qr = QrTemplate(verification_url(verify_base_url, ""))
        # Direct (inline) font dictionaries: identical in every document, so built once and
        # serialised by the writer without a lookup per stamp.
        self._resources = generic.DictionaryObject({
            pdf_name("/Font"): generic.DictionaryObject({
                pdf_name("/FR"): _font("/Helvetica"),
                pdf_name("/FB"): _font("/Helvetica-Bold"),
            }),
        })
        self._widths = [text_width(t, bold) * size
                        for t, (bold, size) in zip(STAMP_TEXT_LINES, _LINE_STYLE, strict=True)]

    def content(self, sn: str, width: float, height: float) -> bytes:
        """The content stream for a ``width`` x ``height`` stamp (form space origin at lower left)."""
        qr_path = self.qr.path(sn)
        modules = self.qr.size + 2 * QR_QUIET_ZONE
        if len(sn) != self.qr.sn_length:  # fallback path: segno picked the version
            modules = len(qr_rows(verification_url(self.verify_base_url, sn))) + 2 * QR_QUIET_ZONE
        pad = min(width, height) * 0.04
        horizontal = width >= height * 1.2
        if horizontal:
            qr_side = min(height - 2 * pad, (width - 3 * pad) * 0.55)
            qr_x, qr_y = pad, (height - qr_side) / 2
            tx0, ty0 = qr_x + qr_side + pad, pad
            tw, th = width - tx0 - pad, height - 2 * pad
        else:
            qr_side = min(width - 2 * pad, (height - 3 * pad) * 0.6)
            qr_x, qr_y = (width - qr_side) / 2, height - pad - qr_side
            tx0, ty0 = pad, pad
            tw, th = width - 2 * pad, qr_y - 2 * pad
        module = qr_side / modules
        sn_width = text_width(sn)
        widest = max(max(self._widths), sn_width)
        # four lines at 1.2 leading; line 2 ("10000") is 15% larger
        size = max(1.0, min(tw / widest, th / (4 * 1.2 + 0.15)))
        ops = [
            b"q 1 g 0 0 %s %s re f Q" % (_fmt(width), _fmt(height)),  # white ground: QR needs contrast
            b"q 0.4 G 0.6 w 0.3 0.3 %s %s re S Q" % (_fmt(width - 0.6), _fmt(height - 0.6)),
            b"q 0 g %s 0 0 %s %s %s cm" % (
                _fmt(module), _fmt(module),
                _fmt(qr_x + QR_QUIET_ZONE * module), _fmt(qr_y + QR_QUIET_ZONE * module)),
            qr_path,
            b"Q",
            b"BT 0 g",
        ]
        lines = [*zip(STAMP_TEXT_LINES, _LINE_STYLE, strict=True), (sn, (False, 1.0))]
        block = sum(size * rel * 1.2 for _, (_, rel) in lines)
        y = ty0 + (th + block) / 2
        for text, (bold, rel) in lines:
            fs = size * rel
            y -= fs * 1.2
            x = tx0 + max(0.0, (tw - text_width(text, bold) * fs) / 2)  # centred in the text column
            ops.append(b"/%s %s Tf 1 0 0 1 %s %s Tm (%s) Tj" % (
                b"FB" if bold else b"FR", _fmt(fs), _fmt(x), _fmt(y + fs * 0.22), _pdf_string(text)))
        ops.append(b"ET")
        return b"\n".join(ops)

    def xobject(self, sn: str, width: float, height: float) -> generic.StreamObject:
        """A compressed form XObject, ready to be the widget's normal appearance (/AP /N)."""
        stream = generic.StreamObject({
            pdf_name("/Type"): pdf_name("/XObject"),
            pdf_name("/Subtype"): pdf_name("/Form"),
            pdf_name("/BBox"): generic.ArrayObject([
                generic.NumberObject(0), generic.NumberObject(0),
                generic.FloatObject(width), generic.FloatObject(height),
            ]),
            pdf_name("/Resources"): self._resources,
        }, stream_data=self.content(sn, width, height))
        stream.compress()
        return stream


def _pdf_string(text: str) -> bytes:
    raw = text.encode("cp1252", errors="replace")  # WinAnsiEncoding
    return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _font(base: str) -> generic.DictionaryObject:
    return generic.DictionaryObject({
        pdf_name("/Type"): pdf_name("/Font"),
        pdf_name("/Subtype"): pdf_name("/Type1"),
        pdf_name("/BaseFont"): pdf_name(base),
        pdf_name("/Encoding"): pdf_name("/WinAnsiEncoding"),
    })
