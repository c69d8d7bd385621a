"""``bubuh demo``: the README's walkthrough, run against the platform that ``make up`` started.

Registers a channel, posts a paid purchase over HTTP, waits for the quota to show it, stamps a
sample letter, writes the stamped PDF under ``.local/demo/`` and verifies it publicly; each step is
printed as the curl command a channel developer would type.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import secrets
import time
from pathlib import Path

import httpx

from services.kernel.settings import Settings
from services.operator import dss_validator
from services.purchase import admin
from services.stamping.document import signature_validation


async def run(settings: Settings) -> int:
    base = settings.public_url
    print("== 1. register a channel (bubuh channel add demo-pos --json)")
    creds = await admin.add_channel(settings, "demo-pos")
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
        if not ok:
            return 1
        return await _stamp(client, settings, auth, order["account_id"])


def sample_letter() -> bytes:
    """A one-page A4 "Surat Pernyataan", made here so the demo needs no file of its own."""
    import pikepdf

    pdf = pikepdf.new()
    lines = ["SURAT PERNYATAAN", "", "Yang bertanda tangan di bawah ini menyatakan bahwa data yang",
             "disampaikan dalam pendaftaran adalah benar.", "", "Jakarta, 5 September 2024"]
    text = b"BT /F1 12 Tf 72 770 Td 16 TL " + b" ".join(
        b"(" + ln.encode().replace(b"(", b"\\(").replace(b")", b"\\)") + b") '" for ln in lines) + b" ET"
    font = pikepdf.Dictionary(Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont=pikepdf.Name.Helvetica)
    page = pikepdf.Page(pikepdf.Dictionary(Type=pikepdf.Name.Page, MediaBox=[0, 0, 595.276, 841.89],
                                           Resources=pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=font)),
                                           Contents=pdf.make_stream(text)))
    pdf.pages.append(page)
    out = io.BytesIO()
    pdf.save(out, min_version="1.7")
    return out.getvalue()


def _dss_indication(pdf: bytes, anchor) -> str:
    """The outside validator's word on our stamp, e.g. ``TOTAL_PASSED (PAdES-BASELINE-LT)``."""
    try:
        report = dss_validator.validate(pdf, anchor)
    except (dss_validator.DssUnavailable, dss_validator.DssFailed) as exc:
        return f"not run: {str(exc).splitlines()[0]}"
    return "; ".join(f"{v.indication}{' ' + v.subindication if v.subindication else ''} ({v.format})"
                     for v in report.signatures) or "no signature found"


async def _stamp(client: httpx.AsyncClient, settings: Settings, auth: dict, account_id: str) -> int:
    meta = {"account_id": account_id, "page": 1, "llx": 400, "lly": 60, "urx": 540, "ury": 200,
            "doc_type": "3", "reason": "Surat Pernyataan", "location": "Jakarta"}
    print(f"== 5. stamp a letter\n   curl -X POST {settings.public_url}/v1/stamps -H 'Authorization: Bearer …' "
          f"-F file=@letter.pdf -F 'meta={json.dumps(meta)}'")
    r = await client.post("/v1/stamps", headers=auth, data={"meta": json.dumps(meta)},
                          files={"file": ("letter.pdf", sample_letter(), "application/pdf")})
    print(f"   -> {r.status_code} {r.text}")
    if r.status_code != 202:
        return 1
    rid = r.json()["request_id"]
    status: dict = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = (await client.get(f"/v1/stamps/{rid}", headers=auth)).json()
        if status.get("status") in ("completed", "failed"):
            break
        await asyncio.sleep(0.2)
    print(f"   -> {json.dumps(status)}")
    if status.get("status") != "completed":
        return 1
    pdf = (await client.get(f"/v1/stamps/{rid}/document", headers=auth)).content
    out = settings.local_dir / "demo" / f"stamped-{status['sn']}.pdf"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pdf)
    print(f"== 6. the stamped PDF: {out}")
    # the anchor verification trusts (BUBUH_TRUST_ROOTS' first file), else the local PKI's
    named = [p.strip() for p in settings.trust_roots.split(",") if p.strip()]
    anchor = Path(named[0]) if named else settings.pki_dir / "trust-anchor.pem"
    print(f"   PAdES level: {await asyncio.to_thread(signature_validation.pades_level, pdf)} "
          f"(BUBUH_PADES_LEVEL={settings.pades_level}; trust anchor {anchor})")
    print(f"   EU DSS {dss_validator.VERSION}, offline, default policy, this trust anchor only: "
          + ("" if dss_validator.built() else "(fetching its jars from Maven Central once: a minute or two) "),
          end="", flush=True)
    print(await asyncio.to_thread(_dss_indication, pdf, anchor))
    verdict = (await client.post("/v1/verify", files={"file": (out.name, pdf, "application/pdf")})).json()
    print(f"== 7. verify it (public): curl -X POST {settings.public_url}/v1/verify -F file=@{out}\n"
          f"   -> {json.dumps(verdict)}")
    ok = verdict.get("valid") is True
    print("== stamped and verified: " + ("yes" if ok else "NO"))
    return 0 if ok else 1
