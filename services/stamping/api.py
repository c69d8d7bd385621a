"""HTTP routes of the stamping service.

Channels: ``POST /v1/stamps`` (multipart: ``file`` + ``meta`` JSON), ``GET /v1/stamps/{id}``,
``GET /v1/stamps/{id}/document``. The public: ``GET /v1/verify/{sn}`` (JSON, or the page behind the
QR for a browser: ``verify_page.py``), ``POST /v1/verify``, and the page's upload form
``POST /v1/verify/{sn}/page``.
"""

from __future__ import annotations

import json

import asyncpg
from fastapi import APIRouter, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile as StarletteUpload

from services.kernel import errors
from services.kernel.channels import ChannelView
from services.kernel.settings import Settings
from services.stamping import store, verify_page
from services.stamping.document.profiles import MAX_BYTES_ANY_PROFILE
from services.stamping.intake import StampIntake, StampMeta
from services.stamping.queue import QueueView
from services.stamping.verification_answer import VerificationAnswer
from services.stamping.verifying import PublicVerifier

# multipart framing and the meta field on top of the largest document any profile accepts
UPLOAD_SLACK = 64 * 1024


class StampMetaBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


def router(settings: Settings, channels: ChannelView, intake: StampIntake, pool: asyncpg.Pool,
           documents: store.DocumentStore, queue: QueueView, verifier: PublicVerifier) -> APIRouter:
    r = APIRouter(tags=["stamps"])
    upload_limit = MAX_BYTES_ANY_PROFILE + UPLOAD_SLACK

    def _too_large(request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > upload_limit:
            raise errors.BubuhError(errors.PDF_TOO_LARGE, f"{declared} bytes; no profile accepts more than "
                                                          f"{MAX_BYTES_ANY_PROFILE} bytes")

    def _multipart(request: Request) -> None:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise errors.BubuhError(errors.UNSUPPORTED_MEDIA_TYPE, "send multipart/form-data with `file` and `meta`")

    async def _read(upload: UploadFile) -> bytes:
        if upload.size is not None and upload.size > MAX_BYTES_ANY_PROFILE:
            raise errors.BubuhError(errors.PDF_TOO_LARGE, f"{upload.size} bytes")
        data = await upload.read(MAX_BYTES_ANY_PROFILE + 1)
        if len(data) > MAX_BYTES_ANY_PROFILE:
            raise errors.BubuhError(errors.PDF_TOO_LARGE, f"more than {MAX_BYTES_ANY_PROFILE} bytes")
        return data

    @r.post("/v1/stamps", status_code=202, dependencies=[])
    async def request_stamp(request: Request, file: UploadFile = File(...), meta: str = Form(...),
                            authorization: str | None = Header(None),
                            idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
        """Stamp a PDF. 202 once the document is stored and the request is durable in Kafka; the answer
        carries the queue position and the expected completion time. Safe to retry with `Idempotency-Key`."""
        channel = channels.authenticate(authorization)
        _multipart(request)
        _too_large(request)
        try:
            body = StampMetaBody.model_validate(json.loads(meta))
        except (ValueError, ValidationError) as exc:
            detail = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": ("meta",), "msg": str(exc)}
            raise errors.BubuhError(errors.BODY_INVALID,
                                    f"meta.{'.'.join(str(p) for p in detail['loc'])}: {detail['msg']}") from None
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 128:
            raise errors.BubuhError(errors.BODY_INVALID, "Idempotency-Key: 1-128 characters")
        data = await _read(file)
        accepted = await intake.accept(channel, data, StampMeta(**body.model_dump()), idempotency_key)
        return JSONResponse(status_code=202, content={
            "request_id": accepted.request_id, "status": accepted.status,
            "status_url": f"{settings.public_url}/v1/stamps/{accepted.request_id}",
            "position": accepted.position, "eta_seconds": accepted.eta_seconds})

    @r.get("/v1/stamps/{request_id}")
    async def stamp_status(request_id: str, authorization: str | None = Header(None)):
        """`queued`, `reserved`, `stamping`, `completed` (with `sn`) or `failed` (with `code`)."""
        channel = channels.authenticate(authorization)
        row = await pool.fetchrow("SELECT * FROM requests WHERE request_id = $1 AND channel_id = $2", request_id,
                                  channel.channel_id)
        if row is None:
            raise errors.BubuhError(errors.NOT_FOUND, f"no stamp request {request_id} for this channel")
        # dead-lettered waits for a replay with its unit reserved; signed waits for the ledger to post the unit
        status = {"dead_lettered": "reserved", "signed": "stamping"}.get(row["status"], row["status"])
        out = {"request_id": request_id, "status": status, "account_id": row["account_id"],
               "accepted_at": row["accepted_at"].isoformat()}
        if row["sn"] and row["status"] == "completed":
            out["sn"] = row["sn"]
            out["document_url"] = f"{settings.public_url}/v1/stamps/{request_id}/document"
        if row["code"]:
            out["code"], out["detail"] = row["code"], row["detail"]
        if row["finished_at"]:
            out["finished_at"] = row["finished_at"].isoformat()
        if status in ("queued", "reserved", "stamping"):
            position = await queue.position_of(row["accepted_at"])
            facts = await queue.facts()
            out["position"] = position
            out["eta_seconds"] = facts.eta_seconds(position) if facts and position is not None else None
        return out

    @r.get("/v1/stamps/{request_id}/document", response_class=Response)
    async def stamped_document(request_id: str, authorization: str | None = Header(None)):
        """The stamped PDF, once `completed` (the requesting channel only)."""
        channel = channels.authenticate(authorization)
        row = await pool.fetchrow("SELECT status, output_ref, sn FROM requests WHERE request_id = $1 AND "
                                  "channel_id = $2", request_id, channel.channel_id)
        if row is None or row["status"] != "completed":
            raise errors.BubuhError(errors.NOT_FOUND, f"no stamped document for {request_id} (yet)")
        data = await documents.get(row["output_ref"])
        return Response(data, media_type="application/pdf",
                        headers={"Content-Disposition": f'attachment; filename="{row["sn"]}.pdf"'})

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

    @r.post("/v1/verify/{sn}/page", include_in_schema=False, response_class=HTMLResponse)
    async def verify_page_upload(request: Request, sn: str, lang: str | None = Query(None)):
        """The page's upload form (a browser's multipart post): the same verdict as `POST /v1/verify`,
        rendered. Failures (no file, too large, rate-limited, busy) are rendered too, with their status."""
        lang = verify_page.lang_of(lang)
        facts = await verifier.by_sn(sn)
        filename = ""
        try:
            verifier.admit(request.client.host if request.client else "?")
            _too_large(request)
            _multipart(request)
            async with request.form(max_files=1, max_fields=4) as form:     # closes the spooled upload
                upload = form.get("file")
                if not isinstance(upload, StarletteUpload) or not upload.filename:
                    raise errors.BubuhError(errors.BODY_INVALID, "choose a PDF file")
                filename = upload.filename[-200:]
                data = await _read(upload)
            verdict = await verifier.document(data)
        except errors.BubuhError as exc:
            page = verify_page.render(facts, verifier.issuer, lang, failure=(exc.code.code, exc.detail),
                                      filename=filename)
            return HTMLResponse(page, status_code=exc.code.http_status, headers=verify_page.HEADERS)
        page = verify_page.render(facts, verifier.issuer, lang, verdict=verdict, filename=filename)
        return HTMLResponse(page, headers=verify_page.HEADERS)

    @r.post("/v1/verify", tags=["verification"], response_model=VerificationAnswer)
    async def verify_document(request: Request, file: UploadFile = File(...)):
        """Public: upload a stamped PDF; every e-Meterai in it is checked. `valid` is true only when each
        stamp's signature is intact and the issuer's, its SN was issued for exactly this document (the revision
        the stamp signed is byte for byte the delivered file), and everything after it is only new signatures,
        DSS or document time-stamps. Otherwise `code` and `reasons` say why (codes in docs/errors.md), naming
        the revision that changed what (docs/verification.md). Anonymous, so rate-limited per client address
        (`RATE_LIMITED`, 429) and run in its own lower-priority pool (`BUSY`, 503, when too many wait)."""
        verifier.admit(request.client.host if request.client else "?")
        _too_large(request)
        data = await _read(file)
        return await verifier.document(data)

    return r
