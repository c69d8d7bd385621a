"""Capacity for a national peak, derived from measured CPU per stamp and per purchase.

Inputs (both written by this repository's benchmarks, on this box):
- ``loadtests/results/surge-tiers.json``: ``make surge-tiers``, the surge at B-LT with one process
  per tier (``BUBUH_LOCAL_LAYOUT=tiers``), so each tier's CPU ms per stamp is its own;
- ``loadtests/results/pipeline.json``: ``make bench``, CPU ms per purchase of the purchase, quota
  and notification tiers (credits, webhooks) at 2,000 purchases/s.

The arithmetic, per tier: cores = rate x CPU ms per unit / 1000; pods = cores / (one core per pod x
the utilisation we plan for), rounded up, never under the tier's minimum; a spike's pods use the
spike rate. Partitions: every consumer tier's spike pods must each own a partition (an extra
consumer sits idle), with room to grow. KEDA's lag threshold: KEDA runs ceil(lag / threshold)
pods, so threshold = what one pod drains in the tier's drain target: a backlog of that size per pod
is cleared within the target by the pods it calls up.

``python -m loadtests.capacity`` rewrites the table between the markers in ``docs/capacity.md``;
``--check`` fails when the deploy manifests' KEDA thresholds or ceilings differ from it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SURGE = ROOT / "loadtests" / "results" / "surge-tiers.json"
PIPELINE = ROOT / "loadtests" / "results" / "pipeline.json"
DOC = ROOT / "docs" / "capacity.md"
K8S = ROOT / "deploy" / "k8s"
BEGIN, END = "<!-- capacity:begin (python -m loadtests.capacity writes this) -->", "<!-- capacity:end -->"

PEAK_STAMPS = 1_000_000          # in one hour: the national peak to plan for
PEAK_SECONDS = 3600
SPIKE = 3                        # a spike at 3x the hour's mean (issue 12's spike), for minutes
PURCHASES_PER_STAMP = 1.0        # worst case: every applicant buys the one stamp they need
UTILISATION = 0.6                # plan each core at 60%: headroom for GC, rebalances, a lost pod
PARTITION_HEADROOM = 2           # partitions = 2 x the spike's largest consumer tier, rounded up to 12s
# The TSA's round trip from a stamping pod, which our CPU figures cannot see (the local TSA is on the box):
# a TSA in another data centre. Every B-T-and-above stamp waits it out in a signing child, so it decides how
# many children a pod needs. Measure yours (`curl -w '%{time_total}'` against the TSA) and plan with it.
TSA_ROUND_TRIP_MS = 100.0
TAKERS_PER_CHILD = 2             # BUBUH_STAMPING_CONCURRENCY: one stamp signing and one ready, per child


@dataclass(frozen=True)
class Tier:
    name: str                    # as in deploy/k8s (<name>.yaml) and the consumer groups
    consumer_group: str | None   # what KEDA watches; None: the API (an HPA on CPU)
    drain_s: float               # a backlog per pod of `threshold` clears within this
    min_pods: int


TIERS = (
    Tier("api", None, 0, 3),
    Tier("purchase", "purchase.confirmation", 30, 2),
    Tier("quota", "quota.ledger", 5, 2),
    Tier("stamping", "stamping.worker", 10, 2),
    Tier("notification", "notification.intake", 30, 2),
)


def _median_run(surge: dict) -> dict:
    runs = sorted(surge["runs"], key=lambda r: r["stamps_per_s_end_to_end"] or 0)
    return runs[len(runs) // 2]


def signing_ms(surge: dict) -> float:
    """CPU ms per stamp in the stamping tier's signing children (the sandboxes), median run."""
    cpu = _median_run(surge)["cpu_ms_per_stamp"]
    return sum(v for k, v in cpu.items() if re.match(r"stamping(-\d+)? sandboxes$", k))


def signing_children(per_pod: float, sign_ms: float, round_trip_ms: float = TSA_ROUND_TRIP_MS) -> int:
    """Children one stamping pod needs to sign ``per_pod`` stamps/s when each stamp holds a child for the
    TSA's round trip plus its own signing: a pod signs at most children / (round trip + signing) a second."""
    return max(2, math.ceil(per_pod * (round_trip_ms + sign_ms) / 1000))


