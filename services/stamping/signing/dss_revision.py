"""B-LT's second incremental update, the DSS, appended without reading the signed file again.

pyHanko's ``DocumentSecurityStore.add_dss`` opens the signed output with a new reader (every
cross-reference section, the trailer, the catalogue), builds the DSS and writes a revision that
also refreshes the document information (``/ModDate``, and the XMP stream when there is one). Per
stamp that was the largest part of what B-LT costs over B-B. But every stamp gets the same
certificates, OCSP responses and CRLs until the validation data is refreshed (``validation_data.py``),
and the engine has just written the signature revision, so it knows everything the new one
needs: the catalogue as it now stands, the trailer and the next free object number.

So a ``DssRevision`` serialises the validation data's stream objects once per bundle, and each
stamp appends one revision with exactly the objects a DSS requires:

* one stream per certificate, OCSP response and CRL (raw DER, as pyHanko writes them);
* the DSS dictionary (``/Certs``, ``/OCSPs``, ``/CRLs``; no ``/VRI``, as with ``add_dss(None, ...)``);
* the catalogue, with ``/DSS`` added and nothing else changed;
* a cross-reference section of the same kind as the signature's (table or stream, pyHanko's
  own writers), and a trailer with ``/Prev`` pointing at the signature's section.

Nothing else of the document is touched (ETSI EN 319 142-1 allows a DSS after the signature;
validators see one DSS added to the catalogue). Documents that already have a DSS (an earlier
LTV signature) or are encrypted take pyHanko's path, which merges into the existing DSS.
"""

from __future__ import annotations

import io
import re

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.generic import pdf_name
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.xref import XRefStream, write_xref_table

_STARTXREF = re.compile(rb"startxref\s+(\d+)\s+%%EOF\s*$")
_SIZE = re.compile(rb"/Size\s+(\d+)")


class DssRevision:
    """The DSS of one validation-data bundle, ready to append to any signed output of this engine."""

    def __init__(self, certs, ocsps, crls) -> None:
        self._kinds: list[tuple[str, list[bytes]]] = []
        for key, objs in (("/Certs", certs), ("/OCSPs", ocsps), ("/CRLs", crls)):
            bodies: list[bytes] = []
            seen: set[bytes] = set()
            for obj in objs:
                der = obj.dump()
                if der in seen:
                    continue
                seen.add(der)
                bodies.append(_serialised(generic.StreamObject(stream_data=der)))
            if bodies or key == "/Certs":
                self._kinds.append((key, bodies))

    @staticmethod
    def applies_to(writer: IncrementalPdfFileWriter) -> bool:
        """False when pyHanko must do it: an existing DSS to merge into, or an encrypted file."""
        return writer.security_handler is None and "/DSS" not in writer.root

    def append(self, output: io.BytesIO, writer: IncrementalPdfFileWriter) -> None:
        """Append the DSS revision to ``output``, the signed file ``writer`` has just written."""
        data = output.getbuffer()
        prev_xref, next_id = _last_section(data)
        del data  # the buffer must be released before the stream grows
        output.seek(0, io.SEEK_END)
        positions: dict[tuple[int, int], int] = {}

        def put(idnum: int, generation: int, body: bytes) -> None:
            positions[(generation, idnum)] = output.tell()
            output.write(b"%d %d obj\n" % (idnum, generation))
            output.write(body)
            output.write(b"\nendobj\n")

        dss = generic.DictionaryObject()
        for key, bodies in self._kinds:
            refs = generic.ArrayObject()
            for body in bodies:
                put(next_id, 0, body)
                refs.append(generic.IndirectObject(next_id, 0, writer))
                next_id += 1
            dss[pdf_name(key)] = refs
        dss_id = next_id
        next_id += 1
        put(dss_id, 0, _serialised(dss))

        trailer_entries = writer.trailer_view
        root_ref = trailer_entries.raw_get("/Root")
        root = generic.DictionaryObject(writer.root)
        root[pdf_name("/DSS")] = generic.IndirectObject(dss_id, 0, writer)
        put(root_ref.idnum, root_ref.generation, _serialised(root))

        trailer_entries[pdf_name("/Prev")] = generic.NumberObject(prev_xref)
        if writer.stream_xrefs:
            xref_id = next_id
            xref = XRefStream(positions)
            xref.compress()
            xref.update(trailer_entries)
            xref_location = output.tell()
            positions[(0, xref_id)] = xref_location
            xref[pdf_name("/Size")] = generic.NumberObject(xref_id + 1)
            output.write(b"%d 0 obj\n" % xref_id)
            xref.write_to_stream(output, None)
            output.write(b"\nendobj\n")
        else:
            xref_location = write_xref_table(output, positions)
            trailer_entries[pdf_name("/Size")] = generic.NumberObject(next_id)
            output.write(b"trailer\n")
            trailer_entries.write_to_stream(output, None)
        output.write(b"\nstartxref\n%d\n%%%%EOF\n" % xref_location)


def _serialised(obj: generic.PdfObject) -> bytes:
    buf = io.BytesIO()
    obj.write_to_stream(buf, None)
    return buf.getvalue()


def _last_section(data: memoryview) -> tuple[int, int]:
    """Where the last cross-reference section starts, and its ``/Size`` (the next free object number)."""
    tail = bytes(data[-256:])
    found = _STARTXREF.search(tail)
    if found is None:
        raise ValueError("the signed output does not end with startxref/%%EOF")
    start = int(found.group(1))
    section = bytes(data[start:])
    if section.startswith(b"xref"):
        head = section[section.index(b"trailer"):]
    else:  # a cross-reference stream: its dictionary comes before its data
        head = section[:section.index(b"stream")]
    size = _SIZE.search(head)
    if size is None:
        raise ValueError("the signed output's last trailer names no /Size")
    return start, int(size.group(1))
