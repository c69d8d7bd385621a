"""The dashboards' queries, read statically: no query hides an absent series behind a constant, every
panel has a query, and the deadline-day questions each have a panel. Whether each query returns series
from a real Prometheus scraping a real platform is tests/integration/test_dashboard_panels.py."""

from __future__ import annotations

import json
import re

from tests.unit.test_deploy_manifests import DASHBOARDS, dashboard_targets, walk_panels

# `x or vector(0)`, `x or on() vector(0)`, `absent(x)`, `label_replace(vector(1), ...)`: a constant where a
# series is missing makes an empty panel look healthy
MASK_RE = re.compile(r"\bvector\s*\(|\babsent(_over_time)?\s*\(")
# Grafana's built-in variables, as a test evaluates them outside Grafana
VARIABLE_RE = re.compile(r"\$(__rate_interval|__interval|__range|__range_s|__interval_ms)\b|\$\{[^}]+\}|\[\[[^]]+\]\]")


def panel_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, refId, PromQL) for every target of every panel."""
    return [(path.name, panel["title"], t.get("refId", ""), t["expr"]) for path, panel, t in dashboard_targets()]


def expand(expr: str, window: str) -> str:
    """The PromQL Grafana would send, with its time variables set to ``window`` (``$__range_s`` in seconds)."""
    seconds = str(int(window.removesuffix("s")) if window.endswith("s") else int(window.removesuffix("m")) * 60)
    out = expr.replace("$__range_s", seconds).replace("$__interval_ms", str(int(seconds) * 1000))
    for name in ("$__rate_interval", "$__interval", "$__range"):
        out = out.replace(name, window)
    return out


def test_no_query_masks_a_missing_series():
    masked = [f"{d} {title!r} {ref}: {expr}" for d, title, ref, expr in panel_queries() if MASK_RE.search(expr)]
    assert not masked, "queries that show a constant where the series is missing:\n" + "\n".join(masked)


def test_every_panel_has_a_query_and_only_known_variables():
    for path in sorted(DASHBOARDS.glob("*.json")):
        dash = json.loads(path.read_text())
        assert not dash.get("templating", {}).get("list"), f"{path.name}: expand its variables in the tests"
        for panel in walk_panels(dash["panels"]):
            if panel["type"] == "row":
                continue
            exprs = [t.get("expr", "") for t in panel.get("targets", [])]
            assert exprs and all(e.strip() for e in exprs), f"{path.name} {panel['title']!r}: a panel without a query"
    for d, title, _ref, expr in panel_queries():
        left = VARIABLE_RE.sub("", expr)
        assert "$" not in left and "[[" not in left, f"{d} {title!r}: a variable the tests cannot expand: {expr}"
        assert "$" not in expand(expr, "2m"), expr


def test_expand_sets_grafanas_time_variables():
    assert expand("rate(x[$__rate_interval])", "2m") == "rate(x[2m])"
    assert expand("x[$__range] / $__range_s", "90s") == "x[90s] / 90"


def test_the_deadline_day_questions_each_have_a_panel():
    text = "\n".join(expr for *_, expr in panel_queries())
    for metric, question in {
        "bubuh_http_requests_total": "intake rate per route",
        "bubuh_http_request_seconds_bucket": "intake latency per route",
        "bubuh_stamp_open_requests": "queue depth per tier and per channel",
        "bubuh_stamp_oldest_open_request_age_seconds": "oldest request age per tier and per channel",
        "bubuh_consumer_lag_records": "consumer lag per group",
        "bubuh:stamp_completed:rate5m": "completion rate",
        "bubuh_stamp_outcomes_total": "failures by code",
        "bubuh_dead_letter_records_total": "dead letters by consumer and reason",
        "bubuh_dead_letter_topic_records": "dead-letter queue sizes",
        "bubuh_consumer_stopped": "a consumer stopped by its dead-letter limit",
        "bubuh_ledger_pending_units": "ledger: pending units",
        "bubuh_ledger_operations_total": "ledger: refused commits",
        "bubuh_webhook_channel_pending_deliveries": "webhook backlog per channel",
        "bubuh_stamp_channel_completed_total": "each channel's share of stamping",
    }.items():
        assert metric in text, f"no panel answers {question!r} ({metric})"
    # no exporter runs next to the platform: lag comes from the consumers themselves
    assert "kafka_consumergroup" not in text

