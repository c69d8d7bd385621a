"""Limits before reading and budgets at intake (issue 11), against the platform's real uvicorn server.

A raw socket client controls the sending: it streams a 32 MB upload (chunked, or announced with
Content-Length) and watches for the answer while it sends. What the server took is what the client
sent minus what still sits in its own send queue (TIOCOUTQ), so the numbers do not depend on how
the server buffers. The limit of `POST /v1/stamps` and `POST /v1/verify` is 10 MB plus 64 KB.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import select
import socket
import struct
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from loadtests import corpus
from tests.flows import auth, buy, post_stamp, stamp_meta

UPLOAD = 32 * 1024 * 1024
# what may reach the server's side beyond the point where it decides: uvicorn reads ahead 64 KiB and
# the server's kernel buffers some more, which loopback autotuning grows while the app reads fast.
# What the platform itself read is in its log ("body refused at its limit": received).
MARGIN = 2 * 1024 * 1024          # kernel and uvicorn, when the app has read nothing
STREAM_MARGIN = 8 * 1024 * 1024   # the same after the app read at full speed up to the limit
# past its limit the app has read the rest of the chunk that crossed it: uvicorn hands over what it
# buffered, and it stops reading only once that passes 64 KiB, in reads of up to 256 KiB (asyncio)
APP_MARGIN = 64 * 1024 + 256 * 1024
BOUNDARY = b"bubuhlimits"

pytestmark = pytest.mark.shared_platform   # one platform for the module; every test has its own channel


@dataclass
class Outcome:
    status: int | None
    headers: dict[str, str]
    body: bytes
    sent: int          # body bytes the client handed to its kernel
    delivered: int     # of those, what the server side took (the rest was still queued at the client)
    seconds: float     # from the end of the request head to the answer

    @property
    def code(self) -> str | None:
        with contextlib.suppress(ValueError):
            return json.loads(self.body)["code"]
        return None


def _unsent(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def _multipart_head(meta: dict | None) -> bytes:
    out = b""
    if meta is not None:
        out += (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="meta"\r\n\r\n'
                + json.dumps(meta).encode() + b"\r\n")
    return out + (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="big.pdf"\r\n'
                  b"Content-Type: application/pdf\r\n\r\n%PDF-1.7\n")


def _zeros(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    block = bytes(size)
    while total > 0:
        yield block[:min(size, total)]
        total -= size


def _chunked(parts: Iterator[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield b"%x\r\n" % len(part) + part + b"\r\n"
    yield b"0\r\n\r\n"


def _request(port: int, path: str, headers: dict[str, str], body: Iterator[bytes], timeout: float = 60) -> Outcome:
    """Send the head, then the body while watching for an answer; stop sending once one arrives."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)   # the client's queue stays small
    sock.connect(("127.0.0.1", port))
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    sock.setblocking(False)
    started = time.monotonic()
    sent = delivered = 0
    pending = b""
    answered = False
    try:
        while not answered and time.monotonic() - started < timeout:
            if not pending:
                pending = next(body, b"")
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 1.0)
            delivered = sent - _unsent(sock)
            if readable:
                answered = True
                break
            if writable and pending:
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    answered = True   # the server closed: its answer, if any, is in our receive queue
                    break
                sent += n
                pending = pending[n:]
        seconds = time.monotonic() - started
        sock.setblocking(True)
        sock.settimeout(timeout)
        raw = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while b"\r\n\r\n" not in raw or len(raw) < _expected_length(raw):
                data = sock.recv(65536)
                if not data:
                    break
                raw += data
    finally:
        sock.close()
    return _parse(raw, sent, delivered, seconds)


def _expected_length(raw: bytes) -> int:
    head, _, _ = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(raw) + 1


def _parse(raw: bytes, sent: int, delivered: int, seconds: float) -> Outcome:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else None
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Outcome(status, headers, body, sent, delivered, seconds)


def _multipart_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={BOUNDARY.decode()}", **(extra or {})}


async def _known(api, channel) -> None:
    """A brand-new channel takes a moment to reach the platform's channel view."""
    await buy(api, channel, "limits", 1)


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(platform, api, settings, channel):
    cases = (("/v1/stamps", _multipart_headers(), _multipart_head(stamp_meta("limits"))),
             ("/v1/purchases", {"Content-Type": "application/json"}, b'{"channel_order_id": "'))
    for path, ctype, head in cases:
        seen = len(platform.log_records())    # the module's tests share the platform and its log
        out = await asyncio.to_thread(
            _request, settings.http_port, path, ctype | {"Transfer-Encoding": "chunked"},
            _chunked(itertools.chain([head], _zeros(UPLOAD))))
        print(f"{path} chunked, no key: {out.status} after {out.delivered} bytes, {out.seconds:.3f} s")
        assert (out.status, out.code) == (401, "UNAUTHENTICATED"), (path, out)
        assert out.headers.get("connection") == "close", (path, out.headers)
        assert out.delivered < MARGIN, f"{path}: the server took {out.delivered} bytes before its 401"
        (early,) = [r for r in platform.log_records()[seen:] if r.get("event") == "answered before the body; closing"
                    and r.get("path") == path]
        assert early["received"] == 0, early   # the route never read a byte of it
    # a wrong key is no different from none, with a Content-Length within the limit too
    # (above it, the size is refused first: 413 before any byte of the body, see below)
    size = 8 * 1024 * 1024
    out = await asyncio.to_thread(
        _request, settings.http_port, "/v1/stamps",
        _multipart_headers({"Authorization": "Bearer not-a-key", "Content-Length": str(size)}),
        itertools.chain([_multipart_head(stamp_meta("limits"))], _zeros(size)))
    assert (out.status, out.code) == (401, "UNAUTHENTICATED") and out.delivered < MARGIN, out
    # a small body is read and dropped instead: the connection stays open for the next request
    r = await api.post("/v1/purchases", json={"channel_order_id": "x" * 2000})
    assert r.status_code == 401 and r.headers.get("connection") != "close", r.headers
    assert (await api.get("/healthz")).status_code == 200


