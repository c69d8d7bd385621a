"""HTTP routes of the quota service: ``GET /v1/accounts/{account_id}/quota``."""

from __future__ import annotations

from fastapi import APIRouter, Header

from services.kernel import errors
from services.kernel.channels import ChannelView
from services.quota.ledger import Accounts


def router(channels: ChannelView, accounts: Accounts) -> APIRouter:
    r = APIRouter(tags=["quota"])

    @r.get("/v1/accounts/{account_id}/quota")
    async def account_quota(account_id: str, authorization: str | None = Header(None)):
        """Units of an account of the calling channel: `available = credited - committed - pending`."""
        channel = channels.authenticate(authorization)
        bal = await accounts.balance(channel.channel_id, account_id)
        if bal is None:
            raise errors.BubuhError(errors.NOT_FOUND, f"no account {account_id} for this channel")
        return {"account_id": account_id, **bal.as_dict()}

    return r
