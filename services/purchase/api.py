"""HTTP routes of the purchase service: ``POST /v1/purchases``, ``GET /v1/purchases/{id}``,
``GET /v1/purchases?channel_order_id=``."""

from __future__ import annotations

import datetime as dt
import json

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from services.kernel import errors, http
from services.kernel.channels import ChannelView
from services.kernel.http import body_limit, error_responses, read_json_body
from services.kernel.settings import Settings
from services.purchase.http_intake import Intake
from services.purchase.validation import PurchaseOrder


class PurchaseRequest(http.StrictBody):
    channel_order_id: str = Field(description="The channel's own order id: the idempotency key.")
    account_id: str = Field(description="The buyer's account at the channel (1-64 of A-Z a-z 0-9 . _ : @ -).")
    quantity: int = Field(description="Stamps bought, 1..10000.")
    amount: int = Field(description="Rupiah paid; must equal quantity x 10000.")
    paid_at: dt.datetime = Field(description="When the buyer paid (RFC 3339 with offset); not in the future.")
    payment_ref: str = Field("", description="The payment's reference at the channel's payment provider.")
    buyer_email: str = Field("", description="Optional: where to tell the buyer the quota arrived.")


class PurchaseAccepted(BaseModel):
    purchase_id: str
    status: str
    status_url: str


ERRORS = error_responses(401, 403, 404, 409, 413, 415, 422, 503)


def router(settings: Settings, channels: ChannelView, intake: Intake) -> APIRouter:
    r = APIRouter(tags=["purchases"])

    @r.post("/v1/purchases", status_code=202, response_model=PurchaseAccepted, responses=ERRORS,
            openapi_extra=body_limit(settings.purchase_max_body_bytes, request_body={
                "required": True, "content": {"application/json": {"schema": PurchaseRequest.model_json_schema()}}}))
    async def submit_purchase(request: Request, authorization: str | None = Header(None)):
        """Record a paid order. 202 once the event is durable in Kafka; repeat with the same
        `channel_order_id` and body to get the same answer (safe retries). The API key is checked before
        the body is read; the body is held to `x-max-body-bytes` as it arrives."""
        channel = channels.authenticate(authorization)
        raw = await read_json_body(request, settings.purchase_max_body_bytes)
        try:
            body = PurchaseRequest.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            raise errors.BubuhError(errors.BODY_INVALID, _first_error(exc)) from None
        order = PurchaseOrder(channel_id=channel.channel_id, channel_order_id=body.channel_order_id,
                              account_id=body.account_id, quantity=body.quantity, amount=body.amount,
                              paid_at=body.paid_at, payment_ref=body.payment_ref, buyer_email=body.buyer_email)
        accepted = await intake.submit(channel, order)
        return JSONResponse(status_code=202, content={
            "purchase_id": accepted.purchase_id, "status": accepted.status,
            "status_url": f"{settings.public_url}/v1/purchases/{accepted.purchase_id}"})

    @r.get("/v1/purchases", responses=ERRORS)
    async def purchases_by_order(channel_order_id: str = Query(..., min_length=1, max_length=128,
                                                               pattern=r"^[\x21-\x7e]+$",
                                                               description="The channel's own order id "
                                                                           "(1-128 printable ASCII)."),
                                 authorization: str | None = Header(None)):
        """Every purchase recorded under one of your order ids, oldest first, through either door: at
        most one `confirmed` (an order id is credited once, ever), refusals with their `code`."""
        channel = channels.authenticate(authorization)
        return {"channel_order_id": channel_order_id,
                "purchases": await intake.by_order(channel.channel_id, channel_order_id)}

    @r.get("/v1/purchases/{purchase_id}", responses=ERRORS)
    async def purchase_status(purchase_id: str, authorization: str | None = Header(None)):
        """`accepted` (in flight), `confirmed` (credited next), or `rejected` with its code."""
        channel = channels.authenticate(authorization)
        found = await intake.status(channel.channel_id, purchase_id)
        if found is None:
            raise errors.BubuhError(errors.NOT_FOUND, f"no purchase {purchase_id} for this channel")
        return found

    return r


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    return f"not JSON: {exc}"
