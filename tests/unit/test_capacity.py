"""docs/capacity.md and deploy/k8s follow from the committed measurements (loadtests/capacity.py)."""

from __future__ import annotations

import copy
import json

from loadtests import capacity


def _inputs() -> tuple[dict, dict]:
    return json.loads(capacity.SURGE.read_text()), json.loads(capacity.PIPELINE.read_text())


def test_the_manifests_keda_thresholds_and_ceilings_are_the_plans():
    assert capacity.differences(capacity.load()) == []


def test_the_document_shows_the_plan_of_the_committed_measurements():
    text = capacity.DOC.read_text()
    shown = text[text.index(capacity.BEGIN) + len(capacity.BEGIN):text.index(capacity.END)].strip()
    assert shown == capacity.markdown(capacity.load())


def test_the_plan_follows_the_measured_cpu():
    surge, pipeline = _inputs()
    base = capacity.plan(surge, pipeline)
    # stamping's per-pod rate is 60% of a core over its CPU ms per stamp (process plus signing children)
    row = base["rows"]["stamping"]
    assert row["per_pod_stamps_per_s"] == round(600 / row["ms_per_stamp"], 1)
    assert row["pods_at_spike"] >= row["pods_at_mean"] >= 2
    assert row["lag_threshold"] == int(round(row["per_pod_stamps_per_s"] * 10, -1))
    # every consumer tier fits in the partitions, with room for its ceiling
    for t in capacity.TIERS:
        assert base["max_replicas"][t.name] <= base["partitions"]
    # a stamping tier twice as costly needs about twice the pods, and the manifests would then differ
    costly = copy.deepcopy(surge)
    for run in costly["runs"]:
        for k in list(run["cpu_ms_per_stamp"]):
            if k.startswith("stamping-"):
                run["cpu_ms_per_stamp"][k] *= 2
    doubled = capacity.plan(costly, pipeline)["rows"]["stamping"]
    assert doubled["pods_at_spike"] >= 2 * row["pods_at_spike"] - 1
    assert any("stamping" in w for w in capacity.differences(capacity.plan(costly, pipeline)))


def test_a_stamping_pod_gets_the_signing_children_the_tsa_round_trip_needs():
    """A child is held for the TSA's round trip plus its signing, so a pod signs at most
    children / (round trip + signing) stamps a second; the plan gives it enough for its CPU-bound rate."""
    surge, pipeline = _inputs()
    row = capacity.plan(surge, pipeline)["rows"]["stamping"]
    children, rate = row["signing_children"], row["per_pod_stamps_per_s"]
    per_child = 1000 / (capacity.TSA_ROUND_TRIP_MS + row["signing_ms"])
    assert children * per_child >= rate > (children - 1) * per_child or children == 2
    assert row["takers"] == 2 * children
    # a TSA twice as far away needs about twice the children (each count is rounded up: 4.04 -> 5, 7.84 -> 8)
    assert capacity.signing_children(rate, row["signing_ms"], 2 * capacity.TSA_ROUND_TRIP_MS) >= 2 * (children - 1)
    assert capacity.signing_children(10, 5, 100) == 2          # never under the default pair
