"""Rewriting an unsigned input that the stamp cannot be appended to as it is.

Why a rewrite at all: the stamp is an incremental update appended to the applicant's bytes, so the
bytes must be something pyHanko can read, and the update inherits whatever damage they carry. Real
files fail that in two ways that qpdf and poppler shrug off: a producer's quirk pyHanko's strict
reader refuses (a free-list head of generation 65536, as some PyMuPDF files carry), and a damaged
cross-reference table (wrong offsets, a table or ``startxref`` cut off) that viewers silently
rebuild by scanning the file. qpdf (pikepdf) reads both and writes a clean file with the same objects.

Why only unsigned input: a rewrite changes every byte an earlier signature covers, so it would break
the applicant's signature (the architecture allows repair only for unsigned input). A signed file
that needs one stays ``PDF_MALFORMED``; its owner must re-export it and sign again.

Why only damage to the cross-reference table: that is bookkeeping qpdf rebuilds from the objects
themselves, which are all there. A file whose objects are damaged too (cut in the middle of a stream,
``unexpected EOF``) has lost content; stamping a guess of it would attest a document nobody wrote.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import pikepdf

from services.kernel import errors
from services.kernel.errors import BubuhError

# qpdf's warnings when it rebuilt a cross-reference table from the objects (all of them found)
_XREF_DAMAGE = (
    "file is damaged",
    "attempting to reconstruct cross-reference table",
    "xref not found",
    "can't find startxref",
    "expected n n obj",
    "invalid xref entry",
    "xref stream",
    "xref table",
)


@dataclass(frozen=True)
class Rewritten:
    data: bytes
    sha256: str
    reason: str  # why the original could not be stamped as it was


def xref_damage_only(warnings) -> bool:
    """True when qpdf warned, and only about a cross-reference table it rebuilt (a rewrite repairs that)."""
    lowered = [w.lower() for w in warnings]
    return bool(lowered) and all(any(marker in w for marker in _XREF_DAMAGE) for w in lowered)


def damage(data: bytes) -> str | None:
    """qpdf's complaint about ``data``'s cross-reference table after reading every object; None if it has none.

    Every object is read because qpdf, like pyHanko, looks an object up only when something needs it:
    a wrong offset shows when its object is read, and our update would carry it into the stamped file.
    """
    try:
        with pikepdf.open(io.BytesIO(data)) as pdf:
            for _ in pdf.objects:
                pass
            warnings = pdf.get_warnings()
    except Exception:  # noqa: BLE001 - not qpdf's to read either: pyHanko's reader gives the coded answer
        return None
    if not xref_damage_only(warnings):
        return None
    return "qpdf rebuilt its cross-reference table: " + "; ".join(qpdf_message(w) for w in warnings[:3])


def rewrite(data: bytes, reason: str) -> Rewritten:
    """``data`` written anew by qpdf (same objects, a fresh cross-reference table), when it carries no signature.

    Deterministic: the same input gives the same bytes (a redelivered request records the same hash).
    Raises ``PDF_MALFORMED`` for a signed file, for damage beyond the cross-reference table, and when
    qpdf cannot read it either; ``PDF_ENCRYPTED`` for an encrypted one.
    """
    try:
        pdf = pikepdf.open(io.BytesIO(data))
    except pikepdf.PasswordError as exc:
        raise BubuhError(errors.PDF_ENCRYPTED, "the PDF requires a password to open") from exc
    except Exception as exc:  # noqa: BLE001 - qpdf raises plain exceptions on junk
        raise BubuhError(errors.PDF_MALFORMED, f"{reason}; qpdf cannot read it either") from exc
    with pdf:
        if pdf.is_encrypted:
            raise BubuhError(errors.PDF_ENCRYPTED, "the PDF is encrypted")
        try:
            for _ in pdf.objects:
                pass
            warnings = pdf.get_warnings()
            if warnings and not xref_damage_only(warnings):
                raise BubuhError(errors.PDF_MALFORMED,
                                 f"{reason}; its objects are damaged too: {qpdf_message(warnings[-1])}")
            if has_signatures(pdf):
                raise BubuhError(errors.PDF_MALFORMED,
                                 f"{reason}; it carries a signature, which rewriting it would break: "
                                 "re-export and sign it again")
            out = io.BytesIO()
            pdf.save(out, deterministic_id=True, object_stream_mode=pikepdf.ObjectStreamMode.preserve)
        except BubuhError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever qpdf trips over while writing
            raise BubuhError(errors.PDF_MALFORMED,
                             f"{reason}; qpdf cannot rewrite it: {qpdf_message(str(exc))}") from exc
    fixed = out.getvalue()
    return Rewritten(fixed, hashlib.sha256(fixed).hexdigest(), reason)


def has_signatures(pdf: pikepdf.Pdf) -> bool:
    """True if any AcroForm field of type /Sig carries a value (iterative, loop-safe)."""
    acroform = pdf.Root.get("/AcroForm")
    if not isinstance(acroform, pikepdf.Dictionary):
        return False
    fields = acroform.get("/Fields")
    if not isinstance(fields, pikepdf.Array):
        return False
    stack = [(f, None) for f in fields]
    seen: set[tuple[int, int]] = set()
    while stack:
        node, inherited_ft = stack.pop()
        if not isinstance(node, pikepdf.Dictionary):
            continue
        if node.is_indirect:
            if node.objgen in seen:
                continue
            seen.add(node.objgen)
        ft = node.get("/FT", inherited_ft)
        if ft == pikepdf.Name.Sig and "/V" in node:
            return True
        kids = node.get("/Kids")
        if isinstance(kids, pikepdf.Array):
            stack.extend((k, ft) for k in kids)
    return False


def qpdf_message(message: str) -> str:
    """A qpdf warning or error without the stream's repr qpdf prefixes it with."""
    # qpdf prefixes messages with the stream's repr ("stream <_io.BytesIO object at 0x..>: ")
    if message.startswith("stream <") and ">" in message:
        message = message.split(">", 1)[1].lstrip(" ,:")
    return message[:200]
