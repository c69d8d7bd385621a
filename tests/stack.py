"""The test harness's handle on the real local stack (deploy/local): start once, isolate per test.

Each test gets its own topic prefix, consumer groups and PostgreSQL schemas through ``Settings``,
so tests never see each other's records and need no broker or database of their own.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import uuid
from pathlib import Path

from services.kernel.settings import REPO_ROOT, Settings

LOCAL = REPO_ROOT / "deploy" / "local"


def managed_kafka() -> bool:
    return not os.environ.get("BUBUH_KAFKA_BOOTSTRAP")


def managed_postgres() -> bool:
    return not os.environ.get("BUBUH_DATABASE_URL")


def sh(*args: str, timeout: float = 600) -> str:
    out = subprocess.run([str(LOCAL / args[0]), *args[1:]], check=True, capture_output=True, text=True,
                         timeout=timeout)
    return out.stdout.strip()


def stack_up() -> None:
    sh("stack.sh", "up")


def kafka_stop() -> None:
    sh("kafka.sh", "stop")


def kafka_start() -> None:
    sh("kafka.sh", "start")


def postgres_stop() -> None:
    sh("postgres.sh", "stop")


def postgres_start() -> None:
    sh("postgres.sh", "start")


def kafka_meta_properties() -> Path:
    local = Path(os.environ.get("BUBUH_LOCAL_DIR", REPO_ROOT / ".local"))
    return local / "kafka" / "data" / "meta.properties"


_PORTS_PER_WORKER = 1000
_next_port = itertools.count()


def free_port() -> int:
    """A loopback port nothing listens on, from a range of this test worker's own (pytest-xdist's
    gwN gets 21000+N*1000 ...), outside the kernel's ephemeral range: a port the kernel handed out
    and took back could go to a client's outgoing connection before the test's server binds it."""
    import socket
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    n = int(worker[2:]) if worker[2:].isdigit() else 0
    base = 21000 + (n % 8) * _PORTS_PER_WORKER
    for _ in range(_PORTS_PER_WORKER):
        port = base + next(_next_port) % _PORTS_PER_WORKER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}..{base + _PORTS_PER_WORKER - 1}")


def isolated_settings(**overrides) -> Settings:
    """Settings with a unique topic prefix and schema prefix; everything else from the environment."""
    tag = uuid.uuid4().hex[:10]
    base = Settings()
    values = {
        "topic_prefix": f"t{tag}.",
        "schema_prefix": f"t{tag}_",
        "default_partitions": 4,
        "log_format": "console",
        "http_port": free_port(),
        # tests deliver webhooks to receivers on 127.0.0.1 and never ask DNS (no traffic off loopback)
        "webhook_local_mode": True,
        "webhook_hosts": "*=",
        # stamps at B-B with the dev CA: the tests about PAdES levels and the test PKI ask for more
        # (tests/integration/test_pades_ltv.py); every other stamp needs no TSA round trip
        "pades_level": "b-b",
        "signing_p12_path": str(base.keys_dir / "issuer-rsa2048.p12"),
    }
    values.update(overrides)
    return base.model_copy(update=values)
