import threading

import pytest

from services.stamping import serial
from services.stamping.serial import CROCKFORD, SerialIssuer, is_valid, parse


def test_shape_and_validity():
    sn = SerialIssuer(7).next()
    assert len(sn) == 22
    assert sn[0] == "1"
    assert all(c in CROCKFORD for c in sn[:-1])
    assert is_valid(sn)
    assert parse(sn).node_id == 7


def test_unique_across_many_calls_and_two_nodes():
    a, b = SerialIssuer(1), SerialIssuer(2)
    issued = [a.next() for _ in range(50_000)] + [b.next() for _ in range(50_000)]
    assert len(set(issued)) == len(issued)
    assert all(is_valid(sn) for sn in issued[::997])


def test_unique_across_threads():
    issuer = SerialIssuer(3)
    out: list[str] = []
    lock = threading.Lock()

    def work():
        mine = [issuer.next() for _ in range(5_000)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 20_000


def test_same_node_id_different_instances_differ():
    # operator error (two processes with one node id): the instance salt keeps them apart
    a, b = SerialIssuer(5, salt=1), SerialIssuer(5, salt=2)
    assert {a.next() for _ in range(1000)}.isdisjoint({b.next() for _ in range(1000)})


def test_clock_going_back_does_not_repeat():
    now = [serial.EPOCH_MS * 1_000_000 + 10_000 * 1_000_000]
    issuer = SerialIssuer(9, clock=lambda: now[0])
    first = [issuer.next() for _ in range(3)]
    now[0] -= 5_000 * 1_000_000  # NTP steps back five seconds
    later = [issuer.next() for _ in range(3)]
    assert len(set(first + later)) == 6
    assert parse(later[-1]).issued_ms >= parse(first[-1]).issued_ms  # logical clock never goes back


def test_counter_exhaustion_borrows_next_millisecond():
    t = serial.EPOCH_MS * 1_000_000 + 42 * 1_000_000
    issuer = SerialIssuer(9, clock=lambda: t)
    issuer._counter = serial.MAX_COUNTER - 1
    issuer._last_ms = 42
    a, b = issuer.next(), issuer.next()
    assert parse(a).counter == serial.MAX_COUNTER and parse(a).issued_ms == serial.EPOCH_MS + 42
    assert parse(b).counter == 0 and parse(b).issued_ms == serial.EPOCH_MS + 43


def _samples(n=40):
    issuers = [SerialIssuer(i * 1000) for i in range(4)]
    return [issuers[i % 4].next() for i in range(n)]


def test_every_single_substitution_is_detected():
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for sn in _samples():
        for pos in range(len(sn)):
            for ch in alphabet:
                if ch != sn[pos]:
                    assert not is_valid(sn[:pos] + ch + sn[pos + 1:]), (sn, pos, ch)


def test_every_adjacent_transposition_is_detected():
    for sn in _samples():
        for pos in range(len(sn) - 1):
            if sn[pos] != sn[pos + 1]:
                swapped = sn[:pos] + sn[pos + 1] + sn[pos] + sn[pos + 2:]
                assert not is_valid(swapped), (sn, pos)


def test_check_char_detects_every_adjacent_transposition_in_every_state():
    # a one-symbol prefix reaches every one of the 32 interim states of the Damm algorithm
    suffix = "0123456789ABCDEFGH"
    for first in CROCKFORD:
        for a in CROCKFORD:
            for b in CROCKFORD:
                if a != b:
                    assert serial.check_char(first + a + b + suffix) != serial.check_char(first + b + a + suffix)


def test_transposition_of_last_char_and_check_char_is_detected():
    for sn in _samples():
        if sn[-2] != sn[-1]:
            assert not is_valid(sn[:-2] + sn[-1] + sn[-2])


@pytest.mark.parametrize("bad", ["", "1" * 21, "1" * 23, "2" + "0" * 21, "1" + "0" * 19 + "I0", None, 12])
def test_malformed_inputs_are_invalid(bad):
    assert not is_valid(bad)


def test_lowercase_is_not_canonical():
    sn = SerialIssuer(1).next()
    assert sn != sn.lower()  # the node/time fields always hold a letter or the salt does, in practice
    assert not is_valid(sn.lower())


def test_node_id_range():
    with pytest.raises(ValueError):
        SerialIssuer(serial.MAX_NODE + 1)
    with pytest.raises(ValueError):
        SerialIssuer(-1)
