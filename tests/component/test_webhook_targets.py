"""Webhook targets through the real dispatcher and registry (issue 10), against real PostgreSQL.

The dispatcher runs its own loop over ``deliveries`` rows and a real HTTP client; the receivers are
raw TCP servers on 127.0.0.1 that count every connection. Names are answered by a stub resolver,
given to the dispatcher and the registry, and also installed as ``socket.getaddrinfo`` so that no
code path can ask real DNS. ``offline`` refuses (and records) every connect() to an address outside
127.0.0.0/8 and ::1: no test here sends traffic anywhere else, whatever the code under test does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import secrets
import socket
import uuid

import httpx
import pytest

from services.contracts.bubuh.v1 import channel_pb2
from services.kernel import errors, sealed
from services.kernel.channels import ChannelView, api_key_hash
from services.kernel.http import create_app
from services.kernel.processing.deadletter import DLQ_REASON
from services.kernel.webhook_targets import StaticResolver
from services.notification import api
from services.notification.deliveries import DeliveryLog
from services.notification.due_work import DueWorker
from services.notification.event_intake import endpoint_of
from services.notification.webhook_sender import WebhookSender
from services.purchase.registry import Registry, RegistryError
from tests.component import handler_support as hs

MARKER = "s3cr3t-from-the-target"          # what a hostile target answers; must never reach the channel
PUBLIC = "8.8.8.8"                          # answered at registration, never connected to


class Offline:
    """Records every connect(); refuses any outside loopback; answers names from a map, never DNS."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []
        self.answers: dict[str, list[str]] = {}

    def allowed(self, host: str) -> bool:
        ip = ipaddress.ip_address(host.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return ip.is_loopback


@pytest.fixture
def offline(monkeypatch):
    guard = Offline()
    real_connect, real_connect_ex, real_gai = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host, port = address[0], address[1]
            guard.connects.append((host, port))
            if not guard.allowed(host):
                raise OSError(f"test guard: no connection to {host}:{port} (only loopback)")

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        try:
            if name is not None:
                ipaddress.ip_address(name.split("%")[0])
            return real_gai(host, port, *args, **kwargs)                # a literal: no DNS involved
        except ValueError:
            pass
        found = guard.answers.get(name.lower().rstrip("."))
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, "test guard: no DNS in tests")
        return [info for a in found for info in real_gai(a, port, *args, **kwargs)]

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return guard


