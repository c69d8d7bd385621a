"""Bad configuration ends with one clear line that says what and how to fix, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests import stack
from tests.platform import cli

pytestmark = pytest.mark.usefixtures("local_stack")


def _one_clear_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("bubuh: ")
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_unreachable_kafka(settings):
    s = settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})
    _one_clear_line(cli(s, "serve", check=False), "cannot reach Kafka at 127.0.0.1:1", "BUBUH_KAFKA_BOOTSTRAP")


def test_wrong_database_password(settings):
    url = settings.database_url.replace("bubuh-local@", "wrong-password@")
    if url == settings.database_url:
        pytest.skip("BUBUH_DATABASE_URL has no password of ours to spoil")
    s = settings.model_copy(update={"database_url": url})
    _one_clear_line(cli(s, "serve", check=False), "refused the password", "BUBUH_DATABASE_URL")


def test_database_that_is_not_there(settings):
    s = settings.model_copy(update={"database_url": "postgresql://bubuh:x@127.0.0.1:1/bubuh"})
    _one_clear_line(cli(s, "serve", check=False), "cannot connect to PostgreSQL at 127.0.0.1:1/bubuh",
                    "BUBUH_DATABASE_URL")


def test_http_port_taken(settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        s = settings.model_copy(update={"http_port": taken.getsockname()[1]})
        _one_clear_line(cli(s, "serve", check=False), f"port 127.0.0.1:{s.http_port} is taken", "BUBUH_HTTP_PORT")


def test_local_kafka_port_taken_is_one_line_too(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, BUBUH_LOCAL_DIR=str(tmp_path), BUBUH_LOCAL_KAFKA_PORT=str(port))
        proc = subprocess.run([str(stack.LOCAL / "kafka.sh"), "start"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"kafka: port 127.0.0.1:{port} is taken by another process: stop it, or set BUBUH_LOCAL_KAFKA_PORT "
        "(or BUBUH_KAFKA_BOOTSTRAP to use that broker)"]


@pytest.mark.parametrize(("weights", "says"), [('{"ch_a": 0}', "BUBUH_STAMP_CHANNEL_WEIGHTS: stamp channel weights "
                                                "must be above 0"), ('{"ch_a": -1}', "must be above 0"),
                                               ("not json", 'field "stamp_channel_weights"')])
def test_a_channel_weight_that_cannot_be_a_share(settings, weights, says):
    from tests.platform import REPO_ROOT, env_for

    env = env_for(settings) | {"BUBUH_STAMP_CHANNEL_WEIGHTS": weights}
    proc = subprocess.run([os.sys.executable, "-m", "services.operator.cli", "serve", "--api", "none", "--workers",
                           "stamping"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    _one_clear_line(proc, says)


@pytest.mark.parametrize(("setting", "value", "service", "says"), [
    ("BUBUH_STAMP_CHANNEL_WEIGHTS", '{"ch_a": 0}', "stamping", "BUBUH_STAMP_CHANNEL_WEIGHTS"),
    ("BUBUH_STAMP_RATES_FROM", "guess", "stamping", "BUBUH_STAMP_RATES_FROM='guess'"),
    ("BUBUH_PADES_LEVEL", "b-x", "stamping", "BUBUH_PADES_LEVEL='b-x'"),
    ("BUBUH_EMAIL_LOCALE", "xx", "notification", "BUBUH_EMAIL_LOCALE='xx'"),
    ("BUBUH_WEBHOOK_LEASE_S", "1", "notification", "BUBUH_WEBHOOK_LEASE_S (1.0) must exceed"),
])
def test_a_service_refuses_its_settings_before_it_connects(settings, setting, value, service, says):
    """Kafka and PostgreSQL at closed ports: the answer is the setting, not the connection (which costs
    seconds of retries and SCRAM before it would have been said)."""
    from tests.platform import REPO_ROOT, env_for

    env = env_for(settings) | {setting: value, "BUBUH_KAFKA_BOOTSTRAP": "127.0.0.1:1",
                               "BUBUH_DATABASE_URL": "postgresql://bubuh:x@127.0.0.1:1/bubuh"}
    proc = subprocess.run([os.sys.executable, "-m", "services.operator.cli", "serve", "--api", "none", "--workers",
                           service], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    _one_clear_line(proc, says)
