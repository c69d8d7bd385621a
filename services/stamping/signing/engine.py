"""The production stamping engine: one PDF in, the same PDF plus one signed stamp out.

Why not simply call ``PdfSigner.sign_pdf`` (see ``reference.py``): the documented
path is built for signing one document now and then. At surge rates its fixed costs
dominate: it re-opens the key, starts an event loop, signs a dummy CMS to guess the
signature size, re-encodes the certificate chain with asn1crypto, lets ``qrcode``
try eight masks and lays out text through generic machinery, all per document.

The engine keeps pyHanko as the PDF and CMS library (its incremental writer, its
signature-field and ``/ByteRange`` machinery through ``PdfCMSEmbedder``, and a CMS
layout pyHanko itself produced) and removes only the waste:

* the key, or the PKCS#11 session, is opened once per process (``signing_key.py``);
* the space for the signature is fixed (``bytes_reserved``), so nothing is signed twice;
* the CMS object is a template serialised once (``cms_template.py``);
* the appearance is drawn by ``StampArtist`` with resources built once and a fast QR;
* the input is parsed once by pyHanko's incremental writer (inspection ran at intake), and once
  by qpdf, which reads every object to tell whether its cross-reference table is damaged.

An unsigned input the stamp cannot be appended to as it is (pyHanko's reader refuses it, or qpdf
had to rebuild its cross-reference table) is stamped on a rewrite by qpdf (``document/repair.py``);
``Stamped`` names the rewrite's hash, so the request records both. A signed one is never rewritten.

What it always does: an incremental update (earlier signatures stay valid), a detached
CMS (``ETSI.CAdES.detached``) and the reason ``"[SN] <reason>"``, at the configured PAdES level:

* B-B: the signature alone; B-T: with a signature time-stamp (one TSA round trip, on a kept-alive
  connection: ``tsa_client.py``);
* B-LT: B-T, then a second incremental update with a DSS dictionary holding the certificates,
  OCSP responses and CRLs of the signer's and the TSA's chains (``validation_data.py``: fetched
  once per validity period, not per stamp; ``dss_revision.py`` appends it without reading the
  signed file again);
* B-LTA: B-LT, then a document time-stamp over it all (a second TSA round trip).

A level is never lowered: when the TSA or the revocation data is missing, the stamp fails with a
retryable code and waits. Failures become catalogue codes: TSA unreachable ->
``TSA_UNAVAILABLE`` and token trouble -> ``TOKEN_BUSY`` (both retried by the worker),
an unreadable input -> ``PDF_MALFORMED``, a page or box that does not fit ->
``PLACEMENT_INVALID``, anything else -> ``SIGNING_FAILED``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.generic import pdf_name
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign.fields import SigFieldSpec, SigSeedSubFilter
from pyhanko.sign.signers import constants as sig_constants
from pyhanko.sign.signers.cms_embedder import PdfCMSEmbedder, SigIOSetup, SigObjSetup
from pyhanko.sign.signers.pdf_byterange import SignatureObject
from pyhanko.sign.validation.dss import DocumentSecurityStore

from services.kernel import errors
from services.kernel.errors import BubuhError
from services.stamping.document import repair
from services.stamping.document.appearance import StampArtist
from services.stamping.signing import signing_key
from services.stamping.signing.cms_template import CmsTemplate, timestamp_attribute
from services.stamping.signing.dss_revision import DssRevision
from services.stamping.signing.request import StampRequest
from services.stamping.signing.tsa_client import TsaClient
from services.stamping.signing.validation_data import ValidationData

# Looked up by its catalogue string (the contract channels see) rather than by attribute name.
TSA_UNAVAILABLE = errors.lookup("TSA_UNAVAILABLE")

LEVELS = ("b-b", "b-t", "b-lt", "b-lta")

# Room for a time-stamp token (TSA certificate chain included) in the signature placeholder.
TSA_TOKEN_ALLOWANCE = 8192


@dataclass(frozen=True)
class SignerConfig:
    """Where the key is, and how to sign. Exactly one of PKCS#12 or PKCS#11 must be given."""

    p12_path: str | None = None
    p12_password: str | None = None
    pkcs11_module: str | None = None
    pkcs11_token_label: str | None = None
    pkcs11_pin: str | None = None
    pkcs11_key_label: str | None = None
    md_algorithm: str = "sha256"
    tsa_url: str | None = None  # the RFC 3161 TSA (B-T and above)
    tsa_timeout_s: float = 5.0
    level: str | None = None  # b-b, b-t, b-lt or b-lta; None: b-t with a TSA, else b-b
    revocation_timeout_s: float = 5.0  # one OCSP or CRL request (B-LT and above)
    revocation_max_age_s: float = 3600.0  # refetch after this even when a response names no nextUpdate
    trust_roots: tuple[str, ...] = ()  # PEM files anchoring our chain; default: the self-signed certs in it

    @property
    def pades_level(self) -> str:
        level = self.level or ("b-t" if self.tsa_url else "b-b")
        if level not in LEVELS:
            raise ValueError(f"unknown PAdES level {level!r}; expected one of {LEVELS}")
        return level
    bytes_reserved: int | None = None  # hex digits kept for the CMS; None: derived from the key

    def open_key(self) -> signing_key.SigningKey:
        if self.p12_path and self.pkcs11_module:
            raise ValueError("configure either a PKCS#12 file or a PKCS#11 token, not both")
        if self.p12_path:
            return signing_key.load_pkcs12(self.p12_path, self.p12_password)
        if self.pkcs11_module:
            return signing_key.open_pkcs11(self.pkcs11_module, self.pkcs11_token_label, self.pkcs11_pin,
                                    self.pkcs11_key_label)
        raise ValueError("no signing key configured")


