"""`bubuh up` and the local Prometheus (deploy/local/ops.sh) agree on where each process serves /metrics:
every process has a port of its own, so a scrape never lands on another process."""

from __future__ import annotations

import os

import pytest

from services.kernel.settings import Settings
from services.operator import local_processes


def test_each_process_is_scraped_on_its_own_port(monkeypatch):
    monkeypatch.setattr(local_processes, "PROCESSES", {
        **local_processes.PROCESSES,
        "stamping-2": ["--api", "none", "--workers", "stamping"],
        "notify-1": ["--api", "none", "--workers", "notification"],
    })
    targets = local_processes.metrics_targets(Settings(http_port=18080, metrics_port=0, local_layout="shared"))
    assert set(targets) == set(local_processes.PROCESSES)
    ports = [port for _, port in targets.values()]
    assert len(set(ports)) == len(ports), targets
    assert targets["bubuh"] == ("bubuh-api", 18080)          # API routes: /metrics on the HTTP port
    assert targets["stamping-1"] == ("bubuh-stamping", 18081)
    assert targets["stamping-2"] == ("bubuh-stamping", 18082)
    assert targets["notify-1"] == ("bubuh-notification", 18083)


def test_metrics_ports_start_at_bubuh_metrics_port_when_set():
    targets = local_processes.metrics_targets(Settings(http_port=18080, metrics_port=19500, local_layout="shared"))
    assert targets["stamping-1"] == ("bubuh-stamping", 19500)
    assert targets["bubuh"] == ("bubuh-api", 18080)


def test_local_stamping_members_each_get_a_process_and_a_port():
    s = Settings(http_port=18080, metrics_port=0, local_layout="shared", local_stamping_members=3)
    assert list(local_processes.processes(s)) == ["bubuh", "stamping-1", "stamping-2", "stamping-3"]
    targets = local_processes.metrics_targets(s)
    assert [targets[f"stamping-{i}"] for i in (1, 2, 3)] == [("bubuh-stamping", 18081 + i) for i in range(3)]
    assert list(local_processes.processes(Settings(local_layout="shared", local_stamping_members=1))) == list(
        local_processes.PROCESSES)


def test_bubuh_up_runs_a_process_per_tier_unless_told_to_share(monkeypatch):
    """The default is production's shape (a pod per tier): a flood's intake shares no event loop with
    other channels' quota hop (make surge-fairness: x2.0-2.2 per tier, x3.8-4.5 shared)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})         # a one-core box
    assert list(local_processes.processes(Settings())) == ["api-1", "purchase-1", "quota-1", "notification-1",
                                                           "stamping-1"]
    assert local_processes.stamping_members(Settings(local_stamping_members=3)) == 3
    assert local_processes.stamping_members(Settings(local_tier_members=2)) == 2


@pytest.mark.parametrize("cores, api", [(1, 1), (2, 2), (3, 3), (16, local_processes.API_MEMBERS_MAX)])
def test_the_api_and_stamping_run_one_process_per_core_by_default_and_the_apis_share_the_port(monkeypatch, cores,
                                                                                            api):
    """One API process is one core at most: the front door's spike needs every core it can get. One stamping
    worker (a session, so one autogroup's CPU share, with its signing children) took as much CPU as one API
    process while the two API processes took intake at 125 arrivals/s: one worker per core."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    s = Settings(http_port=18080, metrics_port=0)
    names = list(local_processes.processes(s))
    assert [n for n in names if n.startswith("api-")] == [f"api-{i}" for i in range(1, api + 1)]
    stamping = min(cores, local_processes.STAMPING_MEMBERS_MAX)
    assert [n for n in names if not n.startswith("api-")] == ["purchase-1", "quota-1", "notification-1", *(
        f"stamping-{i}" for i in range(1, stamping + 1))]
    shared = api > 1
    assert all(("BUBUH_HTTP_REUSE_PORT" in local_processes.process_env(s, f"api-{i}")) == shared
               for i in range(1, api + 1))
    ports = [port for _, port in local_processes.metrics_targets(s).values()]
    assert len(set(ports)) == len(ports)                                # still one /metrics port each


def test_api_members_can_be_set_and_never_fall_below_the_tier_members(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert local_processes.api_members(Settings(local_api_members=1)) == 1
    assert local_processes.api_members(Settings(local_api_members=3)) == 3
    assert local_processes.api_members(Settings(local_tier_members=3)) == 3


def test_the_tiers_layout_runs_each_tier_in_a_process_of_its_own_with_its_own_port():
    s = Settings(http_port=18080, metrics_port=0, local_layout="tiers", local_stamping_members=2,
                 local_api_members=1)
    assert list(local_processes.processes(s)) == ["api-1", "purchase-1", "quota-1", "notification-1",
                                                  "stamping-1", "stamping-2"]
    targets = local_processes.metrics_targets(s)
    assert targets["api-1"] == ("bubuh-api", 18080)
    assert [targets[n] for n in ("purchase-1", "quota-1", "notification-1", "stamping-1", "stamping-2")] == [
        ("bubuh-purchase", 18081), ("bubuh-quota", 18082), ("bubuh-notification", 18083),
        ("bubuh-stamping", 18084), ("bubuh-stamping", 18085)]
    # every tier's workers run exactly once, and the API runs none
    workers = [a[a.index("--workers") + 1] for a in local_processes.processes(s).values()]
    assert sorted(w for w in workers if w != "stamping") == ["none", "notification", "purchase", "quota"]
    assert "BUBUH_HTTP_REUSE_PORT" not in local_processes.process_env(s, "api-1")


def test_tier_members_share_the_api_port_and_each_has_a_metrics_port_of_its_own():
    s = Settings(http_port=18080, metrics_port=0, local_layout="tiers", local_tier_members=2)
    names = list(local_processes.processes(s))
    assert names == [f"{t}-{i}" for t in ("api", "purchase", "quota", "notification", "stamping") for i in (1, 2)]
    targets = local_processes.metrics_targets(s)
    ports = [port for _, port in targets.values()]
    assert len(set(ports)) == len(ports) and 18080 not in ports      # every member scraped on its own port
    for i in (1, 2):
        env = local_processes.process_env(s, f"api-{i}")
        assert env["BUBUH_HTTP_REUSE_PORT"] == "true" and env["BUBUH_METRICS_PORT"] == str(targets[f"api-{i}"][1])
        assert "BUBUH_HTTP_REUSE_PORT" not in local_processes.process_env(s, f"quota-{i}")