def measured(surge: dict, pipeline: dict) -> dict[str, dict[str, float]]:
    """CPU ms per stamp and per purchase of each tier (the stamping tier with its signing children)."""
    cpu = _median_run(surge)["cpu_ms_per_stamp"]

    def of(prefix: str) -> float:
        return sum(v for k, v in cpu.items() if k.startswith(prefix + " ") or re.match(rf"{prefix}-\d+ ", k))

    per_purchase = pipeline["runs"][pipeline["pipeline"]["median_run"] - 1]["cpu"]["per_process_cpu_ms_per_purchase"]
    return {
        "api": {"stamp": of("api"), "purchase": 0.0},
        "purchase": {"stamp": of("purchase"), "purchase": per_purchase["purchase"]},
        "quota": {"stamp": of("quota"), "purchase": per_purchase["quota"]},
        "stamping": {"stamp": of("stamping"), "purchase": 0.0},
        "notification": {"stamp": of("notification"), "purchase": per_purchase["notification"]},
        "postgres": {"stamp": cpu.get("postgres", 0.0), "purchase": per_purchase["postgres (whole server)"]},
        "kafka": {"stamp": cpu.get("kafka", 0.0), "purchase": per_purchase["kafka (whole server)"]},
    }


def plan(surge: dict, pipeline: dict) -> dict:
    rate = PEAK_STAMPS / PEAK_SECONDS
    costs = measured(surge, pipeline)
    rows = {}
    for name, c in costs.items():
        ms = c["stamp"] + PURCHASES_PER_STAMP * c["purchase"]
        cores = rate * ms / 1000
        tier = next((t for t in TIERS if t.name == name), None)
        row = {"ms_per_stamp": round(ms, 2), "cores_at_mean": round(cores, 2),
               "cores_at_spike": round(SPIKE * cores, 2)}
        if tier is not None:
            per_pod = 1000 * UTILISATION / ms if ms else math.inf       # stamps/s one pod takes at plan load
            row.update(per_pod_stamps_per_s=round(per_pod, 1),
                       pods_at_mean=max(tier.min_pods, math.ceil(rate / per_pod)),
                       pods_at_spike=max(tier.min_pods, math.ceil(SPIKE * rate / per_pod)))
            if tier.consumer_group:
                row["lag_threshold"] = max(10, int(round(per_pod * tier.drain_s, -1)))
                row["drain_s"] = tier.drain_s
        rows[name] = row
    sign = signing_ms(surge)
    children = signing_children(rows["stamping"]["per_pod_stamps_per_s"], sign)
    rows["stamping"].update(signing_ms=round(sign, 1), signing_children=children,
                            takers=TAKERS_PER_CHILD * children)
    spike_consumers = max(rows[t.name]["pods_at_spike"] for t in TIERS if t.consumer_group)
    partitions = 12 * math.ceil(PARTITION_HEADROOM * spike_consumers / 12)
    return {"rate": rate, "rows": rows, "partitions": partitions,
            "max_replicas": {t.name: min(partitions, 2 * rows[t.name]["pods_at_spike"]) for t in TIERS},
            "surge_run": {k: surge.get(k) for k in ("generated_at", "pinned", "machine")},
            "pipeline_run": pipeline.get("generated_at")}


