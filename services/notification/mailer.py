"""The email sender: claims due rows of the ``emails`` table and sends them over SMTP (aiosmtplib).

The same durable schedule as the webhooks, with one destination: leases instead of open
transactions, exponential backoff with jitter on a temporary failure (connection refused, 4xx),
dead-lettered at once on a permanent refusal (5xx) and after the horizon otherwise. The message id
is derived from the email id, so a message sent twice (a crash between the SMTP answer and the
database update) is recognisable as the same message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import aiosmtplib
import asyncpg

from services.kernel import failures, logs
from services.kernel.retry import Backoff
from services.kernel.runtime import ConfigError
from services.kernel.settings import Settings
from services.kernel.waiting import Pause, wait_any
from services.notification import deadletter
from services.notification.metrics import EMAILS

log = logs.get(__name__)

_CLAIM = """
UPDATE emails SET leased_until = now() + make_interval(secs => $3), lease_token = $2
WHERE email_id IN (
    SELECT email_id FROM emails
    WHERE status = 'pending' AND next_attempt_at <= now() AND (leased_until IS NULL OR leased_until < now())
    ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING email_id, event_id, event_type, channel_id, recipient, locale, subject, body, attempts, horizon_at,
          created_at
"""

_RECORD = """
UPDATE emails SET
    attempts = attempts + 1,
    status = CASE WHEN $3 THEN 'sent'
                  WHEN $4 OR now() + make_interval(secs => $5) > horizon_at THEN 'dead' ELSE 'pending' END,
    next_attempt_at = CASE WHEN $3 THEN next_attempt_at ELSE now() + make_interval(secs => $5) END,
    sent_at = CASE WHEN $3 THEN now() ELSE sent_at END,
    leased_until = NULL, lease_token = NULL, last_error = $6,
    first_attempt_at = COALESCE(first_attempt_at, $7), last_attempt_at = $7
WHERE email_id = $1 AND lease_token = $2
RETURNING status, attempts, first_attempt_at, horizon_at
"""

_NEXT_DUE_IN = """
SELECT EXTRACT(EPOCH FROM (next_attempt_at - now()))::float8 FROM emails
WHERE status = 'pending' AND next_attempt_at > now() ORDER BY next_attempt_at LIMIT 1
"""

_PAST_HORIZON = """
UPDATE emails SET status = 'dead', leased_until = NULL, lease_token = NULL
WHERE email_id IN (
    SELECT email_id FROM emails
    WHERE status = 'pending' AND horizon_at <= now() AND (leased_until IS NULL OR leased_until < now())
    LIMIT 200 FOR UPDATE SKIP LOCKED)
RETURNING email_id, event_id, event_type, channel_id, recipient, attempts, last_error, first_attempt_at,
          last_attempt_at, horizon_at
"""

SECURITY = ("none", "starttls", "tls")


def message_id(email_id: str, sender: str) -> str:
    domain = parseaddr(sender)[1].partition("@")[2] or "bubuh.local"
    return f"<{email_id}@{domain}>"


def build_message(row, settings: Settings) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.email_sender
    msg["To"] = row["recipient"]
    msg["Subject"] = row["subject"]
    msg["Date"] = format_datetime(row["created_at"])
    msg["Message-ID"] = message_id(row["email_id"], settings.email_sender)
    msg["Content-Language"] = row["locale"].replace("+", ", ")
    msg["X-Bubuh-Event-Id"] = row["event_id"]
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(row["body"])
    return msg


def classify(exc: BaseException) -> tuple[bool, str]:
    """(permanent, error text) of an SMTP failure: 5xx answers are permanent, everything else is not."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        permanent = bool(codes) and all(c >= 500 for c in codes)
        return permanent, f"{'EMAIL_REFUSED' if permanent else 'EMAIL_UNAVAILABLE'}: recipient refused {codes}"
    if isinstance(exc, aiosmtplib.SMTPResponseException) and not isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        permanent = exc.code >= 500
        return permanent, f"{'EMAIL_REFUSED' if permanent else 'EMAIL_UNAVAILABLE'}: {exc.code} {exc.message}"[:500]
    return False, f"EMAIL_UNAVAILABLE: {type(exc).__name__}: {exc}"[:500]


class Mailer:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, wake: asyncio.Event | None = None) -> None:
        if settings.smtp_security not in SECURITY:
            raise ConfigError(f"BUBUH_SMTP_SECURITY={settings.smtp_security!r}: choose from {', '.join(SECURITY)}")
        self._pool = pool
        self._s = settings
        self._wake = wake or asyncio.Event()
        self._backoff = Backoff(base_s=settings.email_backoff_base_s, factor=settings.webhook_backoff_factor,
                                max_s=settings.webhook_backoff_max_s)
        self._tasks: set[asyncio.Task] = set()
        self._last_sweep = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        pause = Pause()
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    claimed = await self.send_due()
                    if time.monotonic() - self._last_sweep >= 1.0:
                        await self.abandon_past_horizon()
                        self._last_sweep = time.monotonic()
                    pause.reset()
                    if claimed and len(self._tasks) < self._s.email_concurrency:
                        continue
                    sleep = self._s.notification_idle_poll_s
                    if len(self._tasks) < self._s.email_concurrency:
                        async with self._pool.acquire() as conn:
                            due_in = await conn.fetchval(_NEXT_DUE_IN)
                        if due_in is not None:
                            sleep = min(sleep, due_in)
                    sleep = max(0.005, sleep)
                except Exception as exc:  # noqa: BLE001 - PostgreSQL away: wait and retry
                    log.warning("email sender waiting", error=repr(exc), outage=failures.classify(exc).waits)
                    sleep = pause.next()
                await wait_any(stop, self._wake, sleep)
        finally:
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=3)
            for t in list(self._tasks):
                t.cancel()

    async def send_due(self) -> int:
        free = self._s.email_concurrency - len(self._tasks)
        if free <= 0:
            return 0
        token = uuid.uuid4().hex
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_CLAIM, free, token, self._s.smtp_timeout_s * 3 + 10)
        for row in rows:
            task = asyncio.create_task(self._send(row, token))
            self._tasks.add(task)
            task.add_done_callback(self._done)
        return len(rows)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _send(self, row, token: str) -> None:
        started_at = dt.datetime.now(dt.UTC)
        s = self._s
        try:
            async with asyncio.timeout(s.smtp_timeout_s * 3):     # the lease is longer than this
                await aiosmtplib.send(
                    build_message(row, s), hostname=s.smtp_host, port=s.smtp_port, timeout=s.smtp_timeout_s,
                    username=s.smtp_username or None, password=s.smtp_password or None,
                    use_tls=s.smtp_security == "tls", start_tls=s.smtp_security == "starttls")
            ok, permanent, error = True, False, ""
        except Exception as exc:  # noqa: BLE001 - classified below
            ok = False
            permanent, error = classify(exc)
        delay = 0.0 if ok else self._backoff.delay(row["attempts"] + 1)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                rec = await conn.fetchrow(_RECORD, row["email_id"], token, ok, permanent, delay, error or None,
                                          started_at)
                if rec is not None and rec["status"] == "dead":
                    await deadletter.abandon(conn, s, delivery_id=row["email_id"], channel_id=row["channel_id"],
                                             event_id=row["event_id"], event_type=row["event_type"],
                                             url=f"mailto:{row['recipient']}", attempts=rec["attempts"],
                                             last_error=error, first_attempt_at=rec["first_attempt_at"],
                                             last_attempt_at=started_at, horizon_at=rec["horizon_at"])
        except Exception as exc:  # noqa: BLE001 - the lease expires and the email is tried again
            log.warning("could not record an email attempt", email_id=row["email_id"], error=repr(exc))
            return
        status = rec["status"] if rec is not None else None
        if status == "sent":
            EMAILS.labels("sent").inc()
        elif status == "dead":
            EMAILS.labels("abandoned").inc()
            log.warning("email abandoned", email_id=row["email_id"], event_id=row["event_id"], error=error)
        elif status == "pending":
            EMAILS.labels("retry").inc()
            log.info("email will be retried", email_id=row["email_id"], attempts=rec["attempts"], error=error,
                     in_s=round(delay, 3))

    async def abandon_past_horizon(self) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_PAST_HORIZON)
            for r in rows:
                await deadletter.abandon(conn, self._s, delivery_id=r["email_id"], channel_id=r["channel_id"],
                                         event_id=r["event_id"], event_type=r["event_type"],
                                         url=f"mailto:{r['recipient']}", attempts=r["attempts"],
                                         last_error=r["last_error"] or "not attempted before the horizon",
                                         first_attempt_at=r["first_attempt_at"],
                                         last_attempt_at=r["last_attempt_at"], horizon_at=r["horizon_at"])
        for _ in rows:
            EMAILS.labels("abandoned").inc()
        return len(rows)
