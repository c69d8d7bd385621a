"""The signing process's RFC 3161 client (``tsa_client.py``) against a real responder on loopback:
one kept-alive connection, a reconnect when the server dropped it, and a clear error for each bad answer."""

from __future__ import annotations

import hashlib
import time

import pytest
from pyhanko.sign.timestamps.common_utils import TimestampRequestError

from services.kernel.errors import BubuhError
from services.stamping.signing.engine import SignerConfig, StampingEngine
from services.stamping.signing.request import StampRequest
from services.stamping.signing.tsa_client import MAX_RESPONSE_BYTES, TsaClient
from tests.timestamping import running_tsa


@pytest.fixture
def tsa():
    with running_tsa(keep_alive=True) as server:
        yield server


def _digest(i: int) -> bytes:
    return hashlib.sha256(b"stamp %d" % i).digest()


def test_many_time_stamps_share_one_connection_and_each_token_covers_its_digest(tsa):
    client = TsaClient(tsa.url)
    try:
        tokens = [client.timestamp(_digest(i), "sha256") for i in range(20)]
    finally:
        client.close()
    assert (client.connections, tsa.connections, tsa.requests) == (1, 1, 20)
    for i, token in enumerate(tokens):
        info = token["content"]["encap_content_info"]["content"].parsed
        assert info["message_imprint"]["hashed_message"].native == _digest(i)


def test_a_connection_the_server_dropped_is_reopened_once(tsa):
    client = TsaClient(tsa.url)
    try:
        client.timestamp(_digest(0), "sha256")
        tsa.fault = "drop"  # answers, then closes the kept-alive connection without a word
        client.timestamp(_digest(1), "sha256")
        tsa.fault = None
        client.timestamp(_digest(2), "sha256")
    finally:
        client.close()
    assert tsa.requests == 3
    assert client.connections == 2 == tsa.connections


def test_a_server_that_closes_after_each_answer_is_served_too():
    with running_tsa() as http10:  # HTTP/1.0: the server says it closes
        client = TsaClient(http10.url)
        try:
            for i in range(3):
                client.timestamp(_digest(i), "sha256")
        finally:
            client.close()
    assert client.connections == 3 == http10.requests


@pytest.mark.parametrize(("fault", "says"), [
    ("http-500", "HTTP 500"),
    ("html", "text/html, not application/timestamp-reply"),
    ("huge", f"over {MAX_RESPONSE_BYTES} bytes"),
    ("wrong-nonce", "nonce"),
])
def test_a_bad_answer_is_a_clear_time_stamp_error_and_the_next_request_works(tsa, fault, says):
    client = TsaClient(tsa.url)
    try:
        tsa.fault = fault
        with pytest.raises(TimestampRequestError, match=says):
            client.timestamp(_digest(0), "sha256")
        tsa.fault = None
        client.timestamp(_digest(1), "sha256")
    finally:
        client.close()


def test_a_silent_server_times_out_within_the_budget(tsa):
    client = TsaClient(tsa.url, timeout_s=0.5)
    tsa.fault = "silent"
    started = time.monotonic()
    try:
        with pytest.raises(TimestampRequestError, match="timed out|TimeoutError"):
            client.timestamp(_digest(0), "sha256")
    finally:
        client.close()
    assert time.monotonic() - started < 2.0


def test_the_engine_says_tsa_unavailable_for_a_bad_answer(dev_ca_rsa, tsa, a4_pdf):
    from services.stamping.serial import SerialIssuer

    eng = StampingEngine(SignerConfig(p12_path=str(dev_ca_rsa.p12_path), p12_password=dev_ca_rsa.password,
                                      tsa_url=tsa.url), "https://verify.bubuh.example")
    req = StampRequest(sn=SerialIssuer(82).next(), page=1, box=(380.0, 40.0, 560.0, 140.0), reason="x",
                       location="Jakarta")
    try:
        tsa.fault = "http-500"
        with pytest.raises(BubuhError) as info:
            eng.stamp(a4_pdf, req)
        assert info.value.code.code == "TSA_UNAVAILABLE" and info.value.code.retryable
        assert "HTTP 500" in info.value.detail
    finally:
        eng.close()


@pytest.mark.parametrize("url", ["ftp://tsa.example/", "127.0.0.1:18080/tsa", "http:///tsa"])
def test_an_unusable_url_is_refused_at_start(url):
    with pytest.raises(ValueError, match="time-stamp authority URL"):
        TsaClient(url)
