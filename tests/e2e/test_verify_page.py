"""The page behind the QR, as a person with a phone meets it: a real headless Chromium (Debian's
``chromium``, driven by Playwright) with JavaScript switched off.

A letter is stamped on the running platform; the QR code is read back from the stamped PDF's
rendered page (poppler's ``pdftoppm``, then ``zbarimg``), and the browser opens exactly that URL.
The page must call the SN valid, the upload form must call the stamped file valid and a tampered
copy invalid with its reason, and the English switch must switch. The browser may talk only to the
platform on 127.0.0.1: any other request is aborted and fails the test (the page loads nothing
from elsewhere).

Screenshots are kept in ``.local/artifacts/verify-page/`` (``BUBUH_ARTIFACTS_DIR`` moves it);
``readme.png`` there is the README's ``docs/images/verify-page.png`` (README: "The page behind the QR").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from loadtests import corpus
from services.kernel.settings import REPO_ROOT
from tests.flows import auth, buy, post_stamp, stamp_finished, stamp_meta
from tests.unit.stamping import attacks

PHONE = {"width": 390, "height": 844}     # a common phone's CSS viewport


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (Debian package {package}; `make system-packages`)")
    return path


def artifacts_dir() -> Path:
    root = Path(os.environ.get("BUBUH_ARTIFACTS_DIR") or REPO_ROOT / ".local" / "artifacts")
    out = root / "verify-page"
    out.mkdir(parents=True, exist_ok=True)
    return out


def qr_url(pdf: Path) -> str:
    """What a phone's camera reads: the QR code on the rendered first page."""
    need("pdftoppm", "poppler-utils")
    zbarimg = need("zbarimg", "zbar-tools")
    subprocess.run(["pdftoppm", "-r", "200", "-f", "1", "-l", "1", "-png", "-singlefile", str(pdf),
                    str(pdf.with_suffix(""))], check=True, capture_output=True, timeout=60)
    decoded = subprocess.run([zbarimg, "--quiet", "--raw", "-Sdisable", "-Sqrcode.enable",
                              str(pdf.with_suffix(".png"))], capture_output=True, text=True, timeout=60)
    assert decoded.returncode == 0, f"no QR code found on the stamped page: {decoded.stderr}"
    codes = decoded.stdout.split()
    assert len(codes) == 1, codes
    return codes[0]


async def fits_the_phone(page) -> None:
    """Readable on a phone: nothing wider than the screen, so no sideways scrolling. (The test's own
    evaluate runs with the page's JavaScript off.)"""
    scroll, client = await page.evaluate("[document.documentElement.scrollWidth, "
                                         "document.documentElement.clientWidth]")
    assert scroll <= client == PHONE["width"], (scroll, client)


async def test_the_qr_opens_a_page_that_checks_documents_in_a_browser(platform, api, channel, settings, tmp_path):
    chromium = need("chromium", "chromium")
    from playwright.async_api import async_playwright

    await buy(api, channel, "qr", 1)
    r = await post_stamp(api, channel, corpus.a4_text(11), stamp_meta("qr"))
    assert r.status_code == 202, r.text
    done = await stamp_finished(api, channel, r.json()["request_id"])
    assert done["status"] == "completed", done
    sn = done["sn"]
    stamped = tmp_path / "stamped.pdf"
    stamped.write_bytes((await api.get(f"/v1/stamps/{r.json()['request_id']}/document", headers=auth(channel))).content)
    tampered = tmp_path / "tampered.pdf"     # the page's text rewritten in an appended revision
    tampered.write_bytes(attacks.isa_content(stamped.read_bytes()))

    url = qr_url(stamped)
    assert url == f"{settings.public_url}/v1/verify/{sn}"
    platform_host = urlsplit(url).netloc
    shots = artifacts_dir()
    elsewhere: list[str] = []

    async def only_the_platform(route):
        if urlsplit(route.request.url).netloc == platform_host:
            await route.continue_()
        else:
            elsewhere.append(route.request.url)
            await route.abort()

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = await browser.new_context(viewport=PHONE, java_script_enabled=False, is_mobile=True,
                                                has_touch=True, locale="id-ID")
            await context.route("**/*", only_the_platform)
            page = await context.new_page()

            # 1. the scanned URL: the SN's facts with a valid banner, in Indonesian
            response = await page.goto(url)
            assert response.status == 200 and response.headers["content-type"].startswith("text/html")
            assert await page.locator("html").get_attribute("lang") == "id"
            assert (await page.locator("#sn").inner_text()) == sn
            banner = page.locator("#sn-verdict")
            assert "valid" in (await banner.get_attribute("class")).split()
            assert "SAH: nomor seri ini diterbitkan dan dipakai satu kali." in await banner.inner_text()
            body = await page.locator("body").inner_text()
            assert "Dipakai satu kali" in body and "Bubuh Development (NOT FOR PRODUCTION)" in body
            await fits_the_phone(page)
            await page.screenshot(path=shots / "sn-id.png", full_page=True)

            # 2. the upload form with the stamped file: the API's verdict, valid
            await page.set_input_files("#file", stamped)
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            verdict = page.locator("#doc-verdict")
            assert "valid" in (await verdict.get_attribute("class")).split()
            assert "DOKUMEN SAH" in await verdict.inner_text()
            # the stamp's certificate status, as its own validation data establish it (none at B-B)
            assert "Status sertifikat penanda tangan" in await page.locator("#doc-result").inner_text()
            await page.screenshot(path=shots / "document-valid-id.png", full_page=True)
            await page.screenshot(path=shots / "readme.png", full_page=True)

            # 3. the tampered copy: invalid, with the code and its meaning in words
            await page.set_input_files("#file", tampered)
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            assert "DOKUMEN TIDAK SAH" in await page.locator("#doc-verdict").inner_text()
            assert (await page.locator("#doc-code").inner_text()) == "MODIFIED_AFTER_STAMPING"
            assert "Dokumen diubah setelah dibubuhi e-Meterai" in await page.locator("#doc-result").inner_text()
            await page.click("#doc-result .reasons summary")     # <details> opens without JavaScript
            assert "/Root/Pages/Kids[0]/Contents" in await page.locator("#doc-result .reasons details").inner_text()
            await fits_the_phone(page)
            await page.screenshot(path=shots / "document-tampered-id.png", full_page=True)

            # 4. the English switch, and the form keeps the language
            async with page.expect_navigation():
                await page.click("#lang")
            assert await page.locator("html").get_attribute("lang") == "en"
            assert "VALID: this serial number was issued and used once." in \
                await page.locator("#sn-verdict").inner_text()
            await page.set_input_files("#file", tampered)
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            assert "DOCUMENT INVALID" in await page.locator("#doc-verdict").inner_text()
            assert "The document was changed after it was stamped" in \
                await page.locator("#doc-result").inner_text()
            await page.screenshot(path=shots / "document-tampered-en.png", full_page=True)
        finally:
            await browser.close()

    assert elsewhere == [], f"the page asked for something other than the platform: {elsewhere}"
    # the same URL without a browser's Accept header stays the API's JSON
    as_api = await api.get(f"/v1/verify/{sn}")
    assert as_api.headers["content-type"] == "application/json" and as_api.json()["used_once"] is True