def markdown(p: dict) -> str:
    out = [f"Derived {p['surge_run']['generated_at'] or '?'} from `loadtests/results/surge-tiers.json` (median "
           f"run) and `loadtests/results/pipeline.json` ({p['pipeline_run'] or '?'}). Peak: "
           f"{PEAK_STAMPS:,} stamps in {PEAK_SECONDS // 60} minutes = **{p['rate']:.0f} stamps/s**, "
           f"{PURCHASES_PER_STAMP:g} purchase per stamp, spikes at {SPIKE}x; cores planned at "
           f"{UTILISATION:.0%}, one core per pod.", "",
           "| tier | CPU ms per stamp (with its purchase) | cores at the mean | cores at a spike | stamps/s per pod "
           "| pods at the mean | pods at a spike | KEDA lagThreshold (drain target) | maxReplicaCount |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in p["rows"].items():
        lag = f"{r['lag_threshold']} ({r['drain_s']:g} s)" if "lag_threshold" in r else \
            ("HPA on CPU" if name == "api" else "")
        cells = [name, f"{r['ms_per_stamp']:.1f}", f"{r['cores_at_mean']:.1f}", f"{r['cores_at_spike']:.1f}",
                 r.get("per_pod_stamps_per_s", ""), r.get("pods_at_mean", ""), r.get("pods_at_spike", ""), lag,
                 p["max_replicas"].get(name, "")]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    configured = manifests().get("partitions", {}).get("max")
    out += ["", f"Partitions per topic: at least **{p['partitions']}** (2 x the largest consumer tier at a spike, "
            f"rounded up to a multiple of 12); `deploy/k8s/config.yaml` gives every topic {configured}."]
    st = p["rows"]["stamping"]
    default_rate = 2 * 1000 / (TSA_ROUND_TRIP_MS + st["signing_ms"])
    out += ["", f"Signing children per stamping pod: **{st['signing_children']}** (`BUBUH_SIGNING_PROCESSES`, with "
            f"`BUBUH_STAMPING_CONCURRENCY` {st['takers']}, in `deploy/k8s/config.yaml`'s `bubuh-signing`). Each "
            f"stamp holds a child for the TSA's round trip ({TSA_ROUND_TRIP_MS:g} ms planned) plus its signing "
            f"({st['signing_ms']:.1f} ms of CPU), so a pod signs at most children / (round trip + signing) stamps "
            f"a second: {st['signing_children']} keep up with the pod's {st['per_pod_stamps_per_s']} stamps/s; the "
            f"default 2 would cap it at {default_rate:.1f}."]
    return "\n".join(out)


def manifests() -> dict[str, dict]:
    """By tier: each KEDA ScaledObject's triggers (group -> lagThreshold) and maxReplicaCount, the API
    HPA's maxReplicas; and the partitions every topic gets (``partitions``)."""
    out: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "ScaledObject":
                spec = doc["spec"]
                out[path.stem] = {"max": spec["maxReplicaCount"],
                                  "lag": {t["metadata"]["consumerGroup"]: int(t["metadata"]["lagThreshold"])
                                          for t in spec["triggers"] if t["type"] == "kafka"}}
            elif doc.get("kind") == "HorizontalPodAutoscaler":
                out[path.stem] = {"max": doc["spec"]["maxReplicas"], "lag": {}}
            elif doc.get("kind") == "ConfigMap" and "BUBUH_DEFAULT_PARTITIONS" in doc.get("data", {}):
                out["partitions"] = {"max": int(doc["data"]["BUBUH_DEFAULT_PARTITIONS"]), "lag": {}}
            elif doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "bubuh-signing":
                data = doc.get("data", {})
                out["signing"] = {"children": int(data.get("BUBUH_SIGNING_PROCESSES", 2)),
                                  "takers": int(data.get("BUBUH_STAMPING_CONCURRENCY", 4))}
    return out


def differences(p: dict) -> list[str]:
    """Where deploy/k8s departs from the plan: thresholds and ceilings must be the plan's, and the
    topics need at least the plan's partitions."""
    found = manifests()
    wrong = []
    if found.get("partitions", {}).get("max", 0) < p["partitions"]:
        wrong.append(f"BUBUH_DEFAULT_PARTITIONS is {found.get('partitions', {}).get('max')}, "
                     f"capacity needs at least {p['partitions']}")
    signing, st = found.get("signing", {}), p["rows"]["stamping"]
    if (signing.get("children"), signing.get("takers")) != (st["signing_children"], st["takers"]):
        wrong.append(f"bubuh-signing: BUBUH_SIGNING_PROCESSES / BUBUH_STAMPING_CONCURRENCY are "
                     f"{signing.get('children')} / {signing.get('takers')}, capacity says "
                     f"{st['signing_children']} / {st['takers']}")
    for t in TIERS:
        m = found.get(t.name)
        if t.consumer_group is None:
            if m is None or m["max"] != p["max_replicas"][t.name]:
                wrong.append(f"{t.name}: HPA maxReplicas is {m and m['max']}, "
                             f"capacity says {p['max_replicas'][t.name]}")
            continue
        want_lag, want_max = p["rows"][t.name]["lag_threshold"], p["max_replicas"][t.name]
        if m is None:
            wrong.append(f"{t.name}: no ScaledObject")
            continue
        if m["lag"].get(t.consumer_group) != want_lag:
            wrong.append(f"{t.name}: lagThreshold of {t.consumer_group} is {m['lag'].get(t.consumer_group)}, "
                         f"capacity says {want_lag}")
        if m["max"] != want_max:
            wrong.append(f"{t.name}: maxReplicaCount is {m['max']}, capacity says {want_max}")
    return wrong


def load() -> dict:
    return plan(json.loads(SURGE.read_text()), json.loads(PIPELINE.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare deploy/k8s with the derived figures")
    args = ap.parse_args(argv)
    p = load()
    if not args.check:
        text = DOC.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOC.write_text(text[:start] + "\n" + markdown(p) + "\n" + text[end:])
        print(markdown(p))
    wrong = differences(p)
    for w in wrong:
        print("deploy/k8s differs:", w, file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
