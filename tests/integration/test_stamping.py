"""Stamping end to end on the running platform: intake checks, the flow through the ledger, the
output's validity (pyHanko's validator and poppler's pdfsig), redelivery, and public verification."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

import pytest

from loadtests import corpus
from services.kernel import events, topics
from services.kernel.producer import Producer
from services.kernel.settings import Settings
from tests.flows import (
    Db,
    auth,
    buy,
    consumers_caught_up,
    decoded,
    post_stamp,
    read_topic,
    stamp_finished,
    stamp_meta,
    wait_for,
)
from tests.unit.stamping import attacks

pytestmark = pytest.mark.shared_platform   # one platform for the module; every test has its own channel


def pdfsig_report(pdf: bytes, tmp_path) -> str:
    """poppler's pdfsig with an NSS database that trusts the dev CA the workers sign with."""
    if not (shutil.which("pdfsig") and shutil.which("certutil")):
        pytest.skip("pdfsig/certutil missing (Debian poppler-utils, libnss3-tools)")
    nss = tmp_path / "nss"
    nss.mkdir(exist_ok=True)
    if not (nss / "cert9.db").exists():
        subprocess.run(["certutil", "-N", "-d", f"sql:{nss}", "--empty-password"], check=True, capture_output=True)
        subprocess.run(["certutil", "-A", "-n", "bubuh-dev-ca", "-t", "CT,C,C", "-i",
                        str(Settings().keys_dir / "ca-rsa2048.pem"), "-d", f"sql:{nss}"], check=True,
                       capture_output=True)
    path = tmp_path / "out.pdf"
    path.write_bytes(pdf)
    return subprocess.run(["pdfsig", "-nssdir", f"sql:{nss}", str(path)], capture_output=True, text=True).stdout


async def settled_quota(api, channel, account: str) -> dict:
    """The account once the ledger has applied every outcome (stamps end before their commit lands)."""
    async def settled():
        q = (await api.get(f"/v1/accounts/{account}/quota", headers=auth(channel))).json()
        return q if q.get("pending") == 0 else None
    return await wait_for(settled, what=f"{account}: no pending unit")


async def intake_stages(api) -> dict[str, float]:
    """``bubuh_stamp_intake_stage_seconds``' count per stage, from the API's /metrics."""
    body = (await api.get("/metrics")).text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^bubuh_stamp_intake_stage_seconds_count\{stage="(\w+)"\} (\S+)$', body, re.M)}


async def test_a_stamp_is_issued_charged_once_and_verifies(platform, api, channel, settings, tmp_path):
    await buy(api, channel, "acct-1", 2)
    stages_before = await intake_stages(api)
    r = await post_stamp(api, channel, corpus.a4_text(1), stamp_meta())
    assert r.status_code == 202, r.text
    # each stage of the 202's path timed once (no Idempotency-Key: no lookup of an earlier attempt)
    stages = await intake_stages(api)
    assert {k: stages[k] - stages_before.get(k, 0.0) for k in stages} == {
        "inspect": 1, "idempotency": 0, "store": 1, "record": 1, "publish": 1, "position": 1}
    accepted = r.json()
    # position: the requests signed before it (0 with nothing ahead; it counted itself before 7ea311e)
    assert accepted["status"] == "queued" and accepted["position"] >= 0 and accepted["eta_seconds"] >= 0
    done = await stamp_finished(api, channel, accepted["request_id"])
    assert done["status"] == "completed" and len(done["sn"]) == 22
    pdf = (await api.get(f"/v1/stamps/{accepted['request_id']}/document", headers=auth(channel))).content
    verdict = (await api.post("/v1/verify", files={"file": ("x.pdf", pdf, "application/pdf")})).json()
    assert verdict["valid"] is True and verdict["code"] is None and verdict["reasons"] == []
    assert verdict["stamps"][0]["sn"] == done["sn"]
    # the same file with its page content replaced in an appended revision: the stamp no longer vouches
    changed = attacks.isa_content(pdf)
    verdict = (await api.post("/v1/verify", files={"file": ("x.pdf", changed, "application/pdf")})).json()
    assert verdict["valid"] is False and verdict["code"] == "MODIFIED_AFTER_STAMPING", verdict
    assert "/Root/Pages/Kids[0]/Contents" in verdict["reasons"][0]["changed"]
    assert verdict["reasons"][0]["revision"] == verdict["stamps"][0]["stamp_revision"] + 1
    by_sn = (await api.get(f"/v1/verify/{done['sn']}")).json()
    assert by_sn["known"] and by_sn["used_once"]
    report = pdfsig_report(pdf, tmp_path)
    assert "Signature is Valid." in report and "Certificate is Trusted." in report, report
    quota = await settled_quota(api, channel, "acct-1")
    assert quota == {"account_id": "acct-1", "credited": 2, "pending": 0, "committed": 1, "available": 1}


