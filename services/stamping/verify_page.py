"""The page behind the QR: what a person who scans a stamp with a phone sees.

``GET /v1/verify/{sn}`` answers JSON to API clients and this page to browsers (``prefers_html``
decides on the ``Accept`` header), and the page's upload form posts to ``POST /v1/verify/{sn}/page``,
which runs the same verification as ``POST /v1/verify`` and renders its verdict. Nothing here
decides anything: the facts and verdicts come from ``public_verifier.py``; this module only words them.

Why plain strings and ``html.escape`` rather than a template engine: one page with a handful of
blocks, and every value that reaches it passes ``_e`` (the SN comes from the URL, signer names from
certificates inside an uploaded file). Bahasa Indonesia first; ``?lang=en`` switches to English.
The page loads nothing from anywhere (inline CSS, no scripts, no fonts), and ``HEADERS`` carries a
Content-Security-Policy that forbids it to, so a scan works on a slow phone connection and leaks
nothing to a third party.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from urllib.parse import quote

LANGS = ("id", "en")
WIB = dt.timezone(dt.timedelta(hours=7), "WIB")

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Vary": "Accept",
}


# --- content negotiation ---------------------------------------------------------------------

def _media_ranges(accept: str) -> list[tuple[str, float]]:
    ranges = []
    for part in accept.split(","):
        fields = part.split(";")
        media = fields[0].strip().lower()
        if "/" not in media:
            continue
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value.strip())))
                except ValueError:
                    q = 0.0
        ranges.append((media, q))
    return ranges


def _quality(ranges: list[tuple[str, float]], media_type: str) -> float:
    """RFC 9110 12.5.1: the most specific range that matches decides the quality."""
    kind = media_type.split("/")[0]
    best: tuple[int, float] | None = None
    for media, q in ranges:
        if media == media_type:
            specificity = 2
        elif media == f"{kind}/*":
            specificity = 1
        elif media == "*/*":
            specificity = 0
        else:
            continue
        if best is None or specificity > best[0]:
            best = (specificity, q)
    return best[1] if best else 0.0


def prefers_html(accept: str | None) -> bool:
    """True only when the client ranks HTML strictly above JSON. A tie goes to JSON, so curl's
    ``*/*``, a missing header and ``application/json`` keep the API's answer; a browser's
    ``text/html,...,*/*;q=0.8`` gets the page."""
    if not accept:
        return False
    ranges = _media_ranges(accept)
    page = max(_quality(ranges, "text/html"), _quality(ranges, "application/xhtml+xml"))
    return page > _quality(ranges, "application/json")


def lang_of(value: str | None) -> str:
    return value if value in LANGS else LANGS[0]


# --- words -----------------------------------------------------------------------------------

# the page's words in each language, and the verdict codes in words for the holder of the document
# (docs/errors.md has the technical meaning): a catalogue a translator edits without touching code
_WORDS = json.loads(Path(__file__).with_name("verify_page_words.json").read_text(encoding="utf-8"))
_T: dict[str, dict[str, str]] = _WORDS["labels"]
_REASONS: dict[str, dict[str, str]] = _WORDS["reasons"]


def meaning(code: str, lang: str) -> str | None:
    words = _REASONS.get(code)
    return words[lang] if words else None


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _t(key: str, lang: str, **values: str) -> str:
    """The escaped phrase; ``values`` are escaped before they are put in."""
    return _e(_T[key][lang]).format(**{k: _e(v) for k, v in values.items()})


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        at = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    return at.astimezone(WIB).strftime("%Y-%m-%d %H:%M:%S WIB")


def _path(sn: str, suffix: str = "") -> str:
    return f"/v1/verify/{quote(sn, safe='')}{suffix}"


# --- blocks ----------------------------------------------------------------------------------

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;color:#1b1b1b;
background:#f4f5f7}
main{max-width:40rem;margin:0 auto;padding:1rem}
header{display:flex;justify-content:space-between;align-items:baseline;gap:1rem;flex-wrap:wrap}
h1{font-size:1.35rem;margin:.5rem 0}
h2{font-size:1.1rem;margin:0 0 .5rem}
a{color:#0b57d0}
section{background:#fff;border-radius:.5rem;padding:1rem;margin:1rem 0;box-shadow:0 1px 2px rgba(0,0,0,.12)}
.banner{border-radius:.5rem;padding:.9rem 1rem;font-weight:700;font-size:1.1rem;color:#fff;margin:1rem 0}
.banner p{margin:.3rem 0 0;font-weight:400;font-size:1rem}
.banner .what{display:block;font-weight:400;font-size:.85rem;opacity:.9;overflow-wrap:anywhere}
.valid{background:#0a7d32}
.invalid{background:#b3261e}
.neutral{background:#5f6368}
dl{display:grid;grid-template-columns:minmax(8rem,auto) 1fr;gap:.35rem 1rem;margin:0}
dt{color:#5f6368}
dd{margin:0;overflow-wrap:anywhere}
code{font:.9em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:anywhere}
.reasons{padding-left:1.2rem}
.reasons li{margin:.4rem 0}
input[type=file]{display:block;width:100%;margin:.5rem 0 1rem;font-size:1rem}
button{font-size:1rem;padding:.6rem 1.4rem;border:0;border-radius:.4rem;background:#0b57d0;color:#fff}
.note{color:#444;font-size:.95rem}
footer{color:#5f6368;font-size:.85rem;text-align:center;margin:1.5rem 0}
@media (max-width:30rem){dl{grid-template-columns:1fr}dt{margin-top:.4rem}}
"""


