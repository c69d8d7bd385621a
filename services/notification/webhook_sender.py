"""The webhook sender: POSTs due deliveries (the ``deliveries`` table), endpoint by endpoint.

The schedule, leases, recording and horizon are the due-time table worker's (``due_work.py``); this
module adds what is particular to webhooks.

Isolation (a slow or dead endpoint never delays the others):
- an *endpoint* is ``scheme://host:port``; at most ``webhook_per_endpoint`` requests are in flight
  per endpoint and ``webhook_concurrency`` in all;
- the claim only selects rows of endpoints that have a free slot and a closed (or half-open and
  idle) circuit, so the slots of a hanging endpoint never fill the pool: its surplus rows stay in
  the table, due, while other endpoints' rows are claimed past them;
- every request has a connect timeout and a total deadline; consecutive failures open the
  endpoint's circuit (``breaker.py``), and an open circuit gets no requests until its cool-down.

Every attempt is logged in ``delivery_attempts``, also when the lease was lost meanwhile (the API
may have reset the row). A duplicate carries the same event id (``Bubuh-Event-Id`` and ``id`` in
the body).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from dataclasses import dataclass

import asyncpg
import httpx

from services.kernel import errors, logs, webhook_targets
from services.kernel.channels import ChannelView
from services.kernel.retry import Backoff
from services.kernel.runtime import ConfigError
from services.kernel.settings import Settings
from services.notification import signing, targets
from services.notification.breaker import Breaker
from services.notification.due_work import Claimed, Outcome, Sender, Table
from services.notification.event_intake import endpoint_of
from services.notification.metrics import (
    ATTEMPT_SECONDS,
    ATTEMPTS,
    ATTEMPTS_PER_DELIVERY,
    CIRCUIT_STATE,
    DELIVERIES,
    IN_FLIGHT,
)

log = logs.get(__name__)

USER_AGENT = "Bubuh-Webhooks/1"

_CANDIDATES = """
WITH eps AS (
    SELECT DISTINCT endpoint FROM deliveries
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND (leased_until IS NULL OR leased_until < now())
      AND NOT (endpoint = ANY($1::text[]))
)
SELECT d.delivery_id, d.endpoint, d.next_attempt_at FROM eps CROSS JOIN LATERAL (
    SELECT x.delivery_id, x.endpoint, x.next_attempt_at FROM deliveries x
    WHERE x.endpoint = eps.endpoint AND x.status = 'pending' AND x.next_attempt_at <= now()
      AND (x.leased_until IS NULL OR x.leased_until < now())
    ORDER BY x.next_attempt_at LIMIT $2
) d
"""

_LEASE = """
UPDATE deliveries SET leased_until = now() + make_interval(secs => $3), lease_token = $2
WHERE delivery_id = ANY($1::text[]) AND status = 'pending' AND next_attempt_at <= now()
  AND (leased_until IS NULL OR leased_until < now())
RETURNING delivery_id, channel_id, event_id, event_type, url, endpoint, body, attempts, horizon_at
"""

_RECORD = """
UPDATE deliveries SET
    attempts = attempts + 1,
    status = CASE WHEN $3 THEN 'delivered'
                  WHEN now() + make_interval(secs => $4) > horizon_at THEN 'dead' ELSE 'pending' END,
    next_attempt_at = CASE WHEN $3 THEN next_attempt_at ELSE now() + make_interval(secs => $4) END,
    delivered_at = CASE WHEN $3 THEN now() ELSE delivered_at END,
    leased_until = NULL, lease_token = NULL,
    last_status_code = $5, last_error = $6,
    first_attempt_at = COALESCE(first_attempt_at, $7), last_attempt_at = $7,
    url = $8, endpoint = $9
