"""Public verification against the real SN registry (the stamping schema's ``requests`` table on PostgreSQL).

What only the issuer can say about a stamp: the SN exists, it was issued once, and the revision the stamp
signed is byte for byte the file that was delivered for it. The stamps are real (the issuer's dev key);
the rows are written the way the worker writes a completed request.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest

from loadtests import corpus
from services.stamping.public_verifier import ClientRate, PublicVerifier
from services.stamping.sandbox import ProcessLimits, Sandbox
from services.stamping.serial import SerialIssuer
from services.stamping.signing import dev_ca
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.request import StampRequest
from tests.component.handler_support import service_pool
from tests.unit.stamping import attacks

SERIALS = SerialIssuer(93)


@pytest.fixture(scope="module")
def issuer(tmp_path_factory):
    ca = dev_ca.dev_ca(tmp_path_factory.mktemp("dev-ca"), "rsa2048")
    engine = StampingEngine(SignerConfig(p12_path=str(ca.p12_path), p12_password=ca.password),
                            "https://verify.bubuh.example")
    return ca, engine


@pytest.fixture
async def checker():
    """The verification sandbox as the service runs it: the report comes back from a child process."""
    box = await Sandbox("verify-test", size=1, budget=ProcessLimits(cpu_s=60, memory_bytes=1 << 30, wall_s=120)).start()
    yield box
    await box.stop()


def public(pool, ca, checker) -> PublicVerifier:
    return PublicVerifier(pool, [ca.ca_cert_pem], checker, ClientRate(per_s=100, burst=100))


async def record(pool, sn: str, pdf: bytes | None, status: str = "completed") -> None:
    await pool.execute(
        "INSERT INTO requests (request_id, channel_id, account_id, status, sn, output_sha256, finished_at) "
        "VALUES ($1, 'ch', 'acct', $2, $3, $4, now())",
        str(uuid.uuid4()), status, sn, hashlib.sha256(pdf).hexdigest() if pdf is not None else None)


async def test_the_registry_decides_sn_known_used_once_and_as_issued(settings, issuer, checker):
    ca, engine = issuer
    req = StampRequest(SERIALS.next(), 1, (380, 60, 560, 140))
    delivered = engine.stamp(corpus.a4_text(3), req)
    async with service_pool(settings, "stamping") as pool:
        verifier = public(pool, ca, checker)

        before = await verifier.document(delivered)  # stamped, but never recorded: not one we issued
        assert (before["valid"], before["code"]) == (False, "SN_UNKNOWN"), before

        await record(pool, req.sn, delivered)
        answer = await verifier.document(delivered)
        assert answer["valid"] is True and answer["stamps"][0]["hash_matches_issued"], answer
        assert (await verifier.by_sn(req.sn))["document_sha256"] == hashlib.sha256(delivered).hexdigest()

        # the same SN signed on another file (a replayed or duplicated signing): not the file delivered
        other = engine.stamp(corpus.a4_text(4), req)
        answer = await verifier.document(other)
        assert (answer["valid"], answer["code"]) == (False, "SN_REUSED"), answer
        assert answer["stamps"][0]["sn_known"] and not answer["stamps"][0]["hash_matches_issued"]

        # the delivered file with its page replaced afterwards: the registry matches, the diff does not
        changed = attacks.isa_content(delivered)
        answer = await verifier.document(changed)
        assert (answer["valid"], answer["code"]) == (False, "MODIFIED_AFTER_STAMPING"), answer
        assert answer["stamps"][0]["hash_matches_issued"] and answer["reasons"][0]["revision"] == 3


async def test_a_voided_sn_is_unknown(settings, issuer, checker):
    ca, engine = issuer
    req = StampRequest(SERIALS.next(), 1, (380, 60, 560, 140))
    pdf = engine.stamp(corpus.a4_text(5), req)
    async with service_pool(settings, "stamping") as pool:
        await record(pool, req.sn, None, status="failed")  # the SN was issued, then its request failed
        answer = await public(pool, ca, checker).document(pdf)
        assert (answer["valid"], answer["code"]) == (False, "SN_UNKNOWN"), answer
