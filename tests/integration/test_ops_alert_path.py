"""The real alert path of `make ops`: deploy/local/ops.sh starts Debian's Prometheus and Alertmanager (on
free loopback ports, in a directory of the test's own), a rule with ``for: 0s`` over a series that is
there (Prometheus scraping itself) fires, Alertmanager routes it to a webhook receiver, and the receiver
here sees the notification. ``ops.sh stop`` then leaves no process and no listening port behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "deploy" / "local" / "ops.sh"

RULE = """\
groups:
  - name: e2e
    rules:
      - alert: BubuhOpsPathCheck
        expr: up{job="prometheus"} == 1
        for: 0s
        labels: {severity: info}
        annotations: {summary: "Prometheus scrapes itself"}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def receiver():
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append({"path": self.path, "body": json.loads(body)})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def test_an_alert_goes_through_prometheus_and_alertmanager_to_a_webhook(tmp_path, receiver):
    if not (shutil.which("prometheus") and shutil.which("prometheus-alertmanager")):
        if os.geteuid() != 0:
            pytest.skip("Prometheus/Alertmanager are not installed and cannot be installed here (not root): "
                        "`sudo deploy/local/ops.sh install`")
        subprocess.run([str(OPS), "install"], check=True, timeout=600)
    url, received = receiver
    rules = tmp_path / "rules.yml"
    rules.write_text(RULE)
    prom, am = free_port(), free_port()
    env = {**os.environ, "BUBUH_OPS_DIR": str(tmp_path / "ops"), "BUBUH_OPS_RULES": str(rules),
           "BUBUH_OPS_PROMETHEUS_PORT": str(prom), "BUBUH_OPS_ALERTMANAGER_PORT": str(am),
           "BUBUH_OPS_SCRAPE_INTERVAL": "1s", "BUBUH_OPS_GROUP_WAIT": "1s", "BUBUH_OPS_WEBHOOK_URL": url,
           "BUBUH_PYTHON": sys.executable, "BUBUH_HTTP_PORT": str(free_port()), "BUBUH_METRICS_PORT": "0"}
    try:
        started = subprocess.run([str(OPS), "start"], env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        config = (tmp_path / "ops" / "prometheus.yml").read_text()
        assert str(rules) in config and f"127.0.0.1:{am}" in config
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not received:
            time.sleep(0.5)
        am_log = (tmp_path / "ops" / "alertmanager.log").read_text()[-2000:]
        assert received, f"no notification reached the webhook in 60 s: {am_log}"
        note = received[0]
        assert note["path"] == "/hook"
        assert note["body"]["status"] == "firing"
        alert = note["body"]["alerts"][0]
        assert alert["labels"]["alertname"] == "BubuhOpsPathCheck"
        assert alert["labels"]["job"] == "prometheus"
        assert alert["annotations"]["summary"] == "Prometheus scrapes itself"
    finally:
        stopped = subprocess.run([str(OPS), "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not listening(prom) and not listening(am)
    assert not list((tmp_path / "ops").glob("*.pid"))