async def test_an_earlier_signature_stays_valid_after_our_stamp(platform, api, channel, tmp_path):
    await buy(api, channel, "signer", 1)
    signed = await asyncio.to_thread(corpus.presigned, 3)
    r = await post_stamp(api, channel, signed.data, stamp_meta("signer", lly=300, ury=460))
    done = await stamp_finished(api, channel, r.json()["request_id"])
    assert done["status"] == "completed", done
    pdf = (await api.get(f"/v1/stamps/{r.json()['request_id']}/document", headers=auth(channel))).content
    report = pdfsig_report(pdf, tmp_path)
    assert report.count("Signature is Valid.") == 2, report
    verdict = (await api.post("/v1/verify", files={"file": ("x.pdf", pdf, "application/pdf")})).json()
    assert verdict["signatures"] == 2 and verdict["valid"] is True


async def test_intake_refuses_poison_with_codes_and_good_requests_flow_past(platform, api, channel):
    await buy(api, channel, "p", 2)
    expected = {
        "not-a-pdf": "PDF_INVALID", "zero-bytes": "PDF_INVALID", "truncated": "PDF_MALFORMED",
        "encrypted": "PDF_ENCRYPTED", "deeply-nested": "PDF_TOO_COMPLEX",
    }   # "50mb" is refused before it is read (test_intake_limits.py): httpx, which reads the answer
    # only after writing the whole body, then sees the connection close under it
    for item in await asyncio.to_thread(corpus.poison):
        if item.name not in expected:
            continue
        r = await post_stamp(api, channel, item.data, stamp_meta("p"))
        assert (r.status_code, r.json()["code"]) in ((422, expected[item.name]), (413, expected[item.name])), \
            (item.name, r.text)
    good = await post_stamp(api, channel, corpus.a4_text(2), stamp_meta("p"))
    assert good.status_code == 202
    r = await post_stamp(api, channel, corpus.a4_text(2), stamp_meta("p", page=9))
    assert r.json()["code"] == "PLACEMENT_INVALID"
    r = await post_stamp(api, channel, corpus.a4_text(2), stamp_meta("p", llx=10_000, urx=10_100))
    assert r.json()["code"] == "PLACEMENT_INVALID"
    r = await post_stamp(api, channel, corpus.a4_text(2, version="1.4"), stamp_meta("p", profile="cpns"))
    assert r.json()["code"] == "PROFILE_VIOLATION"
    r = await post_stamp(api, channel, corpus.scan_800k(1), stamp_meta("p", profile="cpns"))
    assert r.status_code == 202, r.text   # 790 KB, A4, PDF 1.7: inside the CPNS rules
    r = await api.post("/v1/stamps", headers=auth(channel), json={"x": 1})
    assert r.json()["code"] in ("UNSUPPORTED_MEDIA_TYPE", "BODY_INVALID")
    done = await stamp_finished(api, channel, good.json()["request_id"])
    assert done["status"] == "completed"


async def test_idempotency_key_gives_one_request(platform, api, channel):
    await buy(api, channel, "i", 3)
    pdf = corpus.a4_text(4)
    first = await post_stamp(api, channel, pdf, stamp_meta("i"), idempotency_key="order-77")
    await stamp_finished(api, channel, first.json()["request_id"])
    again = await post_stamp(api, channel, pdf, stamp_meta("i"), idempotency_key="order-77")
    assert again.status_code == 202 and again.json()["request_id"] == first.json()["request_id"]
    other = await post_stamp(api, channel, corpus.a4_text(5), stamp_meta("i"), idempotency_key="order-77")
    assert (other.status_code, other.json()["code"]) == (409, "IDEMPOTENCY_MISMATCH")
    quota = await settled_quota(api, channel, "i")
    assert quota["committed"] == 1 and quota["pending"] == 0


