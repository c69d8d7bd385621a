"""What intake lets a document cost before anyone parses it: decompressed bytes, objects, nesting.

Why a pass over the raw bytes before qpdf: qpdf inflates an object stream whole into memory the
moment one object in it is needed, and so does pyHanko later, so a 0.6 MB upload whose object
stream inflates to 600 MB costs 600 MB before any check of ours could look at the result. Here
every Flate stream is inflated in small pieces and thrown away, counting, and the walk stops at
the first budget it passes; nothing larger than a piece is ever held. Over a budget is
``PDF_TOO_COMPLEX``: a coded refusal, not a verdict that the file is damaged.

What it counts:
- decoded bytes of every Flate stream (chains of Flate filters inflated layer by layer): pages,
  images and fonts together, against ``max_decoded_bytes``;
- decoded bytes of object streams and cross-reference streams, the ones parsers hold in memory
  whole, against the tighter ``max_object_stream_bytes``;
- indirect objects, written out (``n g obj``) and packed in object streams (their ``/N``).
Nesting is qpdf's to count (``parser_max_nesting``, set from ``max_nesting``): it parses
every object after this pass, and over the limit it warns, which inspection turns into the same code.
qpdf's own ``flate_max_memory`` is set to ``max_object_stream_bytes`` as well: this pass reads
dictionaries with regular expressions, which a string in the right place can mislead, and the
streams qpdf inflates are exactly the ones that must not pass that limit.

Streams with other filters (DCT, JBIG2, LZW, ...) count at their stored size: the platform never
decodes them. The pass is a scan, not a parser: a stream it cannot find or inflate is left to
qpdf, which refuses what it cannot read.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from services.kernel import errors
from services.kernel.errors import BubuhError

_PIECE = 256 * 1024          # inflate output per step
_INPUT = 64 * 1024           # compressed input per step (when the stream's /Length is unknown)
_DICT_WINDOW = 4096          # how far before `stream` its dictionary may start

_STREAM = re.compile(rb">>\s*stream(?:\r\n|\n|\r)")
_OBJ = re.compile(rb"(?<![0-9])\d+\s+\d+\s+obj\b")
_FILTER = re.compile(rb"/Filter\s*(\[[^\]]*\]|/[^\s/\[\]<>()]+)")
_NAME = re.compile(rb"/([^\s/\[\]<>()]+)")
_LENGTH = re.compile(rb"/Length\s+(\d+)(\s+\d+\s+R)?")
_STRUCTURE = re.compile(rb"/Type\s*/(ObjStm|XRef)\b")
_COUNT = re.compile(rb"/N\s+(\d+)")
_FLATE = {b"FlateDecode", b"Fl"}


@dataclass(frozen=True)
class Budget:
    max_decoded_bytes: int = 256 * 1024 * 1024
    max_object_stream_bytes: int = 32 * 1024 * 1024
    max_objects: int = 100_000
    max_nesting: int = 64

    @classmethod
    def from_settings(cls, settings) -> Budget:
        return cls(settings.pdf_max_decoded_bytes, settings.pdf_max_object_stream_bytes, settings.pdf_max_objects,
                   settings.pdf_max_nesting)


@dataclass
class Spent:
    decoded_bytes: int = 0
    object_stream_bytes: int = 0
    objects: int = 0
    streams: int = 0


def check(data: bytes, budget: Budget) -> Spent:
    """Walk the streams of ``data`` within ``budget``; raise PDF_TOO_COMPLEX at the first one passed."""
    spent = Spent(objects=len(_OBJ.findall(data)))
    _over_objects(spent, budget)
    pos = 0
    while (match := _STREAM.search(data, pos)) is not None:
        start = match.end()
        head = _dictionary(data, match.start())
        spent.streams += 1
        structure = _STRUCTURE.search(head)
        if structure is not None and structure.group(1) == b"ObjStm":
            count = _COUNT.search(head)
            spent.objects += int(count.group(1)) if count else 0
            _over_objects(spent, budget)
        length_match = _LENGTH.search(head)
        length = int(length_match.group(1)) if length_match and not length_match.group(2) else None
        end = start + length if length is not None else None
        # the dictionary says how many Flate layers; data that is zlib counts even when the
        # dictionary could not be read (a string in it can fool a scan; qpdf's own limit backs this)
        filters = _filters(head)
        layers = 0
        while layers < len(filters) and filters[layers] in _FLATE:
            layers += 1
        if layers == 0 and _looks_like_zlib(data[start:start + 2]):
            layers = 1
        consumed = _inflate(data, start, end, layers, spent, budget, structure is not None) if layers else 0
        pos = start + (length if length is not None else max(consumed, 1))
    return spent


def _dictionary(data: bytes, stream_at: int) -> bytes:
    """The text between the stream's ``n g obj`` header and its ``stream`` keyword (best effort)."""
    low = max(0, stream_at - _DICT_WINDOW)
    header = data.rfind(b"obj", low, stream_at)
    return data[header + 3 if header >= 0 else low:stream_at + 2]


def _looks_like_zlib(two: bytes) -> bool:
    return len(two) == 2 and two[0] & 0x0F == 8 and two[0] >> 4 <= 7 and (two[0] << 8 | two[1]) % 31 == 0


def _filters(head: bytes) -> list[bytes]:
    found = _FILTER.search(head)
    if found is None:
        return []
    return _NAME.findall(found.group(1))


def _over_objects(spent: Spent, budget: Budget) -> None:
    if spent.objects > budget.max_objects:
        raise BubuhError(errors.PDF_TOO_COMPLEX, f"more than {budget.max_objects} objects")


def _inflate(data: bytes, start: int, end: int | None, layers: int, spent: Spent, budget: Budget,
             structure: bool) -> int:
    """Inflate one stream (``layers`` Flate filters deep) piece by piece, counting; return the
    compressed bytes the first layer consumed. A stream that is not valid zlib stops counting."""
    inflaters = [zlib.decompressobj() for _ in range(layers)]
    stop = len(data) if end is None else min(end, len(data))
    pos = start
    try:
        while pos < stop and not inflaters[0].eof:
            piece = data[pos:min(pos + _INPUT, stop)]
            pos += len(piece)
            _feed(inflaters, 0, piece, spent, budget, structure)
            if inflaters[0].eof:
                pos -= len(inflaters[0].unused_data)
    except zlib.error:
        pass
    return pos - start


def _feed(inflaters: list, layer: int, piece: bytes, spent: Spent, budget: Budget, structure: bool) -> None:
    inflater = inflaters[layer]
    while piece and not inflater.eof:
        out = inflater.decompress(piece, _PIECE)
        if not out and len(inflater.unconsumed_tail) == len(piece):
            break   # no progress: nothing more to get from this piece
        piece = inflater.unconsumed_tail
        if layer + 1 < len(inflaters):
            _feed(inflaters, layer + 1, out, spent, budget, structure)
            continue
        spent.decoded_bytes += len(out)
        if structure:
            spent.object_stream_bytes += len(out)
            if spent.object_stream_bytes > budget.max_object_stream_bytes:
                raise BubuhError(errors.PDF_TOO_COMPLEX, f"object streams inflate to more than "
                                                         f"{budget.max_object_stream_bytes} bytes")
        if spent.decoded_bytes > budget.max_decoded_bytes:
            raise BubuhError(errors.PDF_TOO_COMPLEX, f"streams inflate to more than {budget.max_decoded_bytes} bytes")
