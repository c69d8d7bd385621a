"""The webhook dispatcher: claims due deliveries from the due-time table and POSTs them, endpoint by endpoint.

The durable schedule is the ``deliveries`` table: a row is due when ``next_attempt_at`` has passed.
Nothing sleeps per delivery; a failed attempt just moves the row's due time (exponential backoff
with jitter) until its horizon, after which it is dead-lettered.

Isolation (a slow or dead endpoint never delays the others):
- an *endpoint* is ``scheme://host:port``; at most ``webhook_per_endpoint`` requests are in flight
  per endpoint and ``webhook_concurrency`` in all;
- the claim only selects rows of endpoints that have a free slot and a closed (or half-open and
  idle) circuit, so the slots of a hanging endpoint never fill the pool: its surplus rows stay in
  the table, due, while other endpoints' rows are claimed past them;
- every request has a connect timeout and a total deadline; consecutive failures open the
  endpoint's circuit (``breaker.py``), and an open circuit gets no requests until its cool-down.

Claims are leases (``leased_until``, ``lease_token``), not open transactions: the HTTP call runs
outside any transaction, and a killed process's leases simply expire, after which any instance
retries the row. The result is recorded only if the lease is still ours (the API may have reset the
row meanwhile); the attempt log records it either way. Delivery is therefore at least once, and a
duplicate carries the same event id (``Bubuh-Event-Id`` and ``id`` in the body).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
import uuid
from dataclasses import dataclass

import asyncpg
import httpx

from services.kernel import failures, logs, webhook_targets
from services.kernel.channels import ChannelView
from services.kernel.retry import Backoff
from services.kernel.runtime import ConfigError
from services.kernel.settings import Settings
from services.kernel.waiting import Pause, wait_any
from services.notification import deadletter, signing, targets
from services.notification.breaker import Breaker
from services.notification.intake import endpoint_of
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

_NEXT_DUE_IN = """
SELECT EXTRACT(EPOCH FROM (next_attempt_at - now()))::float8 FROM deliveries
WHERE status = 'pending' AND next_attempt_at > now() ORDER BY next_attempt_at LIMIT 1
"""

_PAST_HORIZON = """
UPDATE deliveries SET status = 'dead', leased_until = NULL, lease_token = NULL
WHERE delivery_id IN (
    SELECT delivery_id FROM deliveries
    WHERE status = 'pending' AND horizon_at <= now() AND (leased_until IS NULL OR leased_until < now())
    ORDER BY horizon_at LIMIT 200 FOR UPDATE SKIP LOCKED)
RETURNING delivery_id, channel_id, event_id, event_type, url, attempts, last_error, first_attempt_at,
          last_attempt_at, horizon_at
