"""HTTP routes of the stamping service.

Channels: ``POST /v1/stamps`` (multipart: ``file`` + ``meta`` JSON), ``GET /v1/stamps/{id}``,
``GET /v1/stamps/{id}/document``. The public: ``GET /v1/verify/{sn}`` (JSON, or the page behind the
QR for a browser: ``verify_page.py``), ``POST /v1/verify``, and the page's upload form
``POST /v1/verify/{sn}/page``.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.kernel import direct_lane, errors, http
from services.kernel.channels import ChannelView
from services.kernel.document_profiles import MAX_BYTES_ANY_PROFILE
from services.kernel.settings import Settings
from services.stamping import verify_page
from services.stamping.http_intake import StampIntake, StampMeta
from services.stamping.public_verifier import PublicVerifier
from services.stamping.request_status import RequestStatus
from services.stamping.verification_answer import VerificationAnswer


class StampMetaBody(http.StrictBody):
    account_id: str = Field(description="The buyer's account at the channel; one unit of its quota is used.")
    page: int = Field(description="1-based page for the stamp (the issuer's visSignaturePage).")
    llx: float = Field(description="Box lower-left x in PDF points (visLLX).")
    lly: float = Field(description="Box lower-left y (visLLY).")
    urx: float = Field(description="Box upper-right x (visURX).")
    ury: float = Field(description="Box upper-right y (visURY).")
    doc_type: str = Field("", description="Document type code, e.g. '3' (Surat Pernyataan).")
    doc_number: str = ""
    doc_date: str = Field("", description="YYYY-MM-DD")
    reason: str = Field("Meterai elektronik", max_length=200)
    location: str = Field("Indonesia", max_length=100)
    profile: str = Field("", description="'standard' (10 MB) or 'cpns' (800 KB, A4, PDF >= 1.6); default: "
                                         "the channel's")
    email: str = Field("", description="Optional: where to send the buyer the outcome.")


def _upload_body(limit: int, fields: dict, required: list[str], what: str, max_in_flight: int | None = None,
                 smallest_share: float = 1.0) -> dict:
    """The multipart request body as OpenAPI states it, with the route's size limit (and admission bound)."""
    return http.body_limit(limit, errors.PDF_TOO_LARGE, {
        "required": True, "description": what,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": required, "properties": fields}}}}, max_in_flight, smallest_share)


_FILE = {"type": "string", "format": "binary", "maxLength": MAX_BYTES_ANY_PROFILE,
         "description": "The PDF: at most its profile's size (`standard` 10 MB, `cpns` 800 KB)."}


def router(settings: Settings, channels: ChannelView, intake: StampIntake, requests: RequestStatus,
           verifier: PublicVerifier) -> APIRouter:
    r = APIRouter(tags=["stamps"])
    stamp_body = _upload_body(
        settings.stamp_max_body_bytes,
        {"file": _FILE, "meta": {"type": "string", "contentMediaType": "application/json",
                                 "description": "JSON: " + json.dumps(StampMetaBody.model_json_schema())}},
        ["file", "meta"], "`file`: the PDF (the profile's limit applies to it); `meta`: JSON, see its schema.",
        settings.intake_max_in_flight, settings.intake_smallest_share)
    verify_body = _upload_body(settings.verify_max_body_bytes, {"file": _FILE}, ["file"],
                               "`file`: the stamped PDF.")

    def _multipart(request: Request) -> None:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise errors.BubuhError(errors.UNSUPPORTED_MEDIA_TYPE, "send multipart/form-data with `file` and `meta`")

    async def _form(request: Request, fields: tuple[str, ...]) -> dict[str, bytes | str]:
        """The multipart fields, read as they arrive (BodyLimits stops a body over the route's limit);
        ``file`` as its bytes, the others as text. The parser's spooled files are closed here."""
        try:
            form = await request.form(max_files=1, max_fields=len(fields))
        except StarletteHTTPException as exc:   # the parser's complaint about the framing
            raise errors.BubuhError(errors.BODY_INVALID, f"multipart: {exc.detail}") from None
        try:
            out: dict[str, bytes | str] = {}
            for name in fields:
                value = form.get(name)
                if value is None:
                    raise errors.BubuhError(errors.BODY_INVALID, f"{name}: field required")
                if name == "file":
                    out[name] = await _read(value)
                elif isinstance(value, str):
                    out[name] = value
                else:
                    raise errors.BubuhError(errors.BODY_INVALID, f"{name}: send it as a plain form field")
            return out
        finally:
            await form.close()

    async def _read(upload: UploadFile | str) -> bytes:
        if not isinstance(upload, UploadFile):
            raise errors.BubuhError(errors.BODY_INVALID, "file: send the PDF as a file part")
        data = await upload.read(MAX_BYTES_ANY_PROFILE + 1)
        if len(data) > MAX_BYTES_ANY_PROFILE:
            raise errors.BubuhError(errors.PDF_TOO_LARGE, f"more than {MAX_BYTES_ANY_PROFILE} bytes")
        return data

    async def stamp_request(request: Request) -> Response:
        channel = channels.authenticate(request.headers.get("authorization"))
        _multipart(request)
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 128:
            raise errors.BubuhError(errors.BODY_INVALID, "Idempotency-Key: 1-128 characters")
        form = await _form(request, ("file", "meta"))
        try:
            body = StampMetaBody.model_validate(json.loads(form["meta"]))
        except (ValueError, ValidationError) as exc:
            detail = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": ("meta",), "msg": str(exc)}
            raise errors.BubuhError(errors.BODY_INVALID,
                                    f"meta.{'.'.join(str(p) for p in detail['loc'])}: {detail['msg']}") from None
        accepted = await intake.accept(channel, form["file"], StampMeta(**body.model_dump()), idempotency_key)
        return JSONResponse(status_code=202, content={
            "request_id": accepted.request_id, "status": accepted.status,
            "status_url": f"{settings.public_url}/v1/stamps/{accepted.request_id}",
            "position": accepted.position, "eta_seconds": accepted.eta_seconds})

    # The two hottest routes are answered in the direct lane (kernel/direct_lane.py) by ``stamp_request``
    # and ``stamp_status``; the operations declared here are their OpenAPI contract, and call them too.
    @r.post("/v1/stamps", status_code=202, openapi_extra=stamp_body,
            responses=http.error_responses(401, 403, 409, 413, 415, 422, 503))
    async def request_stamp(request: Request, authorization: str | None = Header(None),
                            idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
        """Stamp a PDF. 202 once the document is stored and the request is durable in Kafka; the answer
        carries the queue position (the requests signed before this one: the queue is fair between
        channels, so it is this channel's place, see docs/channels.md) and the expected completion
        time. Safe to retry with `Idempotency-Key`.

        The API key is checked before the body is read; the body is held to `x-max-body-bytes` as it
        arrives, and the document is inspected within budgets (decompressed bytes, objects, nesting:
        over one is 422 `PDF_TOO_COMPLEX`)."""
        return await stamp_request(request)

    direct_lane.serve_directly(r, stamp_request)

    async def status_of(request: Request) -> Response:
        channel = channels.authenticate(request.headers.get("authorization"))
        return JSONResponse(await requests.status(channel.channel_id, request.path_params["request_id"]))

    @r.get("/v1/stamps/{request_id}")
    async def stamp_status(request: Request, request_id: str, authorization: str | None = Header(None)):
        """`queued`, `reserved`, `stamping`, `completed` (with `sn`) or `failed` (with `code`).

        `document_sha256` is the sha256 of the PDF as uploaded. `rewritten_sha256`, present only when the
        stamp went onto a rewrite of it: an unsigned PDF whose cross-reference table was damaged, or that
        the signing library could not read as it was, is rewritten by qpdf (same objects, a fresh table)
        and stamped; the stamped file then starts with the rewrite, not with the upload. A signed PDF is
        never rewritten (that would break its signature): it fails with `PDF_MALFORMED`."""
        return await status_of(request)

    direct_lane.serve_directly(r, status_of)

    @r.get("/v1/stamps/{request_id}/document", response_class=Response)
    async def stamped_document(request_id: str, authorization: str | None = Header(None)):
        """The stamped PDF, once `completed` (the requesting channel only)."""
        channel = channels.authenticate(authorization)
        data, sn = await requests.document(channel.channel_id, request_id)
        return Response(data, media_type="application/pdf",
                        headers={"Content-Disposition": f'attachment; filename="{sn}.pdf"'})

    @r.get("/v1/verify/{sn}", tags=["verification"],
           responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}})
    async def verify_sn(request: Request, sn: str):
        """Public: is this SN one we issued, and was it used exactly once? The stamp's QR code points
        here: a browser (`Accept` ranking `text/html` above JSON) gets a page with an upload form
        (`?lang=en` for English); every other client gets this JSON."""
        # Accept and lang are read here, not declared: they select the page, and the JSON operation's
        # OpenAPI parameters stay what API clients already know
        facts = await verifier.by_sn(sn)
        if not verify_page.prefers_html(request.headers.get("accept")):
            return JSONResponse(facts, headers={"Vary": "Accept"})
        lang = verify_page.lang_of(request.query_params.get("lang"))
        return HTMLResponse(verify_page.render(facts, verifier.issuer, lang), headers=verify_page.HEADERS)

    @r.post("/v1/verify/{sn}/page", include_in_schema=False, response_class=HTMLResponse,
            openapi_extra=http.body_limit(settings.verify_max_body_bytes, errors.PDF_TOO_LARGE))
    async def verify_page_upload(request: Request, sn: str, lang: str | None = Query(None)):
        """The page's upload form (a browser's multipart post): the same admission and verdict as
        `POST /v1/verify`, rendered. Refusals (no file, too large, rate-limited, busy) are rendered too,
        with their status; only a declared `Content-Length` over the limit is refused before any route
        runs (BodyLimits), in JSON."""
        lang = verify_page.lang_of(lang)
        facts = await verifier.by_sn(sn)
        filename = ""
        try:
            verifier.admit(request.client.host if request.client else "?")
            _multipart(request)
            try:
                form = await request.form(max_files=1, max_fields=1)
            except StarletteHTTPException as exc:
                raise errors.BubuhError(errors.BODY_INVALID, f"multipart: {exc.detail}") from None
            try:
                upload = form.get("file")
                if not isinstance(upload, UploadFile) or not upload.filename:
                    raise errors.BubuhError(errors.BODY_INVALID, "file: choose a PDF file")
                filename = upload.filename[-200:]
                data = await _read(upload)
            finally:
                await form.close()
            verdict = await verifier.document(data)
        except errors.BubuhError as exc:
            page = verify_page.render(facts, verifier.issuer, lang, failure=(exc.code.code, exc.detail),
                                      filename=filename)
            return HTMLResponse(page, status_code=exc.code.http_status, headers=verify_page.HEADERS)
        page = verify_page.render(facts, verifier.issuer, lang, verdict=verdict, filename=filename)
        return HTMLResponse(page, headers=verify_page.HEADERS)

    @r.post("/v1/verify", tags=["verification"], response_model=VerificationAnswer, openapi_extra=verify_body,
            responses=http.error_responses(413, 415, 422, 429, 503))
    async def verify_document(request: Request):
        """Public: upload a stamped PDF; every e-Meterai in it is checked. `valid` is true only when each
        stamp's signature is intact and the issuer's, its SN was issued for exactly this document (the revision
        the stamp signed is byte for byte the delivered file), and everything after it is only new signatures,
        DSS or document time-stamps. Otherwise `code` and `reasons` say why (codes in docs/errors.md), naming
        the revision that changed what (docs/verification.md). Anonymous, so rate-limited per client address
        (`RATE_LIMITED`, 429, before the body is read) and run in its own lower-priority pool (`BUSY`, 503,
        when too many wait). The body is held to `x-max-body-bytes`."""
        verifier.admit(request.client.host if request.client else "?")
        _multipart(request)
        form = await _form(request, ("file",))
        return await verifier.document(form["file"])

    return r
