import random

import pikepdf
import pytest
import segno

from services.stamping.document.appearance import (
    QR_ERROR,
    QR_MASK,
    STAMP_TEXT_LINES,
    QrTemplate,
    StampArtist,
    text_width,
    verification_url,
)
from services.stamping.serial import CROCKFORD, SerialIssuer

BASE = "https://verify.bubuh.example"


def _segno_rows(payload, version):
    code = segno.make_qr(payload, error=QR_ERROR, mask=QR_MASK, boost_error=False, mode="byte", version=version)
    return [bytes(r) for r in code.matrix]


@pytest.mark.parametrize("base", [BASE, "http://localhost:8080", "https://verifikasi.meterai-elektronik.bubuh.example/a/b"])
def test_qr_template_equals_segno(base):
    prefix = verification_url(base, "")
    template = QrTemplate(prefix)
    rng = random.Random(1)
    issuer = SerialIssuer(12)
    sns = [issuer.next() for _ in range(50)] + ["".join(rng.choice(CROCKFORD) for _ in range(22)) for _ in range(150)]
    for sn in sns:
        assert template.rows(sn) == _segno_rows(prefix + sn, template.version), sn


def test_qr_version_is_small():
    # 33x33 modules at level M: large modules, easy to scan from a printed stamp
    template = QrTemplate(verification_url(BASE, ""))
    assert template.version == 4 and template.size == 33


def test_other_lengths_fall_back_to_segno():
    template = QrTemplate(verification_url(BASE, ""))
    for sn in ["SHORT", "X" * 30]:
        assert template.rows(sn) == [bytes(r) for r in segno.make_qr(
            verification_url(BASE, sn), error=QR_ERROR, mask=QR_MASK, boost_error=False, mode="byte",
            version=None if len(verification_url(BASE, sn)) > 62 else 4).matrix]


@pytest.mark.parametrize("size", [(160, 70), (300, 90), (90, 140), (60, 60), (400, 40)])
def test_text_stays_inside_the_box(size):
    width, height = size
    artist = StampArtist(BASE)
    sn = SerialIssuer(1).next()
    content = artist.content(sn, width, height)
    shown = []
    owner = pikepdf.new()  # keep the owning Pdf alive while the stream is parsed
    for operands, op in pikepdf.parse_content_stream(pikepdf.Stream(owner, content)):
        if str(op) == "Tf":
            font_size = float(operands[1])
        elif str(op) == "Tm":
            x, y = float(operands[4]), float(operands[5])
        elif str(op) == "Tj":
            text = bytes(operands[0]).decode("latin-1")
            bold = text in STAMP_TEXT_LINES[:2]
            assert 0 <= x and x + text_width(text, bold) * font_size <= width + 0.01, (text, size)
            assert 0 <= y <= height, (text, size)
            shown.append(text)
    assert shown == [*STAMP_TEXT_LINES, sn]
