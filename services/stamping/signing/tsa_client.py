"""The RFC 3161 time-stamp client of a signing process: synchronous, one kept-alive connection.

Why not pyHanko's ``HTTPTimeStamper``: it is asyncio + aiohttp, and the engine signs one document
at a time on a thread with no other I/O. Per stamp that meant starting an event loop turn, an
aiohttp request object, its header machinery and callbacks: about as much CPU as the rest of
B-LT's extra work together (``make surge``'s B-LT/B-B ratio, README "How it got here"). This is
pyHanko's ``TimeStamper`` (the request it builds, with its nonce, and ``handle_tsp_response``,
which checks the status and the nonce) with the HTTP done by the standard library's
``http.client`` on one connection that stays open between stamps.

Failures are ``TimestampRequestError`` or ``OSError`` (the engine makes both ``TSA_UNAVAILABLE``,
retried on the durable path). A kept-alive connection the server has closed since the last stamp
is reopened once; a second failure is the TSA's. An answer over ``MAX_RESPONSE_BYTES``, with a
status other than 200 or another content type is refused without being parsed.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.parse

from asn1crypto import tsp
from pyhanko.sign.timestamps.api import TimeStamper
from pyhanko.sign.timestamps.common_utils import TimestampRequestError, handle_tsp_response, set_tsp_headers

MAX_RESPONSE_BYTES = 1 << 20  # a token with its certificates is a few KB; a megabyte is a broken server
REPLY_TYPE = "application/timestamp-reply"


class TsaClient(TimeStamper):
    """``timestamp()`` for the engine; ``async_request_tsa_response`` for pyHanko (B-LTA's document time-stamp)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        super().__init__()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"time-stamp authority URL {url!r}: expected http(s)://host[:port]/path")
        self.url = url
        self.timeout_s = timeout_s
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self._headers = set_tsp_headers({"Connection": "keep-alive"})
        self._conn: http.client.HTTPConnection | None = None
        self.connections = 0  # opened so far (tests read it: keep-alive holds)

    # -- what the engine calls --------------------------------------------------------------

    def timestamp(self, message_digest: bytes, md_algorithm: str):
        """The time-stamp token (a CMS ``ContentInfo``) over ``message_digest``."""
        nonce, req = self.request_cms(message_digest, md_algorithm)
        resp = self.request_tsa_response(req)
        if nonce is not None and resp["status"]["status"].native == "granted":
            # pyHanko checks this too, but its message for a mismatch fails to format (an int has no .hex())
            got = resp["time_stamp_token"]["content"]["encap_content_info"]["content"].parsed["nonce"].native
            if got != nonce:
                raise TimestampRequestError(f"time-stamp authority answered nonce {got}, not ours ({nonce})")
        return handle_tsp_response(resp, nonce)

    def request_tsa_response(self, req: tsp.TimeStampReq) -> tsp.TimeStampResp:
        body = req.dump()
        reused = self._conn is not None
        try:
            raw = self._post(body)
        except (OSError, http.client.HTTPException) as exc:
            if not (reused and isinstance(exc, (ConnectionError, http.client.BadStatusLine))):
                raise self._failed(exc) from exc
            raw = self._post_fresh(body)  # the server closed our idle connection: once more, on a new one
        try:
            return tsp.TimeStampResp.load(raw)
        except ValueError as exc:
            raise TimestampRequestError(f"time-stamp authority sent an unreadable answer: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- pyHanko's interface (PdfTimeStamper for B-LTA, certificate discovery) ---------------

    async def async_request_tsa_response(self, req: tsp.TimeStampReq) -> tsp.TimeStampResp:
        return self.request_tsa_response(req)

    # -- HTTP --------------------------------------------------------------------------------

    def _post_fresh(self, body: bytes) -> bytes:
        self.close()
        try:
            return self._post(body)
        except (OSError, http.client.HTTPException) as exc:
            raise self._failed(exc) from exc

    def _post(self, body: bytes) -> bytes:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        try:
            conn.request("POST", self._path, body=body, headers=self._headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_RESPONSE_BYTES + 1)
        except BaseException:
            self.close()
            raise
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        if resp.will_close or len(raw) > MAX_RESPONSE_BYTES:
            self.close()
        if resp.status != 200:
            raise TimestampRequestError(f"time-stamp authority answered HTTP {resp.status} {resp.reason}")
        if ctype != REPLY_TYPE:
            raise TimestampRequestError(f"time-stamp authority answered {ctype or 'no content type'}, "
                                        f"not {REPLY_TYPE}")
        if len(raw) > MAX_RESPONSE_BYTES:
            raise TimestampRequestError(f"time-stamp authority's answer is over {MAX_RESPONSE_BYTES} bytes")
        return raw

    def _connect(self) -> http.client.HTTPConnection:
        self.connections += 1
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)

    def _failed(self, exc: BaseException) -> TimestampRequestError:
        return TimestampRequestError(f"time-stamp authority {self.url}: {type(exc).__name__}: {exc}")