"""


@dataclass(frozen=True)
class Claimed:
    delivery_id: str
    channel_id: str
    event_id: str
    event_type: str
    url: str
    endpoint: str
    body: bytes
    attempts: int          # before this attempt
    horizon_at: dt.datetime
    lease_token: str


@dataclass(frozen=True)
class Result:
    ok: bool
    kind: str              # ok | rejected | timeout | unreachable | forbidden | no_endpoint (metric label)
    # ``error`` is shown to the channel (GET /v1/deliveries, dead-letter entries): a code and our own
    # wording only, never bytes of the target's answer nor exception text that may quote them
    status_code: int | None
    error: str
    started_at: dt.datetime
    duration_s: float
    url: str


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


class Dispatcher:
    def __init__(self, pool: asyncpg.Pool, channels: ChannelView, settings: Settings,
                 wake: asyncio.Event | None = None, resolver: webhook_targets.Resolver | None = None) -> None:
        s = settings
        if s.webhook_lease_s <= s.webhook_timeout_s:
            raise ConfigError(f"BUBUH_WEBHOOK_LEASE_S ({s.webhook_lease_s}) must exceed BUBUH_WEBHOOK_TIMEOUT_S "
                              f"({s.webhook_timeout_s}): a lease may not expire while its request can still run")
        if s.webhook_concurrency < 1 or s.webhook_per_endpoint < 1:
            raise ConfigError("BUBUH_WEBHOOK_CONCURRENCY and BUBUH_WEBHOOK_PER_ENDPOINT must be at least 1")
        self._pool = pool
        self._channels = channels
        self._s = s
        self._wake = wake or asyncio.Event()
        self._backoff = Backoff(base_s=s.webhook_backoff_base_s, factor=s.webhook_backoff_factor,
                                max_s=s.webhook_backoff_max_s)
        self._in_flight: dict[str, int] = {}
        self._total = 0
        self._breakers: dict[str, Breaker] = {}
        self._tasks: dict[asyncio.Task, Claimed] = {}
        self._client: httpx.AsyncClient | None = None
        self._last_sweep = 0.0
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

    # --- the loop ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        s = self._s
        self._client = targets.guarded_client(
            self._resolver, local_mode=s.webhook_local_mode,
            timeout=httpx.Timeout(s.webhook_timeout_s, connect=s.webhook_connect_timeout_s),
            limits=httpx.Limits(max_connections=s.webhook_concurrency * 2,
                                max_keepalive_connections=s.webhook_concurrency),
            headers={"User-Agent": USER_AGENT})
        pause = Pause()
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    claimed = await self.dispatch_due()
                    if time.monotonic() - self._last_sweep >= 1.0:
                        await self.abandon_past_horizon()
                        self._last_sweep = time.monotonic()
                    pause.reset()
                    if claimed and self._total < s.webhook_concurrency:
                        continue        # maybe more due work behind what was claimed
                    sleep = await self._sleep_for()
                except Exception as exc:  # noqa: BLE001 - PostgreSQL away: in-flight work goes on, retry
                    log.warning("webhook dispatcher waiting", error=repr(exc), outage=failures.classify(exc).waits)
                    sleep = pause.next()
                await wait_any(stop, self._wake, sleep)
        finally:
            await self._drain()
            await self._client.aclose()

    async def _sleep_for(self) -> float:
        """Until the next row falls due, an open circuit lets a probe through, or the idle poll."""
        sleep = self._s.notification_idle_poll_s
        if self._total < self._s.webhook_concurrency:
            async with self._pool.acquire() as conn:
                due_in = await conn.fetchval(_NEXT_DUE_IN)
            if due_in is not None:
                sleep = min(sleep, due_in)
        for b in self._breakers.values():
            reopens = b.reopens_in()
            if reopens is not None:
                sleep = min(sleep, reopens)
        return max(0.005, sleep)

    async def dispatch_due(self) -> int:
        """Claim what may be sent now and start sending it; returns how many were claimed."""
        free = self._s.webhook_concurrency - self._total
        if free <= 0:
            return 0
        async with self._pool.acquire() as conn:
            candidates = await conn.fetch(_CANDIDATES, self.blocked(), self._s.webhook_per_endpoint)
            if not candidates:
                return 0
            chosen = self._choose(candidates, free)
            token = uuid.uuid4().hex
            rows = await conn.fetch(_LEASE, chosen, token, self._s.webhook_lease_s)
        for r in rows:
            claimed = Claimed(r["delivery_id"], r["channel_id"], r["event_id"], r["event_type"], r["url"],
                              r["endpoint"], r["body"].encode(), r["attempts"], r["horizon_at"], token)
            self._start(claimed)
        return len(rows)

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

    def _start(self, claimed: Claimed) -> None:
        ep = claimed.endpoint
        self._in_flight[ep] = self._in_flight.get(ep, 0) + 1
        self._total += 1
        IN_FLIGHT.set(self._total)
        task = asyncio.create_task(self._deliver(claimed), name=f"webhook-{claimed.delivery_id}")
        self._tasks[task] = claimed

    async def _deliver(self, claimed: Claimed) -> None:
        try:
            result = await self.attempt(claimed)
            if result.kind != "no_endpoint":
                self.breaker(claimed.endpoint).record(result.ok)
            ATTEMPTS.labels(result.kind).inc()
            ATTEMPT_SECONDS.observe(result.duration_s)
            await self._record(claimed, result)
        except Exception:  # noqa: BLE001 - never lose the slot; the lease expires and the row is retried
            log.exception("webhook delivery crashed", delivery_id=claimed.delivery_id)
        finally:
            ep = claimed.endpoint
            self._in_flight[ep] -= 1
            if not self._in_flight[ep]:
                del self._in_flight[ep]
            self._total -= 1
            IN_FLIGHT.set(self._total)
            self._tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._wake.set()

    # --- one HTTP attempt ----------------------------------------------------------------------
    def _resolve(self, claimed: Claimed) -> tuple[str, list[bytes]]:
        url = claimed.url
        info = self._channels.get(claimed.channel_id)
        if not url and info is not None:
            url = info.webhook_url
        secrets = self._channels.hmac_secrets(claimed.channel_id) if info is not None else []
        return url, secrets

    async def attempt(self, claimed: Claimed) -> Result:
        started_at, t0 = _now(), time.perf_counter()

        def result(ok: bool, kind: str, code: int | None, error: str, url: str) -> Result:
            return Result(ok, kind, code, error, started_at, time.perf_counter() - t0, url)

        try:
            url, secrets = self._resolve(claimed)
        except Exception as exc:  # noqa: BLE001 - a secret that does not unseal: operations must look
            log.warning("channel secret unusable", channel_id=claimed.channel_id, error=repr(exc)[:300])
            return result(False, "no_endpoint", None, "WEBHOOK_NO_ENDPOINT: channel secret unusable", claimed.url)
        if not url or not secrets:
            return result(False, "no_endpoint", None,
                          f"WEBHOOK_NO_ENDPOINT: channel {claimed.channel_id} has no webhook URL or is unknown", url)
        try:
            webhook_targets.check_url(url, local_mode=self._s.webhook_local_mode)
        except webhook_targets.TargetRefused as exc:
            self._refused(claimed, exc)
            return result(False, "forbidden", None, f"{exc.code.code}: {exc.detail}", url)
        headers = {
            "Content-Type": "application/json",
            signing.HEADER_SIGNATURE: signing.sign(secrets, claimed.body),
            signing.HEADER_EVENT_ID: claimed.event_id,
            signing.HEADER_EVENT_TYPE: claimed.event_type,
            signing.HEADER_DELIVERY_ID: claimed.delivery_id,
            signing.HEADER_ATTEMPT: str(claimed.attempts + 1),
        }
        assert self._client is not None
        try:
            async with asyncio.timeout(self._s.webhook_timeout_s):
                async with self._client.stream("POST", url, content=claimed.body, headers=headers) as resp:
                    code = resp.status_code
            # the answer's body is never read: nothing of it may reach the channel's delivery log
            if 200 <= code < 300:
                return result(True, "ok", code, "", url)
            return result(False, "rejected", code, f"WEBHOOK_REJECTED: HTTP {code}", url)
        except webhook_targets.TargetRefused as exc:       # checked again at connect time: this resolution's answer
            self._refused(claimed, exc)
            return result(False, "forbidden", None, f"{exc.code.code}: {exc.detail}", url)
        except (TimeoutError, httpx.TimeoutException) as exc:
            what = "connect" if isinstance(exc, httpx.ConnectTimeout) else "answer"
            limit = self._s.webhook_connect_timeout_s if what == "connect" else self._s.webhook_timeout_s
            return result(False, "timeout", None, f"WEBHOOK_TIMEOUT: no {what} within {limit:g} s", url)
        except Exception as exc:  # noqa: BLE001 - refused, reset, DNS, TLS, bad URL: all "unreachable"
            # operators get the exception (bounded); the channel gets our words for it
            log.info("webhook attempt failed", delivery_id=claimed.delivery_id, endpoint=claimed.endpoint,
                     error=repr(exc)[:300])
            return result(False, "unreachable", None, f"WEBHOOK_UNREACHABLE: {_unreachable(exc)}", url)

    @staticmethod
    def _refused(claimed: Claimed, exc: webhook_targets.TargetRefused) -> None:
        log.warning("webhook target refused", delivery_id=claimed.delivery_id, channel_id=claimed.channel_id,
                    endpoint=claimed.endpoint, code=exc.code.code, reason=exc.detail)

    # --- recording -----------------------------------------------------------------------------
    async def _record(self, claimed: Claimed, r: Result) -> None:
        delay = 0.0 if r.ok else self._backoff.delay(claimed.attempts + 1)
        for pause in (0.5, 1.0, 2.0, None):
            try:
                await self._record_once(claimed, r, delay)
                return
            except Exception as exc:  # noqa: BLE001 - outage: retry briefly; anything else: give up
                if pause is None or not failures.classify(exc).waits:
                    # the lease expires and the row is attempted again: at least once, same event id
                    log.warning("could not record a webhook attempt", delivery_id=claimed.delivery_id,
                                error=repr(exc))
                    return
                await asyncio.sleep(pause)

    async def _record_once(self, claimed: Claimed, r: Result, delay: float) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_RECORD, claimed.delivery_id, claimed.lease_token, r.ok, delay,
                                      r.status_code, r.error or None, r.started_at, r.url, endpoint_of(r.url))
            status = row["status"] if row else None
            outcome = "delivered" if r.ok else ("abandoned" if status == "dead" else "failed")
            await conn.execute(
                "INSERT INTO delivery_attempts (delivery_id, attempt, started_at, duration_ms, status_code, error, "
                "outcome) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                claimed.delivery_id, claimed.attempts + 1, r.started_at, r.duration_s * 1000, r.status_code,
                r.error or None, outcome)
            if status == "dead":
                await deadletter.abandon(conn, self._s, delivery_id=claimed.delivery_id,
                                         channel_id=claimed.channel_id, event_id=claimed.event_id,
                                         event_type=claimed.event_type, url=r.url, attempts=row["attempts"],
                                         last_error=r.error, first_attempt_at=row["first_attempt_at"],
                                         last_attempt_at=r.started_at, horizon_at=row["horizon_at"])
        if row is None:
            log.info("webhook attempt outlived its lease (redelivered or reclaimed)", delivery_id=claimed.delivery_id)
        elif status == "delivered":
            DELIVERIES.labels("delivered").inc()
            ATTEMPTS_PER_DELIVERY.labels("delivered").observe(row["attempts"])
        elif status == "dead":
            DELIVERIES.labels("abandoned").inc()
            ATTEMPTS_PER_DELIVERY.labels("abandoned").observe(row["attempts"])
            log.warning("webhook delivery abandoned", delivery_id=claimed.delivery_id, event_id=claimed.event_id,
                        attempts=row["attempts"], last_error=r.error)

    async def abandon_past_horizon(self) -> int:
        """Dead-letter pending rows past their horizon that no attempt reached (open circuit, no URL)."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_PAST_HORIZON)
            for r in rows:
                await deadletter.abandon(conn, self._s, delivery_id=r["delivery_id"], channel_id=r["channel_id"],
                                         event_id=r["event_id"], event_type=r["event_type"], url=r["url"],
                                         attempts=r["attempts"],
                                         last_error=r["last_error"] or "not attempted before the horizon",
                                         first_attempt_at=r["first_attempt_at"],
                                         last_attempt_at=r["last_attempt_at"], horizon_at=r["horizon_at"])
        for r in rows:
            DELIVERIES.labels("abandoned").inc()
            ATTEMPTS_PER_DELIVERY.labels("abandoned").observe(r["attempts"])
            log.warning("webhook delivery abandoned at its horizon", delivery_id=r["delivery_id"],
                        attempts=r["attempts"])
        return len(rows)

    async def _drain(self, grace_s: float = 3.0) -> None:
        """On stop: let in-flight requests finish briefly, then cancel them and hand their rows back."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        left = dict(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
            with contextlib.suppress(Exception):
                async with self._pool.acquire() as conn:
                    await conn.execute(
                        "UPDATE deliveries SET leased_until = NULL, lease_token = NULL "
                        "WHERE delivery_id = ANY($1::text[]) AND lease_token = ANY($2::text[])",
                        [c.delivery_id for c in left.values()], list({c.lease_token for c in left.values()}))
