"""What the notification tests share: a real HTTP receiver, a real SMTP server, event builders.

Also the fast tests of the pieces that need no platform: the breaker's state machine, the backoff's
growing gaps, the templates and the signature against ``openssl``.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.contracts.bubuh.v1 import purchase_pb2, quota_pb2, stamp_pb2
from services.kernel import events, topics
from services.kernel.producer import Producer
from services.kernel.retry import Backoff
from services.kernel.settings import Settings
from services.notification import signing, templates
from services.notification.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from tests.platform import free_port

# --- a real HTTP receiver -------------------------------------------------------------------------


@dataclass
class Hit:
    at: float                      # wall clock when the request had arrived whole
    method: str
    path: str
    headers: dict[str, str]        # lower-case names
    body: bytes
    index: int                     # 0 for the first request this receiver got
    status: int | None = None      # what it answered; None while hanging (or never)
    answered_at: float | None = None

    @property
    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def event_id(self) -> str:
        return self.headers.get("bubuh-event-id", "")


Respond = Callable[[Hit], Awaitable[int] | int]


async def hang_forever(_hit: Hit) -> int:
    await asyncio.Event().wait()
    return 200


class Receiver:
    """A tiny HTTP/1.1 server (keep-alive, Content-Length bodies) on 127.0.0.1, in the test's loop.

    ``respond(hit)`` returns the status to answer (or never returns: a hanging endpoint).
    """

    def __init__(self, respond: Respond | None = None) -> None:
        self.respond = respond or (lambda _hit: 200)
        self.hits: list[Hit] = []
        self.open_now = 0           # requests read and not yet answered
        self.max_open = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self.port = 0

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/bubuh"

    def ok(self) -> list[Hit]:
        return [h for h in self.hits if h.status is not None and 200 <= h.status < 300]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                hit = Hit(time.time(), method, path, headers, body, len(self.hits))
                self.hits.append(hit)
                self.open_now += 1
                self.max_open = max(self.max_open, self.open_now)
                try:
                    status = self.respond(hit)
                    if asyncio.iscoroutine(status):
                        status = await status
                finally:
                    self.open_now -= 1
                hit.status, hit.answered_at = status, time.time()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
                             .encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()


# --- a real SMTP server -------------------------------------------------------------------------------


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: email.message.EmailMessage

    @property
    def text(self) -> str:
        return self.message.get_content()


@dataclass
class SmtpSink:
    """aiosmtpd in its own thread, collecting every message it accepts."""

    port: int = field(default_factory=free_port)
    mails: list[Mail] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 OK"

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if getattr(self, "_controller", None):
            self._controller.stop()


# --- events as the other services publish them -----------------------------------------------------


def stamp_completed(settings: Settings, channel_id: str, *, email: str = "", account: str = "acct-1",
                    sn: str | None = None) -> events.Outgoing:
    rid = str(uuid.uuid4())
    msg = stamp_pb2.StampCompleted(request_id=rid, channel_id=channel_id, account_id=account,
                                   sn=sn or f"SN{uuid.uuid4().hex[:18].upper()}", output_ref=f"out/{rid}.pdf",
                                   output_sha256="ab" * 32, email=email)
    return events.outgoing(settings.topic(topics.STAMP_EVENTS.name), rid, events.envelope(msg, producer="stamping"))


def stamp_failed(settings: Settings, channel_id: str, *, email: str = "", account: str = "acct-1",
                 code: str = "PDF_ENCRYPTED", detail: str = "the PDF is password protected") -> events.Outgoing:
    rid = str(uuid.uuid4())
    msg = stamp_pb2.StampFailed(request_id=rid, channel_id=channel_id, account_id=account, code=code,
                                detail=detail, permanent=True, email=email)
    return events.outgoing(settings.topic(topics.STAMP_EVENTS.name), rid, events.envelope(msg, producer="stamping"))


def quota_rejected(settings: Settings, channel_id: str, account: str = "acct-1") -> events.Outgoing:
    msg = quota_pb2.QuotaRejected(channel_id=channel_id, account_id=account, request_id=str(uuid.uuid4()),
                                  code="QUOTA_INSUFFICIENT", detail="no available unit",
                                  balance=quota_pb2.Balance(credited=1, committed=1))
    return events.outgoing(settings.topic(topics.QUOTA_EVENTS.name), events.account_key(channel_id, account),
                           events.envelope(msg, producer="quota"))


def purchase_rejected(settings: Settings, channel_id: str, account: str = "acct-1") -> events.Outgoing:
    msg = purchase_pb2.PurchaseRejected(purchase_id=str(uuid.uuid4()), channel_id=channel_id, account_id=account,
                                        channel_order_id="o-1", code="AMOUNT_MISMATCH", detail="amount != 10000")
    return events.outgoing(settings.topic(topics.PURCHASE_EVENTS.name), events.account_key(channel_id, account),
                           events.envelope(msg, producer="purchase"))


async def publish(settings: Settings, records: list[events.Outgoing]) -> dict[str, float]:
    """Publish and wait for Kafka's acks; returns each event id's publish time (wall clock, before send)."""
    producer = Producer(settings)
    await producer.start()
    try:
        sent = {r.event_id: time.time() for r in records}
        await producer.publish_many(records)
        return sent
    finally:
        await producer.stop()


def openssl_hmac_hex(secret: str, data: bytes) -> str:
    """HMAC-SHA256 by an independent implementation: ``openssl dgst -sha256 -hmac SECRET``."""
    out = subprocess.run(["openssl", "dgst", "-sha256", "-hmac", secret], input=data, capture_output=True,
                         check=True, timeout=10).stdout.decode()
    return out.strip().split("= ")[-1].strip()


# --- fast tests of the parts ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_probes_once_half_open_and_closes_on_success():
    clock = FakeClock()
    b = Breaker(failures=3, cooldown_s=10, clock=clock)
    assert b.capacity(in_flight=0, per_endpoint=4) == 4
    assert b.capacity(in_flight=3, per_endpoint=4) == 1
    b.record(False)
    b.record(False)
    b.record(True)                      # a success resets the count
    b.record(False)
    b.record(False)
    assert b.state == CLOSED
    b.record(False)
    assert b.state == OPEN and b.capacity(0, 4) == 0
    clock.now = 9.9
    assert b.capacity(0, 4) == 0 and abs(b.reopens_in() - 0.1) < 1e-9
    clock.now = 10.0
    assert b.capacity(0, 4) == 1 and b.state == HALF_OPEN      # one probe
    assert b.capacity(1, 4) == 0                                # and only one
    b.record(False)                                             # the probe failed: open again
    assert b.state == OPEN and b.capacity(0, 4) == 0
    clock.now = 20.0
    assert b.capacity(0, 4) == 1
    b.record(True)
    assert b.state == CLOSED and b.capacity(0, 4) == 4


def test_backoff_gaps_grow_for_every_jitter():
    import random
    rng = random.Random(7)
    backoff = Backoff(base_s=0.2, factor=2, max_s=3600)
    for _ in range(2000):
        gaps = [backoff.delay(n, rng) for n in range(1, 8)]
        assert all(a <= b for a, b in zip(gaps, gaps[1:], strict=False)), gaps
        assert 0.1 <= gaps[0] <= 0.2


def test_templates_in_both_languages_and_bilingual():
    data = {"account_id": "acct-9", "purchase_id": "p-1", "quantity": 5,
            "balance": {"credited": 5, "pending": 0, "committed": 0, "available": 5}}
    id_ = templates.render("quota.credited", data, "id")
    en = templates.render("quota.credited", data, "en")
    both = templates.render("quota.credited", data, "id+en")
    assert id_.subject == "Kuota e-Meterai Anda telah ditambahkan"
    assert "5 e-Meterai telah ditambahkan ke akun acct-9" in id_.body
    assert en.subject == "Your e-Meterai quota has been credited"
    assert "5 e-Meterai have been credited to account acct-9" in en.body
    assert both.subject == f"{id_.subject} / {en.subject}"
    assert both.body.index("Saldo tersedia") < both.body.index("Available now")
    assert templates.render("quota.rejected", data, "id") is None      # channels hear of it; buyers do not


def test_signature_is_hmac_sha256_of_t_dot_body_as_openssl_computes_it():
    secret = "9f" * 32
    body = json.dumps({"id": "e-1", "type": "stamp.completed", "data": {"sn": "SN1", "note": "tanda \u00e9"}},
                      ensure_ascii=False).encode()
    header = signing.sign([secret.encode()], body, timestamp=1_700_000_000)
    t, sigs = signing.parse(header)
    assert t == 1_700_000_000 and len(sigs) == 1
    assert sigs[0] == openssl_hmac_hex(secret, b"1700000000." + body)
    assert signing.verify(secret.encode(), header, body, now=1_700_000_100)
    assert not signing.verify(secret.encode(), header, body, now=1_700_000_000 + 301)    # replayed too late
    assert not signing.verify(secret.encode(), header, body + b" ", now=1_700_000_000)  # body changed
    assert not signing.verify(b"other", header, body, now=1_700_000_000)


async def test_receiver_and_smtp_sink_work():
    """The test doubles themselves, so a failure elsewhere is never theirs."""
    import smtplib

    import httpx
    rec = await Receiver(lambda hit: 201 if hit.index else 503).start()
    try:
        async with httpx.AsyncClient() as client:
            r1 = await client.post(rec.url, content=b'{"a":1}', headers={"Bubuh-Event-Id": "x"})
            r2 = await client.post(rec.url, content=b'{"a":2}')
        assert (r1.status_code, r2.status_code) == (503, 201)
        assert rec.hits[0].event_id == "x" and rec.hits[1].json == {"a": 2} and len(rec.ok()) == 1
    finally:
        await rec.stop()

    sink = await asyncio.to_thread(SmtpSink().start)

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as smtp:
            smtp.sendmail("a@x.test", ["b@y.test"], "Subject: hi\r\n\r\nbody\r\n")
    try:
        await asyncio.to_thread(send)
        assert sink.mails[0].rcpt_tos == ["b@y.test"] and sink.mails[0].message["Subject"] == "hi"
    finally:
        await asyncio.to_thread(sink.stop)


def test_the_documented_receiver_recipe_verifies_bubuh_signatures(tmp_path, monkeypatch):
    """docs/webhooks.md's Python recipe, run as written, against signatures the dispatcher makes."""
    from services.kernel.settings import REPO_ROOT
    doc = (REPO_ROOT / "docs" / "webhooks.md").read_text()
    recipe = doc.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)                    # the recipe opens webhooks.db in the working directory
    ns: dict = {"__name__": "recipe"}
    exec(compile(recipe, "webhooks.md", "exec"), ns)  # noqa: S102 - our own documentation
    secret = b"5e" * 32
    body = b'{"id":"e-1","type":"quota.credited","data":{}}'
    now = time.time()
    assert ns["verify"](signing.sign([secret], body), body, [secret])
    assert ns["verify"](signing.sign([b"new", secret], body), body, [secret])       # rotation: 2nd v1
    assert not ns["verify"](signing.sign([secret], body, timestamp=int(now) - 600), body, [secret])
    assert not ns["verify"](signing.sign([secret], body), body.replace(b"e-1", b"e-2"), [secret])
