"""The HTTP/1.1 protocol the platform's server speaks: httptools (llhttp, in C) with a bounded request head.

uvicorn parses requests with h11 (pure Python) unless told otherwise. In a surge the API process is the
limit (issue 12: one core at the spike), and h11's parsing and writing were a few per cent of it each.
httptools does the same work in C. It buffers a request head of any size, though: a client that sends
a 20 MB header gets it buffered, where h11 refused about 16 KiB beyond one read with a plain 400.
``BoundedHead`` counts the bytes of each request's head as they arrive and answers one that passes
``HEAD_LIMIT_BYTES`` with 431 ``REQUEST_HEAD_TOO_LARGE`` (the catalogue's JSON body,
``Connection: close``), then closes the connection: the rest is never read. A read counts when the
head began before it and is still unfinished after it (so every byte of it is head): a head under the
limit is never refused, and one over it is refused at most one read (up to 256 KiB) past it.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.kernel import errors, http, logs, metrics, tracing

log = logs.get(__name__)

HEAD_LIMIT_BYTES = 32 * 1024     # the request line and headers (nginx's default buffers: 4 x 8 KiB)
REFUSED_ROUTE = "request head"   # the route label of the refusals in bubuh_http_requests_total


class BoundedHead(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head over ``HEAD_LIMIT_BYTES``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = None     # of the unfinished head, counted so far; None: no head under way
        self._begun_in_read = False             # the head under way began in the read being parsed

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():          # refused (431, 400): what still arrives is dropped
            return
        self._begun_in_read = False
        super().data_received(data)
        # a read is counted only when the head began before it and is still unfinished after it: every
        # byte of it is then head (a read may also hold a body's end, or the next request's start)
        if self._head_bytes is None or self._begun_in_read or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > HEAD_LIMIT_BYTES:
            self._refuse_head()

    def on_message_begin(self) -> None:
        self._head_bytes, self._begun_in_read = 0, True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def _refuse_head(self) -> None:
        code = errors.REQUEST_HEAD_TOO_LARGE
        trace_id = tracing.new_trace_id()
        detail = f"the request head passed {HEAD_LIMIT_BYTES} bytes ({self._head_bytes} of it received)"
        body = orjson.dumps(http.error_body(code, detail, trace_id))
        self.transport.write(b"".join([
            f"HTTP/1.1 {code.http_status} Request Header Fields Too Large\r\n".encode(),
            b"content-type: application/json\r\n",
            f"content-length: {len(body)}\r\n".encode(),
            f"traceparent: {tracing.traceparent(trace_id)}\r\n".encode(),
            b"connection: close\r\n\r\n", body]))
        self.transport.close()
        metrics.HTTP_REQUESTS.labels(REFUSED_ROUTE, str(code.http_status)).inc()
        log.info("request head too large; closing", client=self.client and self.client[0],
                 received=self._head_bytes, limit=HEAD_LIMIT_BYTES, trace_id=trace_id)
