"""Pure pieces of the kernel: envelopes, trace ids, sealed secrets, HMAC, backoff."""

from __future__ import annotations

import random

import pytest
from cryptography.exceptions import InvalidTag

from services.contracts.bubuh.v1 import quota_pb2
from services.kernel import errors, events, retry, sealed, signatures, tracing


def test_envelope_round_trip_keeps_ids_type_and_payload():
    msg = quota_pb2.QuotaCredited(channel_id="c", account_id="a", purchase_id="p", quantity=3)
    env = events.envelope(msg, producer="quota", causation_id="cause", trace_id="ab" * 16)
    rec = events.outgoing("quota.events", "c/a", env)
    got_env, got = events.decode(rec.value)
    assert got == msg and got_env.type == "bubuh.v1.QuotaCredited" and got_env.causation_id == "cause"
    headers = dict(rec.headers)
    assert headers["bubuh-event-id"].decode() == env.event_id
    assert tracing.parse_traceparent(headers["traceparent"].decode()) == "ab" * 16


@pytest.mark.parametrize("value, code", [
    (b"", "EVENT_MALFORMED"),
    (b"\xff\xff\xff", "EVENT_MALFORMED"),
    (events.envelope(quota_pb2.Balance(), producer="x").SerializeToString().replace(b"bubuh.v1.Balance",
                                                                                    b"bubuh.v1.Nopeeee"),
     "EVENT_TYPE_UNKNOWN"),
])
def test_bad_records_get_catalogued_codes(value, code):
    with pytest.raises(errors.BubuhError) as exc:
        events.decode(value)
    assert exc.value.code.code == code


def test_traceparent_parsing_rejects_malformed_and_zero_ids():
    assert tracing.parse_traceparent("00-" + "1" * 32 + "-" + "2" * 16 + "-01") == "1" * 32
    assert tracing.parse_traceparent("00-" + "0" * 32 + "-" + "2" * 16 + "-01") is None
    assert tracing.parse_traceparent("garbage") is None
    assert tracing.parse_traceparent(None) is None


def test_sealed_secret_is_bound_to_its_channel():
    key = bytes(range(32))
    box = sealed.seal(key, b"secret", b"ch_1")
    assert sealed.unseal(key, box, b"ch_1") == b"secret"
    with pytest.raises(InvalidTag):
        sealed.unseal(key, box, b"ch_2")


def test_hmac_matches_any_accepted_secret_only():
    data = b"payload"
    sig = signatures.hmac_hex(b"new", data)
    assert signatures.matches([b"old", b"new"], data, sig)
    assert not signatures.matches([b"old"], data, sig)
    assert not signatures.matches([b"new"], data + b"x", sig)


def test_backoff_grows_and_is_capped():
    b = retry.Backoff(base_s=1, factor=2, max_s=30)
    rng = random.Random(7)
    delays = [b.delay(n, rng) for n in range(1, 9)]
    ceilings = [min(30, 2 ** (n - 1)) for n in range(1, 9)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert delays[3] > delays[0]
    assert retry.Backoff(base_s=1, jitter=False).delay(4) == 8


def test_error_catalogue_codes_are_unique_and_documented():
    codes = [e.code for e in errors.catalogue()]
    assert len(codes) == len(set(codes))
    assert all(e.meaning and e.action for e in errors.catalogue())
    # an error is a 4xx/5xx; a verification verdict is the `code` of a successful (200) answer
    assert all(400 <= e.http_status < 600 for e in errors.catalogue() if e not in errors.VERIFICATION_VERDICTS)
    assert all(e.http_status == 200 for e in errors.VERIFICATION_VERDICTS)


def test_every_catalogued_constant_is_named_after_its_code():
    named = {name: value for name, value in vars(errors).items() if isinstance(value, errors.ErrorCode)}
    assert all(name == value.code for name, value in named.items()), \
        [(n, v.code) for n, v in named.items() if n != v.code]
    assert {v.code for v in named.values()} == {e.code for e in errors.catalogue()}


def test_a_gauge_snapshot_reads_zero_for_label_sets_that_went_away():
    """A drained queue reads 0, not its last non-zero value (services/kernel/metrics.py set_snapshot)."""
    from prometheus_client import CollectorRegistry, Gauge

    from services.kernel.metrics import set_snapshot
    registry = CollectorRegistry()
    gauge = Gauge("t_open_requests", "test", ["channel"], registry=registry)
    shown: set[tuple[str, ...]] = set()
    set_snapshot(gauge, {("ch_a",): 3, ("ch_b",): 1}, shown)
    set_snapshot(gauge, {("ch_b",): 2}, shown)
    assert registry.get_sample_value("t_open_requests", {"channel": "ch_a"}) == 0
    assert registry.get_sample_value("t_open_requests", {"channel": "ch_b"}) == 2
    set_snapshot(gauge, {}, shown)
    assert registry.get_sample_value("t_open_requests", {"channel": "ch_b"}) == 0