class RawReceiver:
    """A TCP server on 127.0.0.1 answering every request with fixed bytes; counts connections."""

    def __init__(self, answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def __aenter__(self) -> RawReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            self.requests.append(head + await reader.readexactly(length))
            writer.write(self.answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
async def stores():
    hs.postgres_up()
    s = hs.settings(webhook_backoff_base_s=60.0, notification_idle_poll_s=0.05)
    async with hs.service_pool(s, "notification") as notification, hs.service_pool(s, "purchase") as purchase:
        yield s, notification, purchase


class Channel:
    def __init__(self, settings, view: ChannelView, url: str) -> None:
        self.channel_id = "ch_" + secrets.token_hex(6)
        self.api_key = "bbh_" + secrets.token_urlsafe(16)
        secret = secrets.token_hex(32).encode()
        view.apply(channel_pb2.Channel(
            channel_id=self.channel_id, name=self.channel_id, status="active", default_profile="standard",
            api_key_sha256=[api_key_hash(self.api_key)], webhook_url=url, version=1,
            hmac_secret_sealed=sealed.seal(settings.platform_key(), secret, self.channel_id.encode())))


async def schedule(pool, channel: Channel, url: str, horizon_s: float = 3600) -> str:
    event_id = str(uuid.uuid4())
    now = dt.datetime.now(dt.UTC)
    await pool.execute(
        "INSERT INTO deliveries (delivery_id, channel_id, event_id, event_type, url, endpoint, body, next_attempt_at, "
        "horizon_at, created_at) VALUES ($1, $2, $3, 'stamp.completed', $4, $5, $6, $7, $8, $7)",
        str(uuid.uuid4()), channel.channel_id, event_id, url, endpoint_of(url),
        json.dumps({"id": event_id, "type": "stamp.completed", "data": {}}), now,
        now + dt.timedelta(seconds=horizon_s))
    return event_id


async def dispatch_until_attempted(pool, settings, view, resolver, event_ids: list[str]) -> None:
    """Run the real dispatcher loop until every one of these deliveries has had one attempt."""
    stop = asyncio.Event()
    task = asyncio.create_task(DueWorker(pool, settings, WebhookSender(view, settings, resolver=resolver)).run(stop))
    try:
        for _ in range(200):
            done = await pool.fetchval("SELECT count(*) FROM deliveries WHERE event_id = ANY($1::text[]) "
                                       "AND attempts >= 1", event_ids)
            if done == len(event_ids) or task.done():
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    assert done == len(event_ids), "the dispatcher did not attempt every delivery"


async def delivery_log(settings, view, pool, channel: Channel, event_id: str) -> tuple[dict, str]:
    """``GET /v1/deliveries?event_id=`` as the channel reads it (the app in process, no network)."""
    app = create_app("notification", [api.router(view, DeliveryLog(settings, pool))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bubuh.test") as client:
        r = await client.get("/v1/deliveries", params={"event_id": event_id},
                             headers={"Authorization": f"Bearer {channel.api_key}"})
    assert r.status_code == 200, r.text
    return r.json()["deliveries"][0], r.text


async def test_strict_mode_refuses_loopback_in_every_spelling_and_nothing_reaches_the_receiver(stores, offline):
    settings, pool, _ = stores
    strict = settings.model_copy(update={"webhook_local_mode": False})
    view = ChannelView(strict)
    async with RawReceiver() as receiver:
        p = receiver.port
        offline.answers["hooks.example"] = ["127.0.0.1"]
        resolver = StaticResolver({"hooks.example": ["127.0.0.1"]})
        urls = {f"http://127.0.0.1:{p}/hooks": "WEBHOOK_SCHEME_FORBIDDEN: plain http",
                f"https://127.0.0.1:{p}/hooks": "WEBHOOK_TARGET_FORBIDDEN: loopback address",
                f"https://[::ffff:127.0.0.1]:{p}/": "WEBHOOK_TARGET_FORBIDDEN: loopback address (inside an IPv6",
                f"https://hooks.example:{p}/hooks": "WEBHOOK_TARGET_FORBIDDEN: loopback address",
                f"https://2130706433:{p}/": "WEBHOOK_TARGET_FORBIDDEN: numeric host",
                f"https://0x7f.1:{p}/": "WEBHOOK_TARGET_FORBIDDEN: numeric host"}
        channel = Channel(strict, view, next(iter(urls)))
        ids = {url: await schedule(pool, channel, url) for url in urls}
        await dispatch_until_attempted(pool, strict, view, resolver, list(ids.values()))

        assert receiver.connections == 0 and receiver.requests == []
        assert [c for c in offline.connects if c[1] == p] == [], "a connection to the receiver was attempted"
        for url, expected in urls.items():
            shown, _ = await delivery_log(strict, view, pool, channel, ids[url])
            assert shown["status"] == "pending" and shown["last_status_code"] is None
            assert shown["last_error"].startswith(expected), (url, shown["last_error"])
            assert shown["log"][0]["error"] == shown["last_error"]
            errors.lookup(shown["last_error"].split(":")[0])                 # a catalogued code


async def test_a_name_public_at_registration_and_rebound_at_delivery_is_refused_before_connecting(stores, offline):
    settings, pool, purchase_pool = stores
    strict = settings.model_copy(update={"webhook_local_mode": False})
    async with RawReceiver() as receiver:
        url = f"https://shop.example:{receiver.port}/hooks/bubuh"
        # registration: the name answers a public address, so it is accepted
        registry = Registry(purchase_pool, strict, resolver=StaticResolver({"shop.example": [PUBLIC]}))
        credentials = await registry.add("rebinding shop", webhook_url=url)
        assert credentials.channel_id
        # delivery: the same name now answers this machine (and the socket-level stub agrees)
        offline.answers["shop.example"] = ["127.0.0.1"]
        view = ChannelView(strict)
        channel = Channel(strict, view, url)
        event_id = await schedule(pool, channel, url)
        await dispatch_until_attempted(pool, strict, view, StaticResolver({"shop.example": ["127.0.0.1"]}),
                                       [event_id])
        shown, _ = await delivery_log(strict, view, pool, channel, event_id)
        assert shown["last_error"] == "WEBHOOK_TARGET_FORBIDDEN: loopback address"
        assert receiver.connections == 0 and [c for c in offline.connects if c[1] == receiver.port] == []


@pytest.mark.parametrize("url, code", [
    ("https://169.254.169.254/latest/meta-data/", "WEBHOOK_TARGET_FORBIDDEN"),
    ("https://[fd00:ec2::254]/", "WEBHOOK_TARGET_FORBIDDEN"),
    ("https://10.0.0.8/hooks", "WEBHOOK_TARGET_FORBIDDEN"),
    ("https://[::ffff:192.168.1.1]/hooks", "WEBHOOK_TARGET_FORBIDDEN"),
    ("https://127.0.0.1:8443/hooks", "WEBHOOK_TARGET_FORBIDDEN"),
    ("https://2130706433/", "WEBHOOK_TARGET_FORBIDDEN"),
    ("https://internal.example/hooks", "WEBHOOK_TARGET_FORBIDDEN"),     # resolves to a private address
    ("http://shop.example/hooks", "WEBHOOK_SCHEME_FORBIDDEN"),
])
async def test_registration_refuses_forbidden_targets_with_a_coded_error(stores, offline, url, code):
    settings, _, purchase_pool = stores
    strict = settings.model_copy(update={"webhook_local_mode": False})
    registry = Registry(purchase_pool, strict,
                        resolver=StaticResolver({"shop.example": [PUBLIC], "internal.example": ["10.1.2.3"]}))
    with pytest.raises(RegistryError) as refused:
        await registry.add("hostile", webhook_url=url)
    assert str(refused.value).startswith(code)
    fine = await registry.add("fine", webhook_url="https://shop.example/hooks")
    with pytest.raises(RegistryError) as refused:
        await registry.set_webhook(fine.channel_id, url)
    assert str(refused.value).startswith(code)
    assert offline.connects == [] or all(offline.allowed(h) for h, _ in offline.connects)


@pytest.mark.parametrize("answer, expected", [
    (f"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: {len(MARKER) + 9}"
     f"\r\n\r\nerror: {MARKER}\r\n".encode(), "WEBHOOK_REJECTED: HTTP 500"),
    (f"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/{MARKER}\r\nContent-Length: {len(MARKER)}\r\n\r\n"
     f"{MARKER}".encode(), "WEBHOOK_REJECTED: HTTP 302"),
    (f"SSH-2.0-OpenSSH_9.6 {MARKER}\r\n\r\n".encode(), "WEBHOOK_UNREACHABLE: the answer was not valid HTTP"),
    (f"HTTP/1.1 503 {MARKER}\r\nX-Leak: {MARKER}\r\nContent-Length: 0\r\n\r\n".encode(),
     "WEBHOOK_REJECTED: HTTP 503"),
])
async def test_nothing_the_target_answers_reaches_the_delivery_log_or_the_dead_letter(stores, offline, answer,
                                                                                        expected):
    settings, pool, _ = stores
    local = settings.model_copy(update={"webhook_local_mode": True, "webhook_horizon_s": 0.5})
    view = ChannelView(local)
    async with RawReceiver(answer) as receiver:
        url = f"http://127.0.0.1:{receiver.port}/hooks"
        channel = Channel(local, view, url)
        event_id = await schedule(pool, channel, url, horizon_s=0.5)     # the first failure is the last
        await dispatch_until_attempted(pool, local, view, StaticResolver({}), [event_id])
        assert receiver.connections >= 1
        shown, raw = await delivery_log(local, view, pool, channel, event_id)
        assert MARKER not in raw and "OpenSSH" not in raw
        assert shown["last_error"] == expected and shown["status"] == "dead"
        entries = [(eid, v) for eid, v in await hs.outbox(pool) if getattr(v, "event_id", "") == event_id]
        dead_letters = [v for _, v in entries]
        assert [d.last_error for d in dead_letters] == [expected]
        code = expected.split(":")[0]
        assert [d.code for d in dead_letters] == [code]          # the catalogued code, as a field of its own
        headers = json.loads(await pool.fetchval("SELECT headers::text FROM outbox WHERE event_id = $1",
                                                 entries[0][0]))
        assert [DLQ_REASON, code] in headers                      # and as every dead-letter entry's reason


async def test_a_delivery_no_attempt_reached_before_its_horizon_is_dead_lettered_as_expired(stores):
    """An endpoint whose circuit stays open gets no attempt; at the horizon the entry says DELIVERY_EXPIRED."""
    settings, pool, _ = stores
    local = settings.model_copy(update={"webhook_local_mode": True})
    view = ChannelView(local)
    url = "http://127.0.0.1:9/hooks"
    channel = Channel(local, view, url)
    event_id = await schedule(pool, channel, url, horizon_s=-1)          # past its horizon, never attempted
    worker = DueWorker(pool, local, WebhookSender(view, local, resolver=StaticResolver({})))
    assert await worker.abandon_past_horizon() >= 1
    row = await pool.fetchrow("SELECT status, attempts FROM deliveries WHERE event_id = $1", event_id)
    assert (row["status"], row["attempts"]) == ("dead", 0)
    entries = [v for _, v in await hs.outbox(pool) if getattr(v, "event_id", "") == event_id]
    assert [(e.code, e.last_error, e.attempts) for e in entries] == [
        ("DELIVERY_EXPIRED", "not attempted before the horizon", 0)]
    errors.lookup(entries[0].code)


async def test_local_mode_connects_to_the_checked_address_with_the_original_host_header(stores, offline):
    settings, pool, _ = stores
    local = settings.model_copy(update={"webhook_local_mode": True})
    view = ChannelView(local)
    async with RawReceiver() as receiver:
        url = f"http://receiver.example:{receiver.port}/hooks"
        # the socket-level stub would send this name elsewhere: only the dispatcher's resolver is used
        offline.answers["receiver.example"] = ["127.0.0.2"]
        resolver = StaticResolver({"receiver.example": ["127.0.0.1"]})
        channel = Channel(local, view, url)
        event_id = await schedule(pool, channel, url)
        await dispatch_until_attempted(pool, local, view, resolver, [event_id])
        shown, _ = await delivery_log(local, view, pool, channel, event_id)
        assert shown["status"] == "delivered", shown
        assert resolver.asked == ["receiver.example"]
        assert ("127.0.0.1", receiver.port) in offline.connects and ("127.0.0.2", receiver.port) not in offline.connects
        assert f"\r\nHost: receiver.example:{receiver.port}\r\n".encode() in receiver.requests[0]


async def test_errors_stored_before_the_fix_lose_the_targets_bytes_on_upgrade(stores):
    """Rows written by the earlier dispatcher quoted the target; the migration keeps code and status."""
    from services.kernel import migrations
    settings, pool, _ = stores
    view = ChannelView(settings)
    channel = Channel(settings, view, "https://shop.example/hooks")
    old = {f"WEBHOOK_REJECTED: HTTP 500: error: {MARKER}\nline two": "WEBHOOK_REJECTED: HTTP 500",
           f"WEBHOOK_UNREACHABLE: RemoteProtocolError: illegal status line: bytearray(b'SSH-2.0 {MARKER}')":
               "WEBHOOK_UNREACHABLE: the request failed (RemoteProtocolError)",
           "WEBHOOK_UNREACHABLE: connection refused": "WEBHOOK_UNREACHABLE: connection refused",      # today's
           "WEBHOOK_REJECTED: HTTP 503": "WEBHOOK_REJECTED: HTTP 503"}
    ids = {}
    for error in old:
        ids[error] = await schedule(pool, channel, "https://shop.example/hooks")
        await pool.execute("UPDATE deliveries SET last_error = $2, attempts = 1 WHERE event_id = $1", ids[error],
                           error)
        await pool.execute("INSERT INTO delivery_attempts (delivery_id, attempt, started_at, duration_ms, error, "
                           "outcome) SELECT delivery_id, 1, now(), 1, $2, 'failed' FROM deliveries "
                           "WHERE event_id = $1", ids[error], error)
    migration = next(p for p in migrations.files_for("notification") if "without_target_bytes" in p.name)
    async with pool.acquire() as conn:
        await conn.execute(migration.read_text())
        await conn.execute(migration.read_text())           # again: nothing more changes
    for error, expected in old.items():
        shown, raw = await delivery_log(settings, view, pool, channel, ids[error])
        assert shown["last_error"] == expected and shown["log"][0]["error"] == expected and MARKER not in raw


def _tls_files(tmp_path, name: str) -> tuple[str, str, str]:
    """A CA and a certificate for ``name`` signed by it (PEM paths: ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def cert(subject, issuer, key, signer, *, ca: bool, san: str | None = None):
        now = dt.datetime.now(dt.UTC)
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", "test CA", ca_key, ca_key, ca=True)
    leaf = cert(name, "test CA", leaf_key, ca_key, ca=False, san=name)
    paths = tmp_path / "ca.pem", tmp_path / "leaf.pem", tmp_path / "leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return tuple(str(p) for p in paths)


async def test_the_pinned_connection_still_verifies_the_certificate_for_the_url_host(tmp_path, monkeypatch, offline):
    """Connecting to the checked address must not weaken TLS: SNI and certificate check use the name."""
    import ssl

    from services.notification.targets import guarded_client
    from services.notification.webhook_sender import _unreachable
    ca, leaf, key = _tls_files(tmp_path, "hooks.example")
    monkeypatch.setenv("SSL_CERT_FILE", ca)
    server_names: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(leaf, key)
    server_ctx.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    receiver = RawReceiver()
    server = await asyncio.start_server(receiver._serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    resolver = StaticResolver({"hooks.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    try:
        async with guarded_client(resolver, local_mode=True, timeout=httpx.Timeout(5),
                                  limits=httpx.Limits(max_connections=2), headers={}) as client:
            r = await client.post(f"https://hooks.example:{port}/hooks", content=b"{}")
            assert r.status_code == 200 and server_names == ["hooks.example"]
            assert f"\r\nHost: hooks.example:{port}\r\n".encode() in receiver.requests[0]
            with pytest.raises(httpx.ConnectError) as caught:          # same address, a name the cert lacks
                await client.post(f"https://other.example:{port}/hooks", content=b"{}")
            assert _unreachable(caught.value) == "TLS certificate not valid for the host"
    finally:
        server.close()
    assert {host for host, p in offline.connects if p == port} == {"127.0.0.1"}