async def test_no_quota_means_failed_without_a_charge(platform, api, channel):
    await buy(api, channel, "poor", 1)
    first = await post_stamp(api, channel, corpus.a4_text(6), stamp_meta("poor"))
    second = await post_stamp(api, channel, corpus.a4_text(7), stamp_meta("poor"))
    outcomes = sorted([(await stamp_finished(api, channel, r.json()["request_id"]))["status"]
                       for r in (first, second)])
    assert outcomes == ["completed", "failed"]
    failed = [await stamp_finished(api, channel, r.json()["request_id"]) for r in (first, second)]
    assert [f.get("code") for f in failed if f["status"] == "failed"] == ["QUOTA_INSUFFICIENT"]
    quota = await settled_quota(api, channel, "poor")
    assert (quota["committed"], quota["pending"], quota["available"]) == (1, 0, 0)


async def test_the_same_events_delivered_twice_give_one_sn_and_one_charge(platform, api, channel, settings):
    await buy(api, channel, "twice", 3)
    r = await post_stamp(api, channel, corpus.a4_text(8), stamp_meta("twice"))
    rid = r.json()["request_id"]
    first = await stamp_finished(api, channel, rid)
    requested = [rec for rec in await read_topic(settings, topics.STAMP_REQUESTED.name, at_least=1)
                 if decoded([rec])[0].request_id == rid]
    # keyed by account (docs/topics.md): an account's reservations on one partition, in the order accepted
    assert [rec.key.decode() for rec in requested] == [f"{channel['channel_id']}/twice"]
    reserved = [rec for rec in await read_topic(settings, topics.QUOTA_EVENTS.name, at_least=2)
                if type(decoded([rec])[0]).__name__ == "QuotaReserved" and decoded([rec])[0].request_id == rid]
    producer = Producer(settings)
    await producer.start()
    try:
        for rec in requested + reserved:   # stamp.requested to the ledger, QuotaReserved to the worker
            await producer.publish(events.Outgoing(rec.topic, rec.key, rec.value, list(rec.headers)))
    finally:
        await producer.stop()
    await wait_for(lambda: consumers_caught_up(settings), what="every consumer past the re-delivered events")
    again = (await api.get(f"/v1/stamps/{rid}", headers=auth(channel))).json()
    assert again["sn"] == first["sn"]
    quota = await settled_quota(api, channel, "twice")
    assert (quota["committed"], quota["pending"]) == (1, 0)
    completions = [m for m in decoded(await read_topic(settings, topics.STAMP_EVENTS.name, at_least=1))
                   if m.request_id == rid]
    assert len({m.sn for m in completions}) == 1
    db = Db(settings)
    assert await db.val("stamping", "SELECT count(*) FROM requests WHERE sn = $1", first["sn"]) == 1


async def test_a_channel_cannot_read_anothers_stamp(platform, api, channel, settings):
    from tests.platform import add_channel
    other = add_channel(settings, "other")
    await buy(api, channel, "mine", 1)
    r = await post_stamp(api, channel, corpus.a4_text(9), stamp_meta("mine"))
    await stamp_finished(api, channel, r.json()["request_id"])
    await wait_for(lambda: _known(api, other), what="other channel known")
    for path in (f"/v1/stamps/{r.json()['request_id']}", f"/v1/stamps/{r.json()['request_id']}/document"):
        got = await api.get(path, headers=auth(other))
        assert (got.status_code, got.json()["code"]) == (404, "NOT_FOUND")


async def _known(api, channel):
    return (await api.get("/v1/stamps/none", headers=auth(channel))).status_code == 404


async def test_a_document_that_breaks_the_signer_fails_alone_and_releases_its_unit(platform, api, channel):
    await buy(api, channel, "crash", 3)
    bad = await post_stamp(api, channel, corpus.crashes_signer(1), stamp_meta("crash"))
    assert bad.status_code == 202      # intake cannot tell: only the signer trips over it
    good = [await post_stamp(api, channel, corpus.a4_text(30 + i), stamp_meta("crash")) for i in range(2)]
    failed = await stamp_finished(api, channel, bad.json()["request_id"])
    assert (failed["status"], failed["code"]) == ("failed", "SIGNING_FAILED")
    assert [(await stamp_finished(api, channel, g.json()["request_id"]))["status"] for g in good] == ["completed"] * 2

    async def settled():
        q = (await api.get("/v1/accounts/crash/quota", headers=auth(channel))).json()
        return q if q["pending"] == 0 and q["committed"] == 2 else None
    quota = await wait_for(settled, what="the failed stamp's unit released")
    assert quota["available"] == 1