async def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(platform, api, settings, channel):
    await _known(api, channel)
    key = auth(channel)
    cases = [
        ("/v1/stamps", _multipart_headers(key), UPLOAD, "PDF_TOO_LARGE"),
        ("/v1/verify", _multipart_headers(), UPLOAD, "PDF_TOO_LARGE"),
        ("/v1/purchases", {"Content-Type": "application/json"} | key, settings.purchase_max_body_bytes + 1,
         "BODY_TOO_LARGE"),
    ]
    for path, headers, length, code in cases:
        # headers only; Expect: 100-continue as curl sends it: the server must not ask for the body
        out = await asyncio.to_thread(
            _request, settings.http_port, path, headers | {"Content-Length": str(length), "Expect": "100-continue"},
            iter(()), 10)
        print(f"{path} Content-Length {length}: {out.status} after {out.sent} bytes, {out.seconds:.3f} s")
        assert (out.status, out.code) == (413, code), (path, out)
        assert out.headers.get("connection") == "close" and out.sent == 0 and out.seconds < 2, (path, out)


async def test_a_streamed_body_is_cut_at_the_limit_and_memory_stays_flat(platform, api, settings, channel):
    await _known(api, channel)
    limit = settings.stamp_max_body_bytes
    rss_before = _rss_kib(platform.proc.pid)
    cases = [
        ("/v1/stamps", _multipart_headers(auth(channel)), _multipart_head(stamp_meta("limits"))),
        ("/v1/verify", _multipart_headers(), _multipart_head(None)),
    ]
    for path, headers, head in cases:
        seen = len(platform.log_records())
        out = await asyncio.to_thread(
            _request, settings.http_port, path, headers | {"Transfer-Encoding": "chunked"},
            _chunked(itertools.chain([head], _zeros(UPLOAD))))
        print(f"{path} chunked, {UPLOAD} bytes: {out.status} after {out.delivered} bytes (limit {limit}), "
              f"{out.seconds:.3f} s")
        assert (out.status, out.code) == (413, "PDF_TOO_LARGE"), (path, out)
        assert out.headers.get("connection") == "close", out.headers
        assert limit < out.delivered <= limit + STREAM_MARGIN and out.sent < UPLOAD, \
            f"{path}: the server took {out.delivered} bytes"
        (refusal,) = [r for r in platform.log_records()[seen:] if r.get("event") == "body refused at its limit"
                      and r.get("path") == path]
        print(f"  the platform read {refusal['received']} bytes of it")
        assert limit < refusal["received"] <= limit + APP_MARGIN, refusal
    grown_kib = _rss_kib(platform.proc.pid) - rss_before
    print(f"platform RSS {rss_before} KiB before, grew by {grown_kib} KiB")
    assert grown_kib * 1024 < UPLOAD // 4, f"the platform's RSS grew by {grown_kib} KiB"
    # the purchase route's limit holds for a chunked body too
    out = await asyncio.to_thread(
        _request, settings.http_port, "/v1/purchases",
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"} | auth(channel),
        _chunked(itertools.chain([b'{"x": "'], _zeros(UPLOAD))))
    assert (out.status, out.code) == (413, "BODY_TOO_LARGE"), out
    assert out.delivered <= settings.purchase_max_body_bytes + STREAM_MARGIN


async def test_uploads_within_the_limits_still_work(platform, api, settings, channel):
    await _known(api, channel)
    r = await post_stamp(api, channel, corpus.a4_text(2), stamp_meta("limits"))
    assert r.status_code == 202, r.text
    # chunked within the limit, from the raw client as well
    pdf = corpus.a4_text(3)
    head = _multipart_head(stamp_meta("limits"))[:-len(b"%PDF-1.7\n")]
    out = await asyncio.to_thread(
        _request, settings.http_port, "/v1/stamps",
        _multipart_headers(auth(channel)) | {"Transfer-Encoding": "chunked"},
        _chunked(iter([head, pdf, b"\r\n--" + BOUNDARY + b"--\r\n"])))
    assert out.status == 202, out
    r = await api.post("/v1/verify", files={"file": ("x.pdf", pdf, "application/pdf")})
    assert r.status_code == 200 and r.json()["valid"] is False, r.text
    r = await api.post("/v1/stamps", headers=auth(channel), files={"file": ("x.pdf", pdf, "application/pdf")})
    assert (r.status_code, r.json()["code"]) == (422, "BODY_INVALID"), r.text


async def test_a_decompression_bomb_is_refused_at_intake_within_budget(platform, api, settings, channel):
    await _known(api, channel)
    bomb = await asyncio.to_thread(corpus.inflating, 600 * 1024 * 1024, where="object-stream")
    rss_before = _rss_kib(platform.proc.pid)
    started = time.monotonic()
    r = await post_stamp(api, channel, bomb, stamp_meta("limits"))
    seconds = time.monotonic() - started
    grown_kib = _rss_kib(platform.proc.pid) - rss_before
    print(f"{len(bomb)}-byte upload inflating to 600 MB: {r.status_code} {r.json()['code']} in {seconds:.3f} s, "
          f"RSS grew by {grown_kib} KiB")
    assert (r.status_code, r.json()["code"]) == (422, "PDF_TOO_COMPLEX"), r.text
    assert seconds < 5 and grown_kib < 64 * 1024, (seconds, grown_kib)
    r = await post_stamp(api, channel, corpus.scan_800k(1), stamp_meta("limits", profile="cpns"))
    assert r.status_code == 202, r.text