def _sn_banner(facts: dict, lang: str) -> str:
    if not facts.get("well_formed", True):
        kind, mark, words = "invalid", "&#10007;", "sn_malformed"
    elif not facts.get("known"):
        kind, mark, words = "invalid", "&#10007;", "sn_unknown"
    elif not facts.get("used_once"):
        kind, mark, words = "invalid", "&#10007;", "sn_reused"
    else:
        kind, mark, words = "valid", "&#10003;", "sn_valid"
    what = _t("about_sn", lang, sn=facts.get("sn") or "")
    return f'<div class="banner {kind}" id="sn-verdict"><span class="what">{what}</span>{mark} {_t(words, lang)}</div>'


def _sn_facts(facts: dict, lang: str, issuer: str) -> str:
    if not facts.get("well_formed", True):
        status = _t("malformed", lang)
    else:
        status = _t("issued" if facts.get("known") else "unknown", lang)
    if facts.get("used_once"):
        use = _t("used_once", lang)
    elif facts.get("known"):
        use = _t("used_more", lang)
    else:
        use = _t("not_used", lang)
    rows = [("sn", f'<code id="sn">{_e(facts.get("sn"))}</code>'), ("status", status), ("use", use),
            ("when", _e(_when(facts.get("issued_at")))),
            ("hash", f'<code>{_e(facts.get("document_sha256") or "-")}</code>'),
            ("issuer", _e(issuer))]
    cells = "".join(f"<dt>{_t(k, lang)}</dt><dd>{v}</dd>" for k, v in rows)
    return f"<section><dl>{cells}</dl><p class=\"note\">{_t('sn_note', lang)}</p></section>"


def _reason_item(reason: dict, lang: str) -> str:
    code = str(reason.get("code") or "")
    words = meaning(code, lang) or reason.get("detail") or code
    technical = [str(reason.get("detail") or "")]
    if reason.get("changed"):
        technical.append(", ".join(str(c) for c in reason["changed"]))
    tech = "".join(f"<p><code>{_e(t)}</code></p>" for t in technical if t)
    details = f"<details><summary>{_t('technical', lang)}</summary>{tech}</details>" if tech else ""
    return f'<li><strong class="code">{_e(code)}</strong>: <span class="meaning">{_e(words)}</span>{details}</li>'


