"""Intake's budgets (issue 11): a document that would cost too much to parse is refused with
PDF_TOO_COMPLEX, quickly and without inflating it; ordinary documents pass untouched."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from loadtests import corpus
from services.kernel.errors import BubuhError
from services.stamping.document import budget as budgets
from services.stamping.document.budget import Budget
from services.stamping.document.inspection import inspect

BOX = (400.0, 60.0, 560.0, 130.0)
MB = 1024 * 1024


def _refused(data: bytes, budget: Budget | None = None) -> tuple[BubuhError, float, int]:
    """The refusal, the CPU seconds it took and the peak of Python allocations meanwhile."""
    tracemalloc.start()
    started = time.process_time()
    try:
        with pytest.raises(BubuhError) as info:
            inspect(data, "standard", 1, BOX, budget)
        return info.value, time.process_time() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def object_stream_bomb() -> bytes:
    return corpus.inflating(600 * MB, where="object-stream")


def test_a_small_file_whose_object_stream_inflates_to_600_mb_is_refused_cheaply(object_stream_bomb):
    assert len(object_stream_bomb) < 700_000
    err, cpu, peak = _refused(object_stream_bomb)
    assert err.code.code == "PDF_TOO_COMPLEX" and "object streams" in err.detail
    assert cpu < 1.0, f"{cpu:.2f} s of CPU"           # it stops at the 32 MiB budget, not at 600 MB
    assert peak < 8 * MB, f"{peak} bytes held"        # inflated in pieces, never whole


@pytest.mark.parametrize("make", [lambda: corpus.inflating(600 * MB, where="content"),
                                  lambda: corpus.nested_flate(600 * MB)], ids=["content-stream", "flate-twice"])
def test_any_stream_counts_against_the_total(make):
    err, cpu, peak = _refused(make(), Budget(max_decoded_bytes=64 * MB))
    assert err.code.code == "PDF_TOO_COMPLEX" and "streams inflate" in err.detail
    assert cpu < 1.0 and peak < 8 * MB, (cpu, peak)


def test_the_default_total_refuses_a_600_mb_content_stream_too():
    err, cpu, _ = _refused(corpus.inflating(600 * MB, where="content"))
    assert err.code.code == "PDF_TOO_COMPLEX" and cpu < 3.0, (err.detail, cpu)


def test_a_dictionary_that_misleads_the_scan_is_still_refused(object_stream_bomb, monkeypatch):
    # a string after /Filter that looks like an object header hides the filter and the type from the scan
    fooled = corpus.inflating(600 * MB, where="object-stream", extra=b" /X (9 0 obj)")
    err, cpu, peak = _refused(fooled)
    assert err.code.code == "PDF_TOO_COMPLEX" and cpu < 2.0 and peak < 8 * MB, (err.detail, cpu, peak)
    # and with no scan at all, qpdf's own Flate limit (flate_max_memory) stops at the same budget
    monkeypatch.setattr(budgets, "check", lambda data, budget: budgets.Spent())
    err, cpu, _ = _refused(object_stream_bomb)
    assert err.code.code == "PDF_TOO_COMPLEX" and "memory limit" in err.detail and cpu < 1.0, (err.detail, cpu)


def test_object_count_and_nesting_have_budgets():
    letter = corpus.a4_text(1, pages=40, object_streams=True)   # 84 objects, the dictionaries in object streams
    spent = budgets.check(letter, Budget())
    assert spent.objects >= 84
    err, _, _ = _refused(letter, Budget(max_objects=50))
    assert err.code.code == "PDF_TOO_COMPLEX" and "objects" in err.detail
    err, _, _ = _refused(corpus.deeply_nested(65), Budget(max_nesting=64))
    assert err.code.code == "PDF_TOO_COMPLEX" and "nest" in err.detail
    inspect(corpus.deeply_nested(40), "standard", 1, BOX, Budget(max_nesting=64))


def test_deep_nesting_counts_even_in_an_object_nothing_refers_to():
    doc = corpus._raw_pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595.276 841.89] /Resources << >> >>",
        b"[" * 100 + b"]" * 100,   # object 4: in the xref table, referenced by nothing
    ])
    err, _, _ = _refused(doc, Budget(max_nesting=64))
    assert err.code.code == "PDF_TOO_COMPLEX"


@pytest.mark.parametrize("name, data", [
    ("letter", corpus.a4_text(3)),
    ("letter-object-streams", corpus.a4_text(3, pages=5, object_streams=True)),
    ("scan-800k", corpus.scan_800k(1)),
    ("presigned", corpus.presigned(4).data),
    ("8-MB-of-zeros-in-a-content-stream", corpus.inflating(8 * MB, where="content")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_ordinary_documents_pass_within_the_budgets(name, data):
    started = time.process_time()
    facts = inspect(data, "standard", 1, BOX)
    assert facts.page_count >= 1 and time.process_time() - started < 0.5, name
