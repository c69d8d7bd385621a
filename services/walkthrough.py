"""``bubuh demo``: the README's walkthrough, run against the platform that ``make up`` started.

Registers a channel, posts a paid purchase over HTTP, and waits for the quota to show it, printing
each step as the curl command a channel developer would type.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import secrets
import time

import httpx

from services.kernel.settings import Settings
from services.purchase import admin


async def run(settings: Settings) -> int:
    base = settings.public_url
    print("== 1. register a channel (bubuh channel add demo-pos --json)")
    args = argparse.Namespace(channel_command="add", name="demo-pos", webhook="", profile="standard", json=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        await admin.channel_command(settings, args)
    creds = json.loads(buf.getvalue())
    print(f"   channel {creds['channel_id']}, api key {creds['api_key'][:10]}...")
    auth = {"Authorization": f"Bearer {creds['api_key']}"}
    order = {"channel_order_id": f"POS-{secrets.token_hex(4)}", "account_id": "applicant-3171",
             "quantity": 2, "amount": 20000, "paid_at": dt.datetime.now(dt.UTC).isoformat(),
             "payment_ref": "VA-8808-1234"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        print(f"== 2. post a purchase\n   curl -X POST {base}/v1/purchases -H 'Authorization: Bearer …' "
              f"-H 'Content-Type: application/json' -d '{json.dumps(order)}'")
        deadline = time.monotonic() + 20
        while True:   # the API authenticates from the channel topic: a fresh channel appears within moments
            r = await client.post("/v1/purchases", json=order, headers=auth)
            if r.status_code != 401 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        print(f"   -> {r.status_code} {r.text}")
        if r.status_code != 202:
            return 1
        purchase = r.json()
        print(f"== 3. follow it\n   curl {purchase['status_url']} -H 'Authorization: Bearer …'")
        status = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = (await client.get(f"/v1/purchases/{purchase['purchase_id']}", headers=auth)).json()
            if status.get("status") != "accepted":
                break
            await asyncio.sleep(0.2)
        print(f"   -> {json.dumps(status)}")
        print(f"== 4. read the quota\n   curl {base}/v1/accounts/{order['account_id']}/quota "
              "-H 'Authorization: Bearer …'")
        quota = {}
        while time.monotonic() < deadline:
            q = await client.get(f"/v1/accounts/{order['account_id']}/quota", headers=auth)
            quota = q.json()
            if q.status_code == 200 and quota.get("available", 0) >= order["quantity"]:
                break
            await asyncio.sleep(0.2)
        print(f"   -> {json.dumps(quota)}")
        ok = quota.get("credited") == order["quantity"]
        print("== paid means credited: " + ("yes" if ok else "NO"))
        return 0 if ok else 1
