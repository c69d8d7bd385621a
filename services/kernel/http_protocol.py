"""The HTTP/1.1 protocol the platform's server speaks: httptools (llhttp, in C) with a bounded request head.

uvicorn parses requests with h11 (pure Python) unless told otherwise. In a surge the API process is the
limit (issue 12: one core at the spike), and h11's parsing and writing were a few per cent of it each.
httptools does the same work in C. It buffers a request head of any size, though: a client that sends
a 20 MB header gets it buffered, where h11 refused about 16 KiB beyond one read with a plain 400.
``BoundedHead`` counts the bytes of each request's head as they arrive and answers one that passes
``HEAD_LIMIT_BYTES`` with 431 ``REQUEST_HEAD_TOO_LARGE`` (the catalogue's JSON body,
``Connection: close``), then closes the connection: the rest is never read. The count starts with the
read after the one in which a request begins, so a head is refused at most one read (up to 256 KiB)
past the limit; a well-formed head is never refused under it.
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.kernel import errors, logs, metrics, tracing

log = logs.get(__name__)

HEAD_LIMIT_BYTES = 32 * 1024     # the request line and headers (nginx's default buffers: 4 x 8 KiB)
REFUSED_ROUTE = "request head"   # the route label of the refusals in bubuh_http_requests_total


class BoundedHead(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head over ``HEAD_LIMIT_BYTES``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True          # between a request's first byte and the end of its headers
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():     # refused below: what still arrives is dropped
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_LIMIT_BYTES:
                self._refuse_head()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes = True, 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _refuse_head(self) -> None:
        code = errors.REQUEST_HEAD_TOO_LARGE
        trace_id = tracing.new_trace_id()
        detail = f"the request head passed {HEAD_LIMIT_BYTES} bytes ({self._head_bytes} received)"
        body = orjson.dumps({"code": code.code, "message": code.meaning, "detail": detail, "trace_id": trace_id})
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
