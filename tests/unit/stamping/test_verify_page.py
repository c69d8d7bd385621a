"""The page behind the QR without the platform: content negotiation on `GET /v1/verify/{sn}`, the page's
upload form, and that everything a caller controls is escaped. The SN registry and the verdict are
stand-ins; the routes, the negotiation and the rendering are the service's own."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import pytest

from services.kernel.http import create_app
from services.kernel.settings import Settings
from services.stamping import api, verify_page
from services.stamping.public_verifier import ClientRate, Issued, PublicVerifier, issuer_name
from services.stamping.serial import SerialIssuer

SN = SerialIssuer(7).next()
CHROME = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8," \
         "application/signed-exchange;v=b3;q=0.7"
FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"

MODIFIED = {"valid": False, "code": "MODIFIED_AFTER_STAMPING", "signatures": 1, "revisions": 4,
            "reasons": [{"code": "MODIFIED_AFTER_STAMPING", "sn": SN, "field": "f", "revision": 4,
                         "changed": ["/Root/Pages/Kids[0]/Contents"], "detail": "<b>unexplained</b> xrefs"}],
            "stamps": [{"sn": SN, "valid": False, "code": "MODIFIED_AFTER_STAMPING", "stamp_revision": 3,
                        "signer": "<img src=x onerror=alert(1)> Issuer", "signing_time": "2026-11-30T06:00:00+00:00",
                        "timestamped_at": None}]}


class Registry(PublicVerifier):
    """A PublicVerifier whose registry and verdict are given, not read from PostgreSQL and the sandbox."""

    def __init__(self, rows: dict[str, list[Issued]], verdict: dict | None = None) -> None:
        super().__init__(None, [], None, ClientRate(per_s=100, burst=100))
        self.issuer = "Bubuh Development (NOT FOR PRODUCTION)"
        self.rows, self.verdict, self.uploads = rows, verdict, []

    async def _rows(self, sn: str) -> list[Issued]:
        return self.rows.get(sn, [])

    async def document(self, data: bytes) -> dict:
        self.uploads.append(data)
        return self.verdict


@pytest.fixture
def verifier() -> Registry:
    at = dt.datetime(2026, 11, 30, 6, 0, tzinfo=dt.UTC)
    return Registry({SN: [Issued("completed", "ab" * 32, at)]}, MODIFIED)


@pytest.fixture
async def client(verifier):
    app = create_app("test", [api.router(Settings(), None, None, None, verifier)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 1234)),
                                 base_url="http://testserver") as c:
        yield c


@pytest.mark.parametrize(("accept", "html"), [
    (None, False), ("*/*", False), ("application/json", False), ("application/json, text/html", False),
    ("text/html;q=0.5, application/json", False), ("text/html;q=0, */*", False), ("image/png", False),
    (CHROME, True), (FIREFOX, True), ("text/html", True), ("text/*", True), ("application/xhtml+xml", True),
    ("text/html, application/json;q=0.9", True), ("TEXT/HTML", True),
])
def test_only_a_client_that_ranks_html_above_json_gets_the_page(accept, html):
    assert verify_page.prefers_html(accept) is html


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
async def test_api_clients_keep_the_json_answer(client, verifier, accept):
    headers = {"Accept": accept} if accept else {}
    if accept is None:
        client.headers.pop("Accept", None)   # httpx sends */* by default; this is "no header at all"
    r = await client.get(f"/v1/verify/{SN}", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == await verifier.by_sn(SN)
    assert r.json() == {"sn": SN, "well_formed": True, "known": True, "used_once": True,
                        "issued_at": "2026-11-30T06:00:00+00:00", "document_sha256": "ab" * 32}
    assert r.headers["vary"] == "Accept"


async def test_a_browser_gets_the_page_in_indonesian_first(client):
    r = await client.get(f"/v1/verify/{SN}", headers={"Accept": CHROME})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert '<html lang="id">' in page and 'name="viewport"' in page
    assert "SAH: nomor seri ini diterbitkan dan dipakai satu kali." in page
    assert SN in page and "ab" * 32 in page and "2026-11-30 13:00:00 WIB" in page
    assert "Bubuh Development (NOT FOR PRODUCTION)" in page
    assert f'action="/v1/verify/{SN}/page?lang=id"' in page and 'enctype="multipart/form-data"' in page
    # nothing from elsewhere and no script; the header says so to the browser as well
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "default-src 'none'" in r.headers["content-security-policy"]
    english = (await client.get(f"/v1/verify/{SN}?lang=en", headers={"Accept": CHROME})).text
    assert '<html lang="en">' in english and "VALID: this serial number was issued and used once." in english
    assert f'action="/v1/verify/{SN}/page?lang=en"' in english


async def test_unknown_and_malformed_sns_get_an_invalid_banner(client):
    unknown = SerialIssuer(8).next()
    page = (await client.get(f"/v1/verify/{unknown}", headers={"Accept": CHROME})).text
    assert 'class="banner invalid"' in page and "tidak pernah diterbitkan" in page
    page = (await client.get("/v1/verify/nope?lang=en", headers={"Accept": CHROME})).text
    assert 'class="banner invalid"' in page and "not an e-Meterai serial number" in page


async def test_what_the_caller_controls_is_escaped(client):
    r = await client.get('/v1/verify/"><script>alert(1)<script>?lang=<b>', headers={"Accept": CHROME})
    page = r.text
    assert r.status_code == 200 and "<script" not in page.lower() and "<b>" not in page
    assert "&quot;&gt;&lt;SCRIPT&gt;ALERT(1)&lt;SCRIPT&gt;" in page
    # in URLs the SN is percent-encoded, so it cannot leave the attribute either
    assert 'action="/v1/verify/%22%3E%3CSCRIPT%3EALERT%281%29%3CSCRIPT%3E/page?lang=id"' in page
    assert '<html lang="id">' in page


def test_names_and_details_from_an_uploaded_file_are_escaped():
    facts = {"sn": SN, "well_formed": True, "known": True, "used_once": True, "issued_at": None,
             "document_sha256": None}
    page = verify_page.render(facts, "<i>issuer</i>", "en", verdict=MODIFIED)
    assert "<img" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; Issuer" in page and "&lt;b&gt;unexplained&lt;/b&gt;" in page


async def test_the_upload_form_shows_the_api_verdict_in_words(client, verifier):
    files = {"file": ("<u>stamped</u>.pdf", b"%PDF-1.7 not really", "application/pdf")}
    r = await client.post(f"/v1/verify/{SN}/page?lang=en", files=files, headers={"Accept": CHROME})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert verifier.uploads == [b"%PDF-1.7 not really"]
    page = r.text
    assert "Document check &lt;u&gt;stamped&lt;/u&gt;.pdf" in page and "<u>" not in page
    assert "DOCUMENT INVALID" in page and '<span id="doc-code">MODIFIED_AFTER_STAMPING</span>' in page
    assert "The document was changed after it was stamped" in page
    assert "/Root/Pages/Kids[0]/Contents" in page
    verifier.verdict = {"valid": True, "code": None, "reasons": [], "stamps": [{**MODIFIED["stamps"][0],
                                                                                "valid": True}]}
    page = (await client.post(f"/v1/verify/{SN}/page", files=files)).text
    assert "DOKUMEN SAH" in page and "doc-code" not in page


async def test_the_upload_form_without_a_file_says_so_in_html(client):
    r = await client.post(f"/v1/verify/{SN}/page", files={"file": ("", b"", "application/octet-stream")})
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/html")
    assert "Pilih berkas PDF terlebih dahulu." in r.text
    r = await client.post(f"/v1/verify/{SN}/page", data={"x": "1"})
    assert r.status_code == 415 and "UNSUPPORTED_MEDIA_TYPE" in r.text


async def test_an_upload_over_the_limit_is_refused_in_html_while_it_arrives(verifier):
    app = create_app("test", [api.router(Settings(verify_max_body_bytes=4096), None, None, None,
                                         verifier)])

    async def chunks():      # no Content-Length: BodyLimits stops it as it passes the limit
        yield (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.pdf\"\r\n"
               b"Content-Type: application/pdf\r\n\r\n")
        for _ in range(8):
            yield b"%" * 1024
        yield b"\r\n--b--\r\n"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        r = await c.post(f"/v1/verify/{SN}/page?lang=en", content=chunks(),
                         headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.headers["content-type"].startswith("text/html"), r.text
    assert "PDF_TOO_LARGE" in r.text and "The file is too large." in r.text and verifier.uploads == []


async def test_the_upload_form_is_rate_limited_like_the_api(client, verifier):
    verifier._rate = ClientRate(per_s=0.001, burst=1)
    files = {"file": ("a.pdf", b"%PDF-1.7", "application/pdf")}
    assert (await client.post(f"/v1/verify/{SN}/page", files=files)).status_code == 200
    r = await client.post(f"/v1/verify/{SN}/page?lang=en", files=files)
    assert r.status_code == 429 and "Too many checks from your address" in r.text


def test_the_issuer_is_named_by_the_trust_root(dev_ca_rsa, tmp_path):
    assert issuer_name([Path(dev_ca_rsa.ca_cert_pem)]) == "Bubuh Development (NOT FOR PRODUCTION)"
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert issuer_name([tmp_path / "junk.pem"]) == ""


def test_every_verdict_code_has_words_in_both_languages():
    from services.kernel import errors
    for code in errors.VERIFICATION_VERDICTS:
        for lang in verify_page.LANGS:
            assert verify_page.meaning(code.code, lang), (code.code, lang)


def test_each_stamp_shows_its_certificate_status_and_the_time_stamps_relied_on():
    stamp = {"sn": SN, "valid": True, "code": None, "stamp_revision": 2, "signer": "Issuer",
             "signing_time": None, "timestamped_at": "2026-12-01T05:00:00+00:00",
             "timestamp": {"time": "2026-12-01T05:00:00+00:00", "tsa": "Dev <TSA>", "trusted": True},
             "document_timestamp": {"time": "2026-12-01T05:01:00+00:00", "tsa": "Dev <TSA>", "trusted": True},
             "certificate_status": {"status": "revoked", "revoked_at": "2026-12-01T06:00:00+00:00",
                                    "etsi_indication": "PASSED", "detail": "revoked <after>"}}
    verdict = {"valid": True, "code": None, "reasons": [], "stamps": [stamp], "signatures": 1, "revisions": 3}
    page = verify_page.render({"sn": SN, "well_formed": True, "known": True, "used_once": True}, "Issuer", "en",
                              verdict=verdict)
    assert "revoked at 2026-12-01 13:00:00 WIB, after the time-stamp: the stamp stays valid" in page
    assert "2026-12-01 12:00:00 WIB by Dev &lt;TSA&gt;" in page and "2026-12-01 12:01:00 WIB" in page
    assert "revoked &lt;after&gt; [ETSI EN 319 102-1: PASSED]" in page
    before = {**stamp, "valid": False, "certificate_status": {**stamp["certificate_status"],
                                                             "etsi_indication": "INDETERMINATE/REVOKED_NO_POE"}}
    page = verify_page.render({"sn": SN}, "Issuer", "id", verdict={**verdict, "valid": False, "stamps": [before]})
    assert "dicabut pada 2026-12-01 13:00:00 WIB, sebelum cap waktu" in page
