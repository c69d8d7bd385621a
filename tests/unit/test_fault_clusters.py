"""The chaos tests find their PostgreSQL cluster with ``pg_lsclusters``, which fails as a whole while another
test's cluster is half made or half dropped (the outside CI of 5 December): the read is tried again."""

from __future__ import annotations

import subprocess

import pytest

from tests import faults

LISTED = '[{"version": "15", "cluster": "bubuh", "port": 15432}]'


def _answers(*codes: int):
    calls = []

    def run(cmd, timeout=60, check=True, stdin=None):
        code = codes[min(len(calls), len(codes) - 1)]
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, code, stdout=LISTED if code == 0 else "",
                                           stderr="Use of uninitialized value $data_directory")
    return run, calls


def test_a_cluster_being_made_elsewhere_fails_one_read_not_the_test(monkeypatch):
    run, calls = _answers(1, 1, 0)
    monkeypatch.setattr(faults, "_run", run)
    monkeypatch.setattr(faults.time, "sleep", lambda s: None)
    assert faults.clusters() == [{"version": "15", "cluster": "bubuh", "port": 15432}]
    assert len(calls) == 3


def test_a_listing_that_keeps_failing_is_reported(monkeypatch):
    run, calls = _answers(1)
    monkeypatch.setattr(faults, "_run", run)
    monkeypatch.setattr(faults.time, "sleep", lambda s: None)
    with pytest.raises(faults.FaultError, match="uninitialized value"):
        faults.clusters(attempts=3)
    assert len(calls) == 3