WHERE delivery_id = $1 AND lease_token = $2
RETURNING status, attempts, first_attempt_at, horizon_at
"""

@dataclass(frozen=True)
class Attempt:
    """``Outcome.extra`` of a webhook attempt."""

    kind: str              # ok | rejected | timeout | unreachable | forbidden | no_endpoint (metric label)
    status_code: int | None
    duration_s: float


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _unreachable(exc: BaseException) -> str:
    """Our wording for a failed connection or exchange. Exception texts are not used: a protocol
    error quotes the bytes the target sent (an SSH banner, an internal page), and a TLS error can
    name internal hosts."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, webhook_targets.Unresolvable) for e in chain):
        return "the host name does not resolve"
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain):
        return "TLS certificate not valid for the host"
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return "TLS handshake failed"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the answer was not valid HTTP"
    if isinstance(exc, httpx.ReadError | httpx.WriteError | ConnectionError):
        return "the connection was dropped"
    return f"the request failed ({type(exc).__name__})"


class WebhookSender(Sender):
    """POSTs due deliveries, endpoint by endpoint, each signed with the channel's secret."""

    name = "webhook"
    table = Table("deliveries", "delivery_id", "url")

    @staticmethod
    def check(s: Settings) -> None:
        if s.webhook_lease_s <= s.webhook_timeout_s:
            raise ConfigError(f"BUBUH_WEBHOOK_LEASE_S ({s.webhook_lease_s}) must exceed BUBUH_WEBHOOK_TIMEOUT_S "
                              f"({s.webhook_timeout_s}): a lease may not expire while its request can still run")
        if s.webhook_concurrency < 1 or s.webhook_per_endpoint < 1:
            raise ConfigError("BUBUH_WEBHOOK_CONCURRENCY and BUBUH_WEBHOOK_PER_ENDPOINT must be at least 1")

    def __init__(self, channels: ChannelView, settings: Settings,
                 resolver: webhook_targets.Resolver | None = None) -> None:
        s = settings
        self.check(s)
        self._channels = channels
        self._s = s
        self.concurrency = s.webhook_concurrency
        self.lease_s = s.webhook_lease_s
        self.backoff = Backoff(base_s=s.webhook_backoff_base_s, factor=s.webhook_backoff_factor,
                               max_s=s.webhook_backoff_max_s)
        self._in_flight: dict[str, int] = {}
        self._total = 0
        self._breakers: dict[str, Breaker] = {}
        self._client: httpx.AsyncClient | None = None
        # every connection's addresses come from here and are checked first (kernel/webhook_targets.py)
        self._resolver = resolver or webhook_targets.resolver_for(s.webhook_hosts)

    # --- isolation bookkeeping ---------------------------------------------------------------
    def breaker(self, endpoint: str) -> Breaker:
        b = self._breakers.get(endpoint)
        if b is None:
            def changed(state: str, endpoint: str = endpoint) -> None:
                CIRCUIT_STATE.labels(endpoint).set(self._breakers[endpoint].gauge)
                log.warning("webhook circuit " + state, endpoint=endpoint,
                            consecutive_failures=self._breakers[endpoint].consecutive_failures)
            b = self._breakers[endpoint] = Breaker(self._s.webhook_breaker_failures,
                                                   self._s.webhook_breaker_cooldown_s, on_change=changed)
            CIRCUIT_STATE.labels(endpoint).set(0)
        return b

    def capacity(self, endpoint: str) -> int:
        return self.breaker(endpoint).capacity(self._in_flight.get(endpoint, 0), self._s.webhook_per_endpoint)

    def blocked(self) -> list[str]:
        """Endpoints that may not get a request now (saturated or circuit open): the claim skips them."""
        return [ep for ep in set(self._breakers) | set(self._in_flight) if self.capacity(ep) <= 0]

    def wakes_in(self) -> float | None:
        """The soonest an open circuit lets a probe through."""
        reopens = [r for b in self._breakers.values() if (r := b.reopens_in()) is not None]
        return min(reopens, default=None)

    def started(self, claimed: Claimed) -> None:
        ep = claimed.row["endpoint"]
        self._in_flight[ep] = self._in_flight.get(ep, 0) + 1
        self._total += 1
        IN_FLIGHT.set(self._total)

    def finished(self, claimed: Claimed) -> None:
        ep = claimed.row["endpoint"]
        self._in_flight[ep] -= 1
        if not self._in_flight[ep]:
            del self._in_flight[ep]
        self._total -= 1
        IN_FLIGHT.set(self._total)

    # --- the client ----------------------------------------------------------------------------
    async def open(self) -> None:
        s = self._s
        self._client = targets.guarded_client(
            self._resolver, local_mode=s.webhook_local_mode,
            timeout=httpx.Timeout(s.webhook_timeout_s, connect=s.webhook_connect_timeout_s),
            limits=httpx.Limits(max_connections=s.webhook_concurrency * 2,
                                max_keepalive_connections=s.webhook_concurrency),
            headers={"User-Agent": USER_AGENT})

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # --- claiming ------------------------------------------------------------------------------
    async def claim(self, conn: asyncpg.Connection, free: int, token: str) -> list[Claimed]:
        candidates = await conn.fetch(_CANDIDATES, self.blocked(), self._s.webhook_per_endpoint)
        if not candidates:
            return []
        rows = await conn.fetch(_LEASE, self._choose(candidates, free), token, self.lease_s)
        return [Claimed(r["delivery_id"], r["channel_id"], r["event_id"], r["event_type"], r["attempts"],
                        r["horizon_at"], token, r) for r in rows]

    def _choose(self, candidates, free: int) -> list[str]:
        """Round-robin over endpoints (oldest due first), each up to its capacity, all up to ``free``."""
        per_ep: dict[str, list] = {}
        for c in sorted(candidates, key=lambda c: c["next_attempt_at"]):
            per_ep.setdefault(c["endpoint"], []).append(c["delivery_id"])
        quota = {ep: min(len(ids), self.capacity(ep)) for ep, ids in per_ep.items()}
        chosen: list[str] = []
        depth = 0
        while len(chosen) < free and any(quota[ep] > depth for ep in per_ep):
            for ep, ids in per_ep.items():
                if depth < quota[ep] and len(chosen) < free:
                    chosen.append(ids[depth])
            depth += 1
        return chosen

    # --- one HTTP attempt ----------------------------------------------------------------------
    def _resolve(self, claimed: Claimed) -> tuple[str, list[bytes]]:
        url = claimed.row["url"]
        info = self._channels.get(claimed.channel_id)
        if not url and info is not None:
            url = info.webhook_url
        secrets = self._channels.hmac_secrets(claimed.channel_id) if info is not None else []
        return url, secrets

    async def attempt(self, claimed: Claimed) -> Outcome:
        outcome = await self._post(claimed)
        if outcome.extra.kind != "no_endpoint":
            self.breaker(claimed.row["endpoint"]).record(outcome.ok)
        ATTEMPTS.labels(outcome.extra.kind).inc()
        ATTEMPT_SECONDS.observe(outcome.extra.duration_s)
        return outcome

    async def _post(self, claimed: Claimed) -> Outcome:
        started_at, t0 = _now(), time.perf_counter()
        row = claimed.row

        def result(kind: str, status: int | None, url: str, code: errors.ErrorCode | None = None,
                   why: str = "") -> Outcome:
            return Outcome(code is None, code, why, started_at, url, Attempt(kind, status, time.perf_counter() - t0))

        try:
            url, secrets = self._resolve(claimed)
        except Exception as exc:  # noqa: BLE001 - a secret that does not unseal: operations must look
            log.warning("channel secret unusable", channel_id=claimed.channel_id, error=repr(exc)[:300])
            return result("no_endpoint", None, row["url"], errors.WEBHOOK_NO_ENDPOINT, "channel secret unusable")
        if not url or not secrets:
            return result("no_endpoint", None, url, errors.WEBHOOK_NO_ENDPOINT,
                          f"channel {claimed.channel_id} has no webhook URL or is unknown")
        try:
            webhook_targets.check_url(url, local_mode=self._s.webhook_local_mode)
        except webhook_targets.TargetRefused as exc:
            self._refused(claimed, exc)
            return result("forbidden", None, url, exc.code, exc.detail)
        body = row["body"].encode()
        headers = {
            "Content-Type": "application/json",
            signing.HEADER_SIGNATURE: signing.sign(secrets, body),
            signing.HEADER_EVENT_ID: claimed.event_id,
            signing.HEADER_EVENT_TYPE: claimed.event_type,
            signing.HEADER_DELIVERY_ID: claimed.key,
            signing.HEADER_ATTEMPT: str(claimed.attempts + 1),
        }
        assert self._client is not None
        try:
            async with asyncio.timeout(self._s.webhook_timeout_s):
                async with self._client.stream("POST", url, content=body, headers=headers) as resp:
                    code = resp.status_code
            # the answer's body is never read: nothing of it may reach the channel's delivery log
            if 200 <= code < 300:
                return result("ok", code, url)
            return result("rejected", code, url, errors.WEBHOOK_REJECTED, f"HTTP {code}")
        except webhook_targets.TargetRefused as exc:       # checked again at connect time: this resolution's answer
            self._refused(claimed, exc)
            return result("forbidden", None, url, exc.code, exc.detail)
        except (TimeoutError, httpx.TimeoutException) as exc:
            what = "connect" if isinstance(exc, httpx.ConnectTimeout) else "answer"
            limit = self._s.webhook_connect_timeout_s if what == "connect" else self._s.webhook_timeout_s
            return result("timeout", None, url, errors.WEBHOOK_TIMEOUT, f"no {what} within {limit:g} s")
        except Exception as exc:  # noqa: BLE001 - refused, reset, DNS, TLS, bad URL: all "unreachable"
            # operators get the exception (bounded); the channel gets our words for it
            log.info("webhook attempt failed", delivery_id=claimed.key, endpoint=row["endpoint"],
                     error=repr(exc)[:300])
            return result("unreachable", None, url, errors.WEBHOOK_UNREACHABLE, _unreachable(exc))

    @staticmethod
    def _refused(claimed: Claimed, exc: webhook_targets.TargetRefused) -> None:
        log.warning("webhook target refused", delivery_id=claimed.key, channel_id=claimed.channel_id,
                    endpoint=claimed.row["endpoint"], code=exc.code.code, reason=exc.detail)

    # --- recording -----------------------------------------------------------------------------
    async def record(self, conn: asyncpg.Connection, claimed: Claimed, outcome: Outcome, delay_s: float):
        a: Attempt = outcome.extra
        row = await conn.fetchrow(_RECORD, claimed.key, claimed.lease_token, outcome.ok, delay_s, a.status_code,
                                  outcome.error or None, outcome.started_at, outcome.target,
                                  endpoint_of(outcome.target))
        status = row["status"] if row else None
        verdict = "delivered" if outcome.ok else ("abandoned" if status == "dead" else "failed")
        await conn.execute(
            "INSERT INTO delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code, error, "
            "outcome, retry_in_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            claimed.key, claimed.attempts + 1, outcome.started_at, a.duration_s * 1000, a.status_code,
            outcome.error or None, verdict, delay_s * 1000 if verdict == "failed" else None)
        return row

    def recorded(self, claimed: Claimed, outcome: Outcome, row, delay_s: float) -> None:
        if row is None:
            log.info("webhook attempt outlived its lease (redelivered or reclaimed)", delivery_id=claimed.key)
        elif row["status"] == "delivered":
            DELIVERIES.labels("delivered").inc()
            ATTEMPTS_PER_DELIVERY.labels("delivered").observe(row["attempts"])
        elif row["status"] == "dead":
            DELIVERIES.labels("abandoned").inc()
            ATTEMPTS_PER_DELIVERY.labels("abandoned").observe(row["attempts"])
            log.warning("webhook delivery abandoned", delivery_id=claimed.key, event_id=claimed.event_id,
                        attempts=row["attempts"], last_error=outcome.error)

    def abandoned_at_horizon(self, row) -> None:
        DELIVERIES.labels("abandoned").inc()
        ATTEMPTS_PER_DELIVERY.labels("abandoned").observe(row["attempts"])
        log.warning("webhook delivery abandoned at its horizon", delivery_id=row["key"], attempts=row["attempts"])