def _stamp_rows(stamps: list[dict], lang: str) -> str:
    if not stamps:
        return ""
    items = []
    for s in stamps:
        state = _t("ok" if s.get("valid") else "not_ok", lang)
        rows = [("sn", f"<code>{_e(s.get('sn'))}</code> ({state})"), ("signer", _e(s.get("signer"))),
                ("signed_at", _e(_when(s.get("timestamped_at") or s.get("signing_time")))),
                ("revision", _e(s.get("stamp_revision")))]
        cert = s.get("certificate_status")
        if cert:
            rows.append(("cert_status", _cert_words(cert, lang)))
        for key in ("timestamp", "doc_timestamp"):
            ts = s.get("timestamp" if key == "timestamp" else "document_timestamp")
            if ts:
                rows.append((key, f"{_e(_when(ts.get('time')))} {_t('by', lang)} {_e(ts.get('tsa'))}"))
        tech = ""
        if cert:
            tech = (f"<details><summary>{_t('technical', lang)}</summary><p><code>{_e(cert.get('detail'))}"
                    f" [ETSI EN 319 102-1: {_e(cert.get('etsi_indication'))}]</code></p></details>")
        items.append("<dl>" + "".join(f"<dt>{_t(k, lang)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>" + tech)
    return f"<h2>{_t('stamps', lang)}</h2>" + "<hr>".join(items)


def _cert_words(cert: dict, lang: str) -> str:
    status = cert.get("status")
    if status == "revoked":
        key = "cert_revoked_after" if cert.get("etsi_indication") == "PASSED" else "cert_revoked"
        return _t(key, lang, at=_when(cert.get("revoked_at")))
    return _t("cert_good" if status == "good" else "cert_unknown", lang)


def _verdict(verdict: dict, sn: str, lang: str, name: str) -> str:
    what = f'<span class="what">{_t("about_doc", lang, name=name)}</span>'
    if verdict.get("valid"):
        banner = (f'<div class="banner valid" id="doc-verdict">{what}&#10003; {_t("doc_valid", lang)}'
                  f'<p>{_t("valid_meaning", lang)}</p></div>')
        reasons = ""
    else:
        code = verdict.get("code") or ""
        banner = (f'<div class="banner invalid" id="doc-verdict">{what}&#10007; {_t("doc_invalid", lang)}'
                  f'<p>{_t("code", lang)}: <span id="doc-code">{_e(code)}</span></p></div>')
        reasons = '<ul class="reasons">' + "".join(_reason_item(r, lang) for r in verdict.get("reasons", [])) + \
                  "</ul>"
    stamps = verdict.get("stamps") or []
    other = ""
    if stamps and sn and all(s.get("sn") != sn for s in stamps):
        other = f'<p class="note">{_t("other_sn", lang, sn=sn)}</p>'
    return f'{banner}<section id="doc-result">{reasons}{other}{_stamp_rows(stamps, lang)}</section>'


def _failure(code: str, detail: str, lang: str, name: str) -> str:
    words = meaning(code, lang) or detail
    return (f'<div class="banner neutral" id="doc-verdict"><span class="what">{_t("about_doc", lang, name=name)}'
            f'</span>{_t("error", lang)}'
            f'<p>{_t("code", lang)}: <span id="doc-code">{_e(code)}</span>. {_e(words)}</p></div>')


def _form(sn: str, lang: str) -> str:
    action = _e(f"{_path(sn, '/page')}?lang={lang}")
    return (f'<section><h2>{_t("check", lang)}</h2>'
            f'<form method="post" enctype="multipart/form-data" action="{action}">'
            f'<label for="file">{_t("file", lang)}</label>'
            f'<input type="file" id="file" name="file" accept="application/pdf,.pdf" required>'
            f'<button type="submit">{_t("submit", lang)}</button></form></section>')


def render(facts: dict, issuer: str, lang: str = "id", *, verdict: dict | None = None,
           failure: tuple[str, str] | None = None, filename: str = "") -> str:
    """The whole page for an SN: its registry facts (``PublicVerifier.by_sn``) and, after an upload of
    ``filename``, first the document's verdict (``PublicVerifier.document``) or why there is none
    (``failure``: code, detail)."""
    lang = lang_of(lang)
    sn = str(facts.get("sn") or "")
    other = "en" if lang == "id" else "id"
    result = ""
    if verdict is not None:
        result = _verdict(verdict, sn, lang, filename)
    elif failure is not None:
        result = _failure(*failure, lang, filename)
    return (
        f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex">'
        f"<title>{_t('title', lang)} {_e(sn)}</title><style>{_CSS}</style></head><body><main>"
        f'<header><h1>{_t("title", lang)}</h1>'
        f'<a id="lang" hreflang="{other}" href="{_e(_path(sn))}?lang={other}">{_t("switch", lang)}</a></header>'
        f"{result}{_sn_banner(facts, lang)}{_sn_facts(facts, lang, issuer)}{_form(sn, lang)}"
        f"<footer>{_t('footer', lang)}</footer></main></body></html>")
