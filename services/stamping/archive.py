"""Archive time-stamps: keeping stored B-LTA stamps verifiable after their certificates expire.

Why: a B-LTA stamp's last document time-stamp vouches for everything before it only while that
time-stamp's own certificate is valid. Before it expires a new document time-stamp is added,
with the validation data of the previous one in the DSS (PAdES-LTA's archive chain). pyHanko's
``update_archival_timestamp_chain`` does exactly that: it validates the last document
time-stamp (fetching its OCSP/CRLs), writes them into the DSS, and time-stamps the result.

``bubuh renew-timestamps`` runs it over the stored documents of completed stamps whose last
time-stamp's certificate expires within ``--within-days`` (a B-LT stamp, without a document
time-stamp yet, is judged by its signature time-stamp and gets its first one). The stored file
is replaced by the renewed one; the registry's ``output_sha256`` stays the hash of the file as
delivered, which the renewed file begins with (public verification accepts it, and judges what
follows: DSS and document time-stamps only).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

from services.kernel import logs
from services.kernel.settings import Settings

log = logs.get(__name__)


@dataclass(frozen=True)
class Renewal:
    request_id: str
    expires: dt.datetime | None  # the certificate of the time-stamp it relied on
    renewed: bool
    error: str | None = None     # due, but the renewal failed (the stored file is unchanged)


def last_timestamp_expiry(data: bytes) -> dt.datetime | None:
    """When the certificate of the document's latest time-stamp (document or signature) expires."""
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation.generic_cms import extract_tst_data_iter

    reader = PdfFileReader(io.BytesIO(data))
    tokens = [s.signed_data for s in reader.embedded_timestamp_signatures]
    if not tokens:
        tokens = [t for s in reader.embedded_regular_signatures
                  for t in extract_tst_data_iter(s.signer_info, signed=False)]
    if not tokens:
        return None
    token = tokens[-1]
    sid = token["signer_infos"][0]["sid"]
    for choice in token["certificates"] or ():
        cert = choice.chosen
        if _matches(cert, sid):
            return cert.not_valid_after
    return None


def _matches(cert, sid) -> bool:
    if sid.name == "issuer_and_serial_number":
        return cert.issuer == sid.chosen["issuer"] and cert.serial_number == sid.chosen["serial_number"].native
    return cert.key_identifier == sid.chosen.native


async def renew(data: bytes, tsa_url: str, trust_roots: list[Path], *, timeout_s: float = 5.0) -> bytes:
    """``data`` with the last time-stamp's validation data in the DSS and a new document time-stamp."""
    from asn1crypto import pem
    from asn1crypto import x509 as asn1_x509
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.signers.pdf_signer import PdfTimeStamper
    from pyhanko.sign.timestamps import HTTPTimeStamper
    from pyhanko_certvalidator import ValidationContext
    from pyhanko_certvalidator.fetchers.aiohttp_fetchers import AIOHttpFetcherBackend

    roots = []
    for path in trust_roots:
        raw = Path(path).read_bytes()
        for _t, _h, der in (pem.unarmor(raw, multiple=True) if pem.detect(raw) else [(0, 0, raw)]):
            roots.append(asn1_x509.Certificate.load(der))
    backend = AIOHttpFetcherBackend(per_request_timeout=timeout_s)
    try:
        vc = ValidationContext(trust_roots=roots, allow_fetching=True, revocation_mode="require",
                               fetcher_backend=backend)
        out = io.BytesIO()
        reader = PdfFileReader(io.BytesIO(data))
        if reader.embedded_timestamp_signatures:
            await PdfTimeStamper(HTTPTimeStamper(tsa_url, timeout=timeout_s)).async_update_archival_timestamp_chain(
                reader, vc, in_place=False, output=out)
        else:  # B-LT: its first document time-stamp (its DSS already holds the signature's validation data)
            await PdfTimeStamper(HTTPTimeStamper(tsa_url, timeout=timeout_s)).async_timestamp_pdf(
                IncrementalPdfFileWriter(io.BytesIO(data)), "sha256", validation_context=vc, output=out)
        return out.getvalue()
    finally:
        await backend.close()


async def renew_stored(settings: Settings, within_days: float, *, dry_run: bool = False) -> list[Renewal]:
    """Renew every completed stamp whose last time-stamp's certificate expires within ``within_days``."""
    import asyncpg

    from services.stamping import NAME, store
    from services.stamping.service import documents, trust_roots

    documents_store: store.DocumentStore = documents(settings)
    roots = trust_roots(settings)
    horizon = dt.datetime.now(dt.UTC) + dt.timedelta(days=within_days)
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(f'SELECT request_id, output_ref FROM "{settings.schema(NAME)}".requests '
                                "WHERE status = 'completed' AND output_ref IS NOT NULL ORDER BY finished_at")
    finally:
        await conn.close()
    done = []
    for row in rows:
        data = await documents_store.get(row["output_ref"])
        expires = await asyncio.to_thread(last_timestamp_expiry, data)
        due = expires is not None and expires <= horizon
        if not due or dry_run:
            done.append(Renewal(row["request_id"], expires, False))
            continue
        try:   # one stamp that cannot be renewed (its TSA's or CA's data unreachable) does not stop the rest
            renewed = await renew(data, settings.signing_tsa_url, roots,
                                  timeout_s=settings.signing_revocation_timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported per stamp; the command exits 1
            log.warning("archive time-stamp not renewed", request_id=row["request_id"], error=repr(exc))
            done.append(Renewal(row["request_id"], expires, False, f"{type(exc).__name__}: {exc}"))
            continue
        await documents_store.put(row["output_ref"], renewed)
        log.info("archive time-stamp renewed", request_id=row["request_id"], expired=expires.isoformat())
        done.append(Renewal(row["request_id"], expires, True))
    return done
