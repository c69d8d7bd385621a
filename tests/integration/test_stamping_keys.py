"""The stamping worker with production-shaped keys: an HSM through PKCS#11 (SoftHSM2), and
PAdES B-T with a time-stamp from a local RFC 3161 authority."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import httpx
import pytest

from loadtests import corpus
from services.kernel import topics
from services.kernel.settings import REPO_ROOT, Settings
from services.stamping.signing import softhsm
from tests.flows import Db, auth, buy, decoded, post_stamp, read_topic, stamp_finished, stamp_meta
from tests.platform import PlatformProcess, add_channel
from tests.timestamping import running_tsa


async def _stamp_and_verify(settings, channel) -> dict:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=60) as api:
        await buy(api, channel, "hsm", 1)
        r = await post_stamp(api, channel, corpus.a4_text(21), stamp_meta("hsm"))
        done = await stamp_finished(api, channel, r.json()["request_id"])
        assert done["status"] == "completed", done
        pdf = (await api.get(f"/v1/stamps/{r.json()['request_id']}/document", headers=auth(channel))).content
        return (await api.post("/v1/verify", files={"file": ("x.pdf", pdf, "application/pdf")})).json()


async def test_worker_signs_through_pkcs11_with_softhsm(settings, tmp_path):
    module = softhsm.softhsm_module()
    if module is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 not installed (Debian package softhsm2)")
    p12 = Settings().keys_dir / "issuer-rsa2048.p12"
    # a token of our own, holding the dev issuer key (in a child: the import sets SOFTHSM2_CONF process-wide)
    code = ("import sys; from services.stamping.signing import softhsm; "
            f"t = softhsm.softhsm_import({str(tmp_path)!r}, {str(p12)!r}, 'bubuh-dev', token_label='bubuh-test'); "
            "print(t.conf_path)")
    made = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], cwd=REPO_ROOT, check=True,
                                   capture_output=True, text=True)
    conf = made.stdout.strip()
    front = await PlatformProcess(settings, api="all", workers="purchase,quota", name="front").start()
    worker = await PlatformProcess(settings, api="none", workers="stamping", name="hsm-worker", SOFTHSM2_CONF=conf,
                                   BUBUH_SIGNING_PKCS11_MODULE=module, BUBUH_SIGNING_PKCS11_TOKEN_LABEL="bubuh-test",
                                   BUBUH_SIGNING_PKCS11_PIN="1234", BUBUH_SIGNING_PKCS11_KEY_LABEL="issuer").start()
    try:
        verdict = await _stamp_and_verify(settings, add_channel(settings))
        assert verdict["valid"] is True, verdict
    finally:
        await worker.stop()
        await front.stop()


async def test_worker_with_a_tsa_makes_pades_b_t(settings, tmp_path):
    with running_tsa() as tsa:
        tsa_ca = tmp_path / "tsa-ca.pem"
        tsa_ca.write_bytes(tsa.ca_cert_pem)
        roots = f"{Settings().keys_dir / 'ca-rsa2048.pem'},{tsa_ca}"
        front = await PlatformProcess(settings, api="all", workers="purchase,quota", name="front",
                                      BUBUH_TRUST_ROOTS=roots).start()
        worker = await PlatformProcess(settings, api="none", workers="stamping", name="tsa-worker",
                                       BUBUH_PADES_LEVEL="b-t", BUBUH_SIGNING_TSA_URL=tsa.url).start()
        try:
            verdict = await _stamp_and_verify(settings, add_channel(settings))
            assert verdict["valid"] is True, verdict
            assert verdict["stamps"][0]["timestamped_at"] and verdict["stamps"][0]["timestamp_trusted"] is True
            assert tsa.requests >= 1
        finally:
            await worker.stop()
            await front.stop()


async def test_a_stamp_signed_after_its_reservation_expired_is_withheld_never_free(settings, tmp_path):
    """Issue 11: a 4 s reservation and a time-stamp server that takes 8 s. The worker starts in time,
    signs, and asks the ledger to post the unit after the expiry sweep voided it: the ledger refuses,
    and the stamp is withheld (request failed RESERVATION_EXPIRED, no document, SN unknown), the unit
    is back in the account. A second request with a patient reservation completes and is charged."""
    db = Db(settings)
    with running_tsa(delay_s=8.0) as tsa:
        tsa_ca = tmp_path / "tsa-ca.pem"
        tsa_ca.write_bytes(tsa.ca_cert_pem)
        roots = f"{Settings().keys_dir / 'ca-rsa2048.pem'},{tsa_ca}"
        front = await PlatformProcess(settings, api="all", workers="purchase,quota", name="front",
                                      BUBUH_TRUST_ROOTS=roots, BUBUH_RESERVATION_TTL_S="4",
                                      BUBUH_EXPIRY_INTERVAL_S="0.5").start()
        worker = await PlatformProcess(settings, api="none", workers="stamping", name="slow-tsa-worker",
                                       BUBUH_PADES_LEVEL="b-t", BUBUH_SIGNING_TSA_URL=tsa.url,
                                       BUBUH_SIGNING_TSA_TIMEOUT_S="30").start()
        channel = add_channel(settings)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=60) as api:
                await buy(api, channel, "slow", 1)
                r = await post_stamp(api, channel, corpus.a4_text(3), stamp_meta("slow"))
                rid = r.json()["request_id"]
                done = await stamp_finished(api, channel, rid, timeout=90)
                # the fault was seen: the worker did sign (StampSigned) and the ledger refused the late commit
                on_stamp_events = decoded(await read_topic(settings, topics.STAMP_EVENTS.name, at_least=2))
                signed = [m for m in on_stamp_events if type(m).__name__ == "StampSigned" and m.request_id == rid]
                assert signed, f"the worker never signed; the test saw no late commit: {done}"
                refused = [m for m in decoded(await read_topic(settings, topics.QUOTA_EVENTS.name, at_least=3))
                           if type(m).__name__ == "QuotaRefused" and m.request_id == rid]
                assert [m.operation for m in refused] == ["commit"]
                assert tsa.requests >= 1

                assert (done["status"], done["code"]) == ("failed", "RESERVATION_EXPIRED"), done
                assert "sn" not in done
                got = await api.get(f"/v1/stamps/{rid}/document", headers=auth(channel))
                assert got.status_code == 404
                sn = signed[0].sn
                assert (await api.get(f"/v1/verify/{sn}")).json()["known"] is False
                assert not any(type(m).__name__ == "StampCompleted" and m.request_id == rid for m in on_stamp_events)
                account = await db.fetch("quota", "SELECT credited, pending, committed FROM accounts "
                                                  "WHERE account_id = 'slow'")
                assert dict(account[0]) == {"credited": 1, "pending": 0, "committed": 0}
                output = await db.val("stamping", "SELECT output_ref FROM requests WHERE request_id = $1", rid)
                assert output and not (settings.documents_root / output).exists(), "the withheld stamp is still stored"
        finally:
            await worker.stop()
            await front.stop()
