import hashlib

import pytest

from loadtests import corpus
from services.kernel.document_profiles import A4_PT, PROFILES
from services.kernel.errors import BubuhError
from services.stamping.document.inspection import inspect

BOX = (400.0, 60.0, 560.0, 130.0)


def _code(data, profile="standard", page=1, box=BOX):
    with pytest.raises(BubuhError) as info:
        inspect(data, profile, page, box)
    return info.value


@pytest.mark.parametrize("item", corpus.poison(), ids=lambda item: item.name)
def test_poison_is_refused_with_its_code(item):
    err = _code(item.data, item.profile)
    assert err.code.code == item.expected_code, err.detail
    assert err.detail  # a human-readable reason for the channel


def test_deep_nesting_is_not_a_recursion_error():
    # a file nested far deeper than the default recursion limit
    err = _code(corpus.deeply_nested(200_000))
    assert err.code.code == "PDF_TOO_COMPLEX"


def test_size_is_checked_before_parsing():
    # junk after a valid header, too big: the size answer must come first (nothing parsed)
    data = b"%PDF-1.7\n" + b"\x00" * (PROFILES["cpns"].max_bytes + 1)
    assert _code(data, "cpns").code.code == "PDF_TOO_LARGE"


def test_good_a4_facts():
    data = corpus.a4_text(1, pages=2)
    facts = inspect(data, "cpns", 2, BOX)
    assert facts.page_count == 2
    assert facts.pdf_version == "1.7"
    assert facts.sha256 == hashlib.sha256(data).hexdigest()
    assert facts.has_signatures is False
    assert facts.size_bytes == len(data)
    for w, h in facts.page_sizes:
        assert w == pytest.approx(A4_PT[0], abs=0.01) and h == pytest.approx(A4_PT[1], abs=0.01)


def test_landscape_a4_and_object_streams_pass_cpns():
    data = corpus.a4_text(2, page_size=(A4_PT[1], A4_PT[0]), object_streams=True)
    assert inspect(data, "cpns", 1, (700, 40, 820, 100)).page_count == 1


def test_scan_passes_cpns():
    facts = inspect(corpus.scan_800k(), "cpns", 1, BOX)
    assert 700_000 < facts.size_bytes <= PROFILES["cpns"].max_bytes


def test_letter_size_is_fine_for_standard_profile():
    assert inspect(corpus.a4_text(4, page_size=(612, 792)), "standard", 1, BOX).page_count == 1


def test_presigned_document_is_reported_as_signed(presigned_doc):
    assert inspect(presigned_doc.data, "cpns", 1, BOX).has_signatures is True


def test_unknown_profile():
    assert _code(corpus.a4_text(), "gold").code.code == "PROFILE_UNKNOWN"


@pytest.mark.parametrize("page, box", [
    (0, BOX), (2, BOX), (-1, BOX), ("1", BOX), (True, BOX),
    (1, (400, 60, 400, 130)),  # zero width
    (1, (560, 60, 400, 130)),  # upside down
    (1, (400, 60, 410, 70)),  # too small for a QR code
    (1, (500, 60, 700, 130)),  # beyond the right edge
    (1, (-10, 60, 100, 130)),  # left of the page
    (1, (400, 800, 560, 900)),  # above the top
    (1, (float("nan"), 60, 560, 130)),
    (1, (400, 60, 560)),
    (1, "400,60,560,130"),
])
def test_bad_placement(page, box):
    assert _code(corpus.a4_text(), "standard", page, box).code.code == "PLACEMENT_INVALID"


def test_box_must_be_inside_cropbox():
    import io

    import pikepdf

    pdf = pikepdf.open(io.BytesIO(corpus.a4_text()))
    pdf.pages[0].obj.CropBox = pikepdf.Array([50, 50, 500, 700])
    out = io.BytesIO()
    pdf.save(out)
    data = out.getvalue()
    assert inspect(data, "standard", 1, (300, 60, 480, 130)).page_count == 1
    assert _code(data, "standard", 1, BOX).code.code == "PLACEMENT_INVALID"  # urx 560 > crop 500
