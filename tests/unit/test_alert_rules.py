"""deploy/prometheus/rules.yml through Prometheus's own promtool: it loads (Debian's Prometheus 2.42, what
`make ops` runs), and each alert (every one has unit tests in rules.test.yml) fires on a synthetic faulty series,
stays silent on a healthy one and before its ``for:``. ``make rules`` runs the same two commands."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules.test.yml"

# the alerts an operator needs first on deadline day: each must be tested both ways
MUST_BE_TESTED = {
    "BubuhConsumerLagGrowing",                  # a consumer stalled
    "BubuhConsumerStoppedByDeadLetterLimit",
    "BubuhDeadLetters",                         # the dead-letter topics grow
    "BubuhIntakeLatencyOverBudget",
    "BubuhLedgerRefusals",                      # commits refused
    "BubuhWebhookCircuitOpen",
    "BubuhWebhookBacklog",
    "BubuhTsaUnreachable",
    "BubuhRevocationDataUnreachable",             # OCSP or CRL unreachable
    "BubuhSigningCertificateRevoked",
}


def promtool() -> str:
    found = shutil.which("promtool")
    if not found and os.geteuid() == 0:
        subprocess.run([str(ROOT / "deploy" / "local" / "ops.sh"), "install"], check=False)
        found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool is not installed and cannot be installed here (not root): "
                    "`sudo deploy/local/ops.sh install` (Debian's prometheus package)")
    return found


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_rules_load_in_prometheus() -> None:
    r = run("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_alert_unit_tests_pass() -> None:
    r = run("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_each_key_alert_is_tested_firing_and_silent() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            assert check["alertname"] in alerts, f"rules.test.yml tests an alert rules.yml lacks: {check['alertname']}"
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert MUST_BE_TESTED <= alerts, f"rules.yml lost {MUST_BE_TESTED - alerts}"
    # every alert, the deadline-day ones first: a new alert comes with its tests
    assert not alerts - fires, f"never shown firing in rules.test.yml: {sorted(alerts - fires)}"
    assert not alerts - silent, f"never shown silent in rules.test.yml: {sorted(alerts - silent)}"
