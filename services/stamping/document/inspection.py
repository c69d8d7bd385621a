"""Input checks before a stamp request is accepted.

Why a separate, early step: a document that cannot be stamped must be refused at the
door with a code the channel can act on (``PDF_ENCRYPTED``, ``PLACEMENT_INVALID``...),
before a unit of quota is reserved and long before a worker spends a signature on it.
A worker that meets a bad file after acceptance has to release the reservation and
dead-letter the request; cheaper and clearer to never accept it.

The checks run on qpdf (pikepdf), an independent parser from pyHanko's: a file that
qpdf can only read by *repairing* it (lost header, absurd nesting, objects cut short) is
refused as ``PDF_MALFORMED``, because the stamp is an incremental update appended to the
original bytes and would inherit the damage. One repair is ours to make: a damaged
cross-reference table (wrong offsets, a table or ``startxref`` cut off) that qpdf rebuilt
from objects that are all there. Such a file is accepted when it carries no signature,
and the worker stamps a rewrite of it (``repair.py``); signed, it stays ``PDF_MALFORMED``
(a rewrite would break the signature) and must be re-exported by its owner.

Order matters: the size limit is checked before any parsing (a 50 MB upload must not
cost a parse), then the budgets (``budget.py``: inflated bytes and object count, by a
streaming pass over the raw bytes) before qpdf inflates anything, and nothing here
recurses in Python on document structure. Nesting deeper than the budget stops qpdf's
parser (``parser_max_nesting``), and inflating more than the object-stream budget
stops its decoder (``flate_max_memory``); both are process-wide, and only this module
sets them (the worker's repair, ``repair.py``, reads only files that passed them). Every
object is parsed once, so neither can hide in an unreferenced object. Over a budget is ``PDF_TOO_COMPLEX``.

Coordinates: pages are numbered from 1; the box is ``(llx, lly, urx, ury)`` in PDF points
in the page's default user space (before ``/Rotate``), the convention pyHanko's
``SigFieldSpec`` and the existing channel API (visLLX...) use.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import pikepdf
import pikepdf.settings

from services.kernel import errors
from services.kernel.document_profiles import PROFILES, Profile
from services.kernel.errors import BubuhError
from services.stamping.document import budget as budgets
from services.stamping.document import repair
from services.stamping.document.budget import Budget
from services.stamping.document.repair import qpdf_message as _clean

HEADER_WINDOW = 1024  # readers accept the %PDF- header anywhere in the first KiB

# qpdf warnings that mean "I had to guess what this file is": refuse, do not stamp on top.
_FATAL_WARNINGS = (
    "file is damaged",
    "reconstruct",
    "xref not found",
    "startxref",
    "can't find pdf header",
    "non-dictionary object",
    "loop detected",
)
# qpdf warnings that mean "one of the limits we gave it stopped the parse"
_BUDGET_WARNINGS = (
    "limits error",
    "deeply nested",
    "memory limit exceeded",
)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class PageFacts:
    number: int  # 1-based
    mediabox: Box
    cropbox: Box
    rotate: int

    @property
    def size(self) -> tuple[float, float]:
        """Width and height of the media box in points (before rotation)."""
        return (self.mediabox[2] - self.mediabox[0], self.mediabox[3] - self.mediabox[1])

    @property
    def visible(self) -> Box:
        """The part of the page a viewer shows: crop box clipped to the media box."""
        m, c = self.mediabox, self.cropbox
        return (max(m[0], c[0]), max(m[1], c[1]), min(m[2], c[2]), min(m[3], c[3]))


@dataclass(frozen=True)
class DocumentFacts:
    size_bytes: int
    sha256: str  # hex digest of the input as received
    pdf_version: str
    page_count: int
    pages: tuple[PageFacts, ...]
    has_signatures: bool
    warnings: tuple[str, ...] = ()  # benign qpdf warnings (e.g. a page without /Resources)
    xref_damaged: bool = False  # qpdf rebuilt the cross-reference table: the worker stamps a rewrite (repair.py)

    @property
    def page_sizes(self) -> tuple[tuple[float, float], ...]:
        return tuple(p.size for p in self.pages)


def _box(value, what: str) -> Box:
    try:
        nums = [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise BubuhError(errors.PDF_MALFORMED, f"{what} is not an array of numbers") from exc
    if len(nums) != 4 or not all(math.isfinite(n) for n in nums):
        raise BubuhError(errors.PDF_MALFORMED, f"{what} is not a rectangle")
    x0, x1 = sorted((nums[0], nums[2]))
    y0, y1 = sorted((nums[1], nums[3]))
    return (x0, y0, x1, y1)


def _version_tuple(text: str) -> tuple[int, int]:
    major, _, minor = text.strip().lstrip("/").partition(".")
    return int(major), int(minor or 0)


def _open(data: bytes) -> pikepdf.Pdf:
    try:
        return pikepdf.open(io.BytesIO(data))
    except pikepdf.PasswordError as exc:
        raise BubuhError(errors.PDF_ENCRYPTED, "the PDF requires a password to open") from exc
    except RecursionError as exc:
        raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
    except pikepdf.PdfError as exc:
        raise BubuhError(errors.PDF_MALFORMED, f"cannot parse: {_clean(str(exc))}") from exc
    except Exception as exc:  # qpdf may raise plain exceptions (e.g. RuntimeError) on junk
        raise BubuhError(errors.PDF_MALFORMED, f"cannot parse: {type(exc).__name__}") from exc


def _facts(pdf: pikepdf.Pdf, data: bytes) -> DocumentFacts:
    pages = []
    for index, page in enumerate(pdf.pages):
        mediabox = _box(page.mediabox, f"page {index + 1} /MediaBox")
        cropbox = _box(page.cropbox, f"page {index + 1} /CropBox")
        rotate = page.obj.get("/Rotate", 0)
        try:
            rotate = int(rotate) % 360
        except (TypeError, ValueError):
            rotate = 0
        pages.append(PageFacts(index + 1, mediabox, cropbox, rotate))
    has_signatures = repair.has_signatures(pdf)
    version = pdf.pdf_version
    catalog_version = pdf.Root.get("/Version")
    if isinstance(catalog_version, pikepdf.Name):
        try:
            if _version_tuple(str(catalog_version)) > _version_tuple(version):
                version = str(catalog_version).lstrip("/")
        except ValueError:
            pass
    warnings = tuple(_clean(w) for w in pdf.get_warnings())
    for w in warnings:
        if any(marker in w.lower() for marker in _BUDGET_WARNINGS):
            raise BubuhError(errors.PDF_TOO_COMPLEX, f"over a parsing limit: {w}")
    fatal = [w for w in warnings if any(marker in w.lower() for marker in _FATAL_WARNINGS)]
    xref_only = repair.xref_damage_only(warnings)
    if fatal and not (xref_only and not has_signatures):
        why = "; a rewrite would break its signature" if xref_only else ""
        raise BubuhError(errors.PDF_MALFORMED, f"damaged file: {fatal[0]}{why}")
    if not pages:
        raise BubuhError(errors.PDF_MALFORMED, "the document has no pages")
    return DocumentFacts(
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        pdf_version=version,
        page_count=len(pages),
        pages=tuple(pages),
        has_signatures=has_signatures,
        warnings=warnings,
        xref_damaged=bool(fatal),
    )


def _check_profile(facts: DocumentFacts, profile: Profile) -> None:
    if profile.min_pdf_version is not None:
        try:
            ok = _version_tuple(facts.pdf_version) >= profile.min_pdf_version
        except ValueError:
            ok = False
        if not ok:
            want = "{}.{}".format(*profile.min_pdf_version)
            raise BubuhError(errors.PROFILE_VIOLATION,
                             f"profile {profile.name} needs PDF {want} or later; this file is PDF {facts.pdf_version}")
    if profile.page_size_pt is not None:
        want_w, want_h = profile.page_size_pt
        tol = profile.page_size_tolerance_pt
        for page in facts.pages:
            w, h = page.size
            portrait = abs(w - want_w) <= tol and abs(h - want_h) <= tol
            landscape = abs(w - want_h) <= tol and abs(h - want_w) <= tol
            if not (portrait or landscape):
                raise BubuhError(
                    errors.PROFILE_VIOLATION,
                    f"profile {profile.name} needs {want_w:.0f}x{want_h:.0f} pt pages (A4); "
                    f"page {page.number} is {w:.1f}x{h:.1f} pt",
                )


def check_placement(facts: DocumentFacts, page: int, box, min_side_pt: float = 0.0) -> None:
    """Raise PLACEMENT_INVALID unless ``box`` is a proper rectangle inside page ``page``'s visible area."""
    if isinstance(page, bool) or not isinstance(page, int) or not 1 <= page <= facts.page_count:
        raise BubuhError(errors.PLACEMENT_INVALID,
                         f"page {page!r} does not exist; the document has {facts.page_count} page(s)")
    try:
        llx, lly, urx, ury = (float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise BubuhError(errors.PLACEMENT_INVALID, "box must be four numbers (llx, lly, urx, ury)") from exc
    if not all(math.isfinite(v) for v in (llx, lly, urx, ury)):
        raise BubuhError(errors.PLACEMENT_INVALID, "box coordinates must be finite numbers")
    if urx - llx < max(min_side_pt, 1e-6) or ury - lly < max(min_side_pt, 1e-6):
        raise BubuhError(errors.PLACEMENT_INVALID,
                         f"box {llx:g},{lly:g},{urx:g},{ury:g} is degenerate or smaller than "
                         f"{min_side_pt:g} pt on a side (needs llx < urx and lly < ury)")
    vx0, vy0, vx1, vy1 = facts.pages[page - 1].visible
    eps = 1e-3
    if llx < vx0 - eps or lly < vy0 - eps or urx > vx1 + eps or ury > vy1 + eps:
        raise BubuhError(errors.PLACEMENT_INVALID,
                         f"box {llx:g},{lly:g},{urx:g},{ury:g} lies outside page {page}'s visible area "
                         f"{vx0:g},{vy0:g},{vx1:g},{vy1:g}")


def profile_named(name: str) -> Profile:
    profile = PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        raise BubuhError(errors.PROFILE_UNKNOWN, f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return profile


def _parse_all(pdf: pikepdf.Pdf) -> None:
    """Have qpdf parse every object once (its nesting limit applies to each, referenced or not)."""
    for _ in pdf.objects:
        pass


def _qpdf_limits(budget: Budget) -> None:
    """qpdf's global limits from the budget (set once: only inspection sets them; the signing child's
    repair reads files that passed them here)."""
    want = {"parser_max_nesting": budget.max_nesting, "flate_max_memory": budget.max_object_stream_bytes}
    now = pikepdf.settings.get_qpdf_limits()
    if any(now[k] != v for k, v in want.items()):
        pikepdf.settings.set_qpdf_limits(**want)


def inspect(data: bytes, profile: str, page: int, box, budget: Budget | None = None) -> DocumentFacts:
    """Check ``data`` against ``profile``, the budgets and the requested placement; return what we learned.

    Raises ``BubuhError`` with PROFILE_UNKNOWN, PDF_INVALID, PDF_TOO_LARGE, PDF_TOO_COMPLEX,
    PDF_ENCRYPTED, PDF_MALFORMED, PROFILE_VIOLATION or PLACEMENT_INVALID.
    """
    budget = budget or Budget()
    prof = profile_named(profile)
    if not data:
        raise BubuhError(errors.PDF_INVALID, "the file is empty")
    if b"%PDF-" not in data[:HEADER_WINDOW]:
        raise BubuhError(errors.PDF_INVALID, "no %PDF- header in the first 1024 bytes")
    if len(data) > prof.max_bytes:
        raise BubuhError(errors.PDF_TOO_LARGE,
                         f"{len(data)} bytes; profile {prof.name} allows {prof.max_bytes} bytes")
    budgets.check(data, budget)
    _qpdf_limits(budget)
    pdf = _open(data)
    try:
        if pdf.is_encrypted:
            raise BubuhError(errors.PDF_ENCRYPTED, "the PDF is encrypted (even if it opens without a password)")
        try:
            _parse_all(pdf)
            facts = _facts(pdf, data)
        except BubuhError:
            raise
        except RecursionError as exc:
            raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
        except Exception as exc:  # anything qpdf trips over while walking pages
            raise BubuhError(errors.PDF_MALFORMED, f"cannot read page tree: {_clean(str(exc))}") from exc
    finally:
        pdf.close()
    _check_profile(facts, prof)
    check_placement(facts, page, box, prof.min_box_side_pt)
    if facts.has_signatures:
        _signed_and_readable(data, page)
    return facts


def _signed_and_readable(data: bytes, page: int) -> None:
    """A signed file must be one pyHanko reads as it is: the worker may not rewrite it (``repair.py``), so
    one its reader refuses is refused here, at the door, not after its unit was reserved."""
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.pdf_utils.misc import PdfDecodeLimitError, PdfReadError

    try:
        IncrementalPdfFileWriter(io.BytesIO(data)).find_page_for_modification(page - 1)
    except PdfDecodeLimitError as exc:
        raise BubuhError(errors.PDF_TOO_COMPLEX, f"over a decoding limit: {exc}") from exc
    except PdfReadError as exc:
        raise BubuhError(errors.PDF_MALFORMED, f"the signing library cannot read it ({str(exc)[:200]}) and it "
                                               "carries a signature, which rewriting it would break") from exc
