"""The email sender: sends due rows of the ``emails`` table over SMTP (aiosmtplib).

The schedule, leases, recording and horizon are the due-time table worker's (``due_work.py``), with
one destination and the email backoff (``email_backoff_*``). A permanent refusal (5xx) is
dead-lettered at once; a temporary failure (connection refused, 4xx) is retried until the horizon.
The message id is derived from the email id, so a message sent twice (a crash between the SMTP
answer and the database update) is recognisable as the same message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import aiosmtplib
import asyncpg

from services.kernel import logs
from services.kernel.errors import EMAIL_REFUSED, EMAIL_UNAVAILABLE, ErrorCode
from services.kernel.retry import Backoff
from services.kernel.runtime import ConfigError
from services.kernel.settings import Settings
from services.notification.due_work import Claimed, Outcome, Sender, Table
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


def classify(exc: BaseException) -> tuple[ErrorCode, str]:
    """(code, our words) of an SMTP failure: 5xx answers are permanent (EMAIL_REFUSED), everything
    else is not (EMAIL_UNAVAILABLE)."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        permanent = bool(codes) and all(c >= 500 for c in codes)
        return (EMAIL_REFUSED if permanent else EMAIL_UNAVAILABLE), f"recipient refused {codes}"
    if isinstance(exc, aiosmtplib.SMTPResponseException) and not isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        code = EMAIL_REFUSED if exc.code >= 500 else EMAIL_UNAVAILABLE
        return code, f"{exc.code} {exc.message}"[:500 - len(code.code) - 2]
    return EMAIL_UNAVAILABLE, f"{type(exc).__name__}: {exc}"[:500 - len(EMAIL_UNAVAILABLE.code) - 2]


class EmailSender(Sender):
    name = "email"
    table = Table("emails", "email_id", "'mailto:' || recipient")

    @staticmethod
    def check(settings: Settings) -> None:
        if settings.smtp_security not in SECURITY:
            raise ConfigError(f"BUBUH_SMTP_SECURITY={settings.smtp_security!r}: choose from {', '.join(SECURITY)}")

    def __init__(self, settings: Settings) -> None:
        self.check(settings)
        self._s = settings
        self.concurrency = settings.email_concurrency
        self.lease_s = settings.smtp_timeout_s * 3 + 10      # outlasts an attempt (smtp_timeout_s * 3)
        self.backoff = Backoff(base_s=settings.email_backoff_base_s, factor=settings.email_backoff_factor,
                               max_s=settings.email_backoff_max_s)

    async def claim(self, conn: asyncpg.Connection, free: int, token: str) -> list[Claimed]:
        rows = await conn.fetch(_CLAIM, free, token, self.lease_s)
        return [Claimed(r["email_id"], r["channel_id"], r["event_id"], r["event_type"], r["attempts"],
                        r["horizon_at"], token, r) for r in rows]

    async def attempt(self, claimed: Claimed) -> Outcome:
        started_at = dt.datetime.now(dt.UTC)
        s = self._s
        target = f"mailto:{claimed.row['recipient']}"
        try:
            async with asyncio.timeout(s.smtp_timeout_s * 3):     # the lease is longer than this
                await aiosmtplib.send(
                    build_message(claimed.row, s), hostname=s.smtp_host, port=s.smtp_port, timeout=s.smtp_timeout_s,
                    username=s.smtp_username or None, password=s.smtp_password or None,
                    use_tls=s.smtp_security == "tls", start_tls=s.smtp_security == "starttls")
        except Exception as exc:  # noqa: BLE001 - classified
            code, why = classify(exc)
            return Outcome(False, code, why, started_at, target)
        return Outcome(True, None, "", started_at, target)

    async def record(self, conn: asyncpg.Connection, claimed: Claimed, outcome: Outcome, delay_s: float):
        permanent = outcome.code is EMAIL_REFUSED
        return await conn.fetchrow(_RECORD, claimed.key, claimed.lease_token, outcome.ok, permanent, delay_s,
                                   outcome.error or None, outcome.started_at)

    def recorded(self, claimed: Claimed, outcome: Outcome, row, delay_s: float) -> None:
        status = row["status"] if row is not None else None
        if status == "sent":
            EMAILS.labels("sent").inc()
        elif status == "dead":
            EMAILS.labels("abandoned").inc()
            log.warning("email abandoned", email_id=claimed.key, event_id=claimed.event_id, error=outcome.error)
        elif status == "pending":
            EMAILS.labels("retry").inc()
            log.info("email will be retried", email_id=claimed.key, attempts=row["attempts"], error=outcome.error,
                     in_s=round(delay_s, 3))

    def abandoned_at_horizon(self, row) -> None:
        EMAILS.labels("abandoned").inc()
