"""The validation data a B-LT stamp carries: certificates, OCSP responses and CRLs for its chains.

Why a cache: every stamp is signed by the same certificate and time-stamped by the same TSA, so
every stamp needs the same revocation data. Fetching OCSP and CRLs per stamp would add round
trips (and load on the CA's responders) to a path whose one network call should be the TSA's.
The data is fetched once, kept until the earliest ``nextUpdate`` among it (or ``max_age_s`` when
a response names none), and then fetched again: once per validity period.

Fetching is pyHanko's own (``pyhanko_certvalidator`` with fetching on and revocation required):
it follows the certificates' OCSP and CRL addresses, checks the responses' signatures and paths
to the trust anchor, and says ``RevokedError`` when our certificate has been revoked. So a
refresh is also a check that the data is complete and good before any stamp embeds it:

* unreachable responders, or data that does not validate -> ``VALIDATION_DATA_UNAVAILABLE``
  (retryable: the stamp waits on the retry path with its unit reserved; never a lower level);
* our signing certificate revoked -> ``SIGNING_CERT_REVOKED``: no stamp can be issued until the
  key is replaced; ``bubuh_signing_certificate_revoked`` is 1 and an alert fires.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass

from asn1crypto import crl as asn1_crl
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509

from services.kernel import errors
from services.kernel.errors import BubuhError

VALIDATION_DATA_UNAVAILABLE = errors.lookup("VALIDATION_DATA_UNAVAILABLE")
SIGNING_CERT_REVOKED = errors.lookup("SIGNING_CERT_REVOKED")


@dataclass(frozen=True)
class Bundle:
    """What goes into the DSS: the same for every stamp until ``expires`` (a monotonic time)."""

    certs: tuple[asn1_x509.Certificate, ...]
    ocsps: tuple[asn1_ocsp.OCSPResponse, ...]
    crls: tuple[asn1_crl.CertificateList, ...]
    expires: float
    tsa_key: frozenset[bytes]


def _self_signed(cert: asn1_x509.Certificate) -> bool:
    return cert.self_signed in ("maybe", "yes")


def _next_updates(ocsps, crls) -> list[dt.datetime]:
    out = []
    for resp in ocsps:
        for single in resp["response_bytes"]["response"].parsed["tbs_response_data"]["responses"]:
            nu = single["next_update"].native
            if nu is not None:
                out.append(nu)
    for c in crls:
        nu = c["tbs_cert_list"]["next_update"].native
        if nu is not None:
            out.append(nu)
    return out


class ValidationData:
    """One per engine: the chains' revocation data, refreshed once per validity period."""

    def __init__(self, signing_cert: asn1_x509.Certificate, chain: tuple[asn1_x509.Certificate, ...], *,
                 trust_roots: list[asn1_x509.Certificate] | None = None, timeout_s: float = 5.0,
                 max_age_s: float = 3600.0) -> None:
        self.signing_cert = signing_cert
        self.chain = tuple(chain)
        self.trust_roots = list(trust_roots or [c for c in chain if _self_signed(c)])
        if not self.trust_roots:
            raise ValueError("no trust anchor for the signing certificate: put the root in its chain "
                             "or configure the trust roots")
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self._bundle: Bundle | None = None
        self._revoked: BubuhError | None = None
        self.fetches = 0  # refreshes so far (tests and metrics read it)

    def current(self, loop: asyncio.AbstractEventLoop, tsa_certs: tuple[asn1_x509.Certificate, ...] = ()) -> Bundle:
        """The bundle for a stamp whose time-stamp token carried ``tsa_certs``; refreshed when stale."""
        if self._revoked is not None:  # for good: a new key means a new engine (a worker restart)
            raise BubuhError(self._revoked.code, self._revoked.detail)
        key = frozenset(c.sha256 for c in tsa_certs)
        b = self._bundle
        if b is not None and time.monotonic() < b.expires and key <= b.tsa_key:
            return b
        self.fetches += 1
        try:
            b = self._bundle = loop.run_until_complete(self._fetch(tsa_certs or (), key | (b.tsa_key if b else key)))
        except BubuhError as exc:
            if exc.code is SIGNING_CERT_REVOKED:
                self._revoked = exc
            raise
        return b

    async def _fetch(self, tsa_certs: tuple[asn1_x509.Certificate, ...], tsa_key: frozenset[bytes]) -> Bundle:
        from pyhanko_certvalidator import CertificateValidator, ValidationContext
        from pyhanko_certvalidator import errors as cv_errors
        from pyhanko_certvalidator.fetchers.aiohttp_fetchers import AIOHttpFetcherBackend

        tsa_leaf = [c for c in tsa_certs if not c.ca] if tsa_certs else []
        others = list(self.chain) + [c for c in tsa_certs if c.ca]
        backend = AIOHttpFetcherBackend(per_request_timeout=self.timeout_s)
        vc = ValidationContext(trust_roots=self.trust_roots, other_certs=others, allow_fetching=True,
                               revocation_mode="require", fetcher_backend=backend)
        paths = []
        try:
            try:
                signer = CertificateValidator(self.signing_cert, intermediate_certs=others, validation_context=vc)
                paths.append(await asyncio.wait_for(signer.async_validate_usage({"non_repudiation"}),
                                                    4 * self.timeout_s))
                for leaf in tsa_leaf:  # a revocation here is the TSA's, not ours
                    tsa = CertificateValidator(leaf, intermediate_certs=others, validation_context=vc)
                    paths.append(await asyncio.wait_for(
                        tsa.async_validate_usage(set(), extended_key_usage={"time_stamping"}), 4 * self.timeout_s))
            finally:
                await backend.close()
        except cv_errors.RevokedError as exc:
            if not paths:
                raise BubuhError(SIGNING_CERT_REVOKED, f"signing certificate: {exc}") from exc
            raise BubuhError(VALIDATION_DATA_UNAVAILABLE, f"time-stamp authority's certificate: {exc}") from exc
        except (cv_errors.PathValidationError, cv_errors.PathBuildingError, cv_errors.ValidationError,
                TimeoutError, OSError) as exc:
            raise BubuhError(VALIDATION_DATA_UNAVAILABLE, f"revocation data: {type(exc).__name__}: {exc}") from exc

        certs: dict[bytes, asn1_x509.Certificate] = {}
        for path in paths:
            for cert in path:
                certs[cert.sha256] = cert
        ocsps, crls = tuple(vc.ocsps), tuple(vc.crls)
        for resp in ocsps:  # the responders' own certificates, for validators that look in the DSS only
            for cert in resp["response_bytes"]["response"].parsed["certs"] or ():
                certs[cert.sha256] = cert
        now = dt.datetime.now(dt.UTC)
        remaining = [(nu - now).total_seconds() for nu in _next_updates(ocsps, crls)]
        ttl = min([self.max_age_s, *remaining])
        return Bundle(tuple(certs.values()), ocsps, crls, time.monotonic() + max(ttl, 0.0), tsa_key)