def _pkcs11_error_types() -> tuple[type[BaseException], ...]:
    try:
        from pkcs11.exceptions import PKCS11Error
    except ImportError:  # python-pkcs11 not installed: no token errors possible
        return ()
    return (PKCS11Error,)


@dataclass(frozen=True)
class Stamped:
    """The stamped PDF, and when the input had to be rewritten first (``repair.py``): the rewrite's hash and why."""

    pdf: bytes
    rewritten_sha256: str | None = None
    rewrite_reason: str | None = None


class StampingEngine:
    """One per worker process. Not for concurrent use from several threads (a lock enforces it)."""

    def __init__(self, config: SignerConfig, verify_base_url: str, *, timestamper=None) -> None:
        self.config = config
        self.verify_base_url = verify_base_url
        self._token_errors = _pkcs11_error_types()
        try:
            self.key = config.open_key()
            self.template = CmsTemplate(self.key, config.md_algorithm)
        except self._token_errors as exc:
            raise BubuhError(errors.TOKEN_BUSY, f"signing token: {exc!r}") from exc
        self.artist = StampArtist(verify_base_url)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.timestamper = timestamper
        self.level = config.pades_level
        if self.timestamper is None and config.tsa_url and self.level != "b-b":
            self.timestamper = TsaClient(config.tsa_url, timeout_s=config.tsa_timeout_s)
        if self.level != "b-b" and self.timestamper is None:
            raise ValueError(f"PAdES {self.level.upper()} needs a time-stamp authority (BUBUH_SIGNING_TSA_URL)")
        self.validation = None
        self._tsa_certs: tuple = ()
        self._dss: tuple | None = None
        if self.level in ("b-lt", "b-lta"):
            self.validation = ValidationData(
                self.key.signing_cert, self.key.chain, trust_roots=_load_roots(config.trust_roots),
                timeout_s=config.revocation_timeout_s, max_age_s=config.revocation_max_age_s)
        # signature value (<= 512 bytes even for RSA-4096) + DER overhead, doubled for hex
        reserve = 2 * (self.template.sample_size + 600)
        if self.timestamper is not None:
            reserve += 2 * TSA_TOKEN_ALLOWANCE
        self.bytes_reserved = config.bytes_reserved or reserve

    # -- public -----------------------------------------------------------------------------

    def stamp(self, data: bytes, request: StampRequest) -> bytes:
        """Return ``data`` with one incremental update that adds the visible, signed e-Meterai
        (appended to a rewrite of ``data`` when it had to be rewritten: ``stamp_document`` says so)."""
        return self.stamp_document(data, request).pdf

    def stamp_document(self, data: bytes, request: StampRequest) -> Stamped:
        """``data`` stamped; rewritten first if it is unsigned and the stamp cannot be appended to it as it is."""
        from pyhanko.pdf_utils.misc import PdfDecodeLimitError, PdfReadError

        with self._lock:
            try:
                base = None
                damage = repair.damage(data)
                if damage is not None:
                    base = repair.rewrite(data, damage)
                try:
                    out = self._stamp_sized(base.data if base else data, request)
                except PdfDecodeLimitError:
                    raise
                except PdfReadError as exc:
                    if base is not None:
                        raise
                    base = repair.rewrite(data, f"pyHanko cannot read it: {exc}")
                    out = self._stamp_sized(base.data, request)
                return Stamped(out, base.sha256, base.reason) if base else Stamped(out)
            except _PlaceholderTooSmall as small:
                raise BubuhError(errors.SIGNING_FAILED, str(small)) from small
            except BubuhError:
                raise
            except RecursionError as exc:
                raise BubuhError(errors.PDF_MALFORMED, "object nesting is too deep") from exc
            except self._token_errors as exc:
                self._forget_token()
                raise BubuhError(errors.TOKEN_BUSY, f"signing token: {exc!r}") from exc
            except Exception as exc:
                raise _classify(exc) from exc

    def close(self) -> None:
        if isinstance(self.timestamper, TsaClient):
            self.timestamper.close()
        if self._loop is not None:
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()
            self._loop = None

    # -- steps ------------------------------------------------------------------------------

    def _stamp_sized(self, data: bytes, request: StampRequest) -> bytes:
        try:
            return self._stamp(data, request)
        except _PlaceholderTooSmall as small:
            # a TSA answered with a bigger token than allowed for: grow the reservation
            # for this and every later stamp, and sign again (a rare, one-off cost)
            self.bytes_reserved = small.needed + 4096
            return self._stamp(data, request)

    def _stamp(self, data: bytes, request: StampRequest) -> bytes:
        writer = _open_writer(data)
        llx, lly, urx, ury = (float(v) for v in request.box)
        if not (urx > llx and ury > lly):
            raise BubuhError(errors.PLACEMENT_INVALID, "the box is degenerate")
        # PAdES: declare the ESIC extension, as pyHanko's PdfSigner does
        writer.ensure_output_version(version=(1, 7))
        if writer.output_version < (2, 0):
            writer.register_extension(sig_constants.ESIC_EXTENSION_1)

        _check_page(writer, request.page)

        field_spec = SigFieldSpec(request.field_name, box=(llx, lly, urx, ury), on_page=request.page - 1)
        embedder = PdfCMSEmbedder(new_field_spec=field_spec).write_cms(
            field_name=request.field_name, writer=writer)
        field_ref = next(embedder)
        widget = field_ref.get_object()  # field and widget are one dictionary (combine_annotation)
        appearance = self.artist.xobject(request.sn, urx - llx, ury - lly)
        widget[pdf_name("/AP")] = generic.DictionaryObject({pdf_name("/N"): writer.add_object(appearance)})

        embedder.send(SigObjSetup(sig_placeholder=SignatureObject(
            timestamp=datetime.now(UTC),
            subfilter=SigSeedSubFilter.PADES,
            location=request.location,
            reason=request.signature_reason,
            bytes_reserved=self.bytes_reserved,
        )))
        if self.validation is not None:  # before spending a time-stamp: a revoked key stops here
            self.validation.current(self._event_loop(), self._tsa_certs)
        prepared, output = embedder.send(SigIOSetup(md_algorithm=self.config.md_algorithm, output=io.BytesIO()))
        cms_der = self._cms(prepared.document_digest)
        if 2 * len(cms_der) > self.bytes_reserved:
            raise _PlaceholderTooSmall(2 * len(cms_der), self.bytes_reserved)
        embedder.send(cms_der)
        if self.validation is None:
            return output.getvalue()
        bundle = self.validation.current(self._event_loop(), self._tsa_certs)
        # B-LT: the validation data in its own incremental update after the signature (PAdES: DSS)
        if DssRevision.applies_to(writer):
            self._dss_revision(bundle).append(output, writer)
        else:  # a DSS to merge into: pyHanko reads the signed file again and does it
            DocumentSecurityStore.add_dss(output, None, certs=bundle.certs, ocsps=bundle.ocsps, crls=bundle.crls)
        if self.level == "b-lta":
            return self._document_timestamp(output)
        return output.getvalue()

    def _dss_revision(self, bundle) -> DssRevision:
        """The DSS revision of ``bundle``, serialised once per refresh of the validation data."""
        if self._dss is None or self._dss[0] is not bundle:
            self._dss = (bundle, DssRevision(bundle.certs, bundle.ocsps, bundle.crls))
        return self._dss[1]

    def _document_timestamp(self, signed: io.BytesIO) -> bytes:
        """B-LTA: a document time-stamp over the signature and its validation data."""
        from pyhanko.sign.signers.pdf_signer import PdfTimeStamper

        out = io.BytesIO()
        stamper = PdfTimeStamper(self.timestamper)
        request = stamper.async_timestamp_pdf(IncrementalPdfFileWriter(signed), self.config.md_algorithm, output=out)
        self._ask_tsa(lambda: self._event_loop().run_until_complete(request), "document time-stamp")
        return out.getvalue()

    def _ask_tsa(self, request, what: str):
        """Call ``request()``, one request to the time-stamp authority; its failures are TSA_UNAVAILABLE
        (retryable)."""
        from pyhanko.sign.timestamps import TimestampRequestError

        try:
            return request()
        except (TimeoutError, TimestampRequestError, OSError) as exc:
            raise BubuhError(TSA_UNAVAILABLE, f"time-stamp authority ({what}): {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("aiohttp"):
                raise BubuhError(TSA_UNAVAILABLE, f"time-stamp authority ({what}): {exc!r}") from exc
            raise

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def _cms(self, document_digest: bytes) -> bytes:
        _attrs, signature = self.template.sign(document_digest)
        unsigned = None
        if self.timestamper is not None:
            token = self._timestamp(signature)
            self._tsa_certs = tuple(c.chosen for c in token["content"]["certificates"] or ()
                                    if c.name == "certificate")
            unsigned = timestamp_attribute(token)
        return self.template.assemble(document_digest, signature, unsigned)

    def _timestamp(self, signature: bytes):
        md = self.config.md_algorithm
        digest = hashlib.new(md, signature).digest()
        if isinstance(self.timestamper, TsaClient):  # synchronous, no event loop turn
            return self._ask_tsa(lambda: self.timestamper.timestamp(digest, md), "signature time-stamp")
        # a TimeStamper given by the caller (tests, certomancer's in-process one): pyHanko's async interface
        loop = self._event_loop()
        return self._ask_tsa(lambda: loop.run_until_complete(self.timestamper.async_timestamp(digest, md)),
                             "signature time-stamp")

    def _forget_token(self) -> None:
        c = self.config
        if c.pkcs11_module:
            signing_key.forget_pkcs11(c.pkcs11_module, c.pkcs11_token_label, c.pkcs11_key_label)
            try:
                self.key = c.open_key()
                self.template.key = self.key
            except Exception:  # noqa: BLE001 - token still away: the next stamp retries
                pass


def _load_roots(paths: tuple[str, ...]):
    from asn1crypto import pem
    from asn1crypto import x509 as asn1_x509

    roots = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        for _type, _headers, der in (pem.unarmor(data, multiple=True) if pem.detect(data) else [(0, 0, data)]):
            roots.append(asn1_x509.Certificate.load(der))
    return roots or None


class _PlaceholderTooSmall(Exception):
    def __init__(self, needed: int, reserved: int) -> None:
        super().__init__(f"signature needs {needed} hex digits, {reserved} reserved")
        self.needed = needed


def _open_writer(data: bytes) -> IncrementalPdfFileWriter:
    from pyhanko.pdf_utils.misc import PdfError, PdfReadError

    try:
        writer = IncrementalPdfFileWriter(io.BytesIO(data))
    except PdfReadError:
        raise   # stamp_document decides: a rewrite, or PDF_MALFORMED
    except PdfError as exc:
        raise BubuhError(errors.PDF_MALFORMED, f"cannot parse: {exc}") from exc
    if writer.prev.encrypted:  # intake refuses these; a stamp needs the owner's credentials
        raise BubuhError(errors.PDF_ENCRYPTED, "the PDF is encrypted")
    return writer


def _check_page(writer: IncrementalPdfFileWriter, page: int) -> None:
    from pyhanko.pdf_utils.misc import PdfError, PdfReadError

    # pyHanko reads negative indices from the end; channels number pages from 1
    ok = isinstance(page, int) and not isinstance(page, bool) and page >= 1
    if ok:
        try:
            writer.find_page_for_modification(page - 1)
        except PdfReadError:
            raise   # an unreadable page tree is the document's fault, not the placement's
        except (PdfError, IndexError, KeyError, ValueError):
            ok = False
    if not ok:
        raise BubuhError(errors.PLACEMENT_INVALID, f"page {page!r} does not exist")


def _classify(exc: Exception) -> BubuhError:
    from pyhanko.pdf_utils.misc import PdfError

    if isinstance(exc, PdfError):
        return BubuhError(errors.PDF_MALFORMED, f"cannot read the document: {exc}")
    return BubuhError(errors.SIGNING_FAILED, f"{type(exc).__name__}: {exc}")
