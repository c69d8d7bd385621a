"""The test harness's handle on the real local stack (deploy/local): start once, isolate per test.

Each test gets its own topic prefix, consumer groups and PostgreSQL schemas through ``Settings``,
so tests never see each other's records and need no broker or database of their own.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from services.kernel.settings import REPO_ROOT, Settings

LOCAL = REPO_ROOT / "deploy" / "local"


def managed_kafka() -> bool:
    return not os.environ.get("BUBUH_KAFKA_BOOTSTRAP")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``port`` (a fault's check that a server really went away)."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def managed_postgres() -> bool:
    return not os.environ.get("BUBUH_DATABASE_URL")


def sh(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([str(LOCAL / args[0]), *args[1:]], check=True, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **env} if env else None)
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


@contextlib.contextmanager
def own_postgres() -> Iterator[str]:
    """A PostgreSQL cluster of the caller's own, made like the stack's (``deploy/local/postgres.sh`` with
    another port and cluster name: Debian's ``pg_createcluster``, the same settings, fsync on), dropped
    afterwards. Yields its URL. For tests that stop, demote or storm their database: on a cluster of
    their own they need not take the shared one away from every other test, and run beside them."""
    from tests import faults
    port = free_port()
    env = {"BUBUH_LOCAL_PG_PORT": str(port), "BUBUH_LOCAL_PG_CLUSTER": f"bubuh-test-{port}"}
    try:
        sh("postgres.sh", "start", env=env, timeout=120)
        yield sh("postgres.sh", "url", env=env)
    finally:
        for c in faults.clusters():
            if c["cluster"] == env["BUBUH_LOCAL_PG_CLUSTER"]:
                cmd = ["pg_dropcluster", "--stop", str(c["version"]), c["cluster"]]
                subprocess.run(cmd if os.geteuid() == 0 else ["sudo", "-n", *cmd], capture_output=True, timeout=120)


class OwnKafka:
    """A Kafka broker of a test's own: the stack's jars and ``kafka.sh``, its own storage, credentials and
    ports under ``where``, so that restarting it disturbs no other test (and the test need not run alone).
    Secured like the stack's (SASL/SCRAM, ACLs); ``settings`` points a test at it."""

    def __init__(self, where: Path) -> None:
        self.local = where / "local"
        (self.local / "kafka").mkdir(parents=True, exist_ok=True)
        stack_local = Path(os.environ.get("BUBUH_LOCAL_DIR", REPO_ROOT / ".local"))
        libs = self.local / "kafka" / "libs"
        if not libs.exists():
            libs.symlink_to(stack_local / "kafka" / "libs")
        self.port, controller_port = free_port(), free_port()
        self._env = {"BUBUH_LOCAL_DIR": str(self.local), "BUBUH_LOCAL_KAFKA_PORT": str(self.port),
                     "BUBUH_LOCAL_KAFKA_CONTROLLER_PORT": str(controller_port), "BUBUH_LOCAL_KAFKA_HEAP": "384m",
                     # started and stopped within one test: C1 alone (measured: 5.8 -> 4.0 s of CPU to start,
                     # 6.6 -> 3.8 s to restart)
                     "BUBUH_LOCAL_KAFKA_JVM_OPTS": "-XX:TieredStopAtLevel=1"}

    def start(self) -> None:
        sh("kafka.sh", "start", env=self._env, timeout=180)

    def stop(self) -> None:
        sh("kafka.sh", "stop", env=self._env, timeout=180)

    def pid(self) -> int:
        return int((self.local / "kafka" / "kafka.pid").read_text())

    def settings(self, base: Settings, *, as_admin: bool = False) -> Settings:
        """``base`` on this broker: credentials from its own local dir (the platform principal's, once
        ``access.setup_local_platform`` made it; with ``as_admin``, the admin's)."""
        own = base.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{self.port}", "local_dir": self.local,
                                      "kafka_username": "", "kafka_password": "",
                                      "kafka_admin_username": "", "kafka_admin_password": ""})
        if as_admin:
            user, password = own.kafka_credential(admin=True)
            own = own.model_copy(update={"kafka_username": user, "kafka_password": password})
        return own


def kafka_meta_properties() -> Path:
    local = Path(os.environ.get("BUBUH_LOCAL_DIR", REPO_ROOT / ".local"))
    return local / "kafka" / "data" / "meta.properties"


_access_admin = None


def access_admin():
    """The admin principal's credential/ACL client (confluent-kafka), one per test run."""
    global _access_admin
    from services.kernel import access
    if _access_admin is None:
        _access_admin = access.AccessAdmin(Settings())
    return _access_admin


def grant_prefix(settings: Settings) -> None:
    """The broker denies what no ACL allows: the platform principal gets this test's topics and groups.

    Per-test prefixes get PREFIXED ACLs (everything on ``t<hex>.``), revoked again by ``revoke_prefix``.
    """
    from services.kernel import access
    if settings.kafka_security_protocol.upper() == "PLAINTEXT":
        return
    user, _ = settings.kafka_credential()
    access_admin().grant(access.prefix_bindings(user, settings.topic_prefix))


def revoke_prefix(settings: Settings) -> None:
    from services.kernel import access, topics
    if settings.kafka_security_protocol.upper() == "PLAINTEXT":
        return
    user, _ = settings.kafka_credential()
    admin = access_admin()
    admin.revoke(access.prefix_bindings(user, settings.topic_prefix))
    # the channels this test added (`bubuh channel add`): their credentials and ACLs name its topic
    for who in {b.principal for b in admin.acls_on(settings.topic(topics.PURCHASE_SUBMITTED.name))}:
        name = who.removeprefix("User:")
        if name.startswith(access.CHANNEL_USER_PREFIX):
            admin.revoke_all(name)
            admin.disable_user(name)


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
        # a test's consumers idle most of the time: each answers a fetch as soon as one record is there and
        # otherwise asks every half second (Kafka's own default), not every 100 ms to gather 64 KiB as the
        # platform does to batch under load (README, "The suite": on an idle platform they were about half the
        # broker's CPU and a fifth of the platform's)
        "consumer_fetch_min_bytes": 1,
        "consumer_fetch_max_wait_ms": 500,
    }
    values.update(overrides)
    return base.model_copy(update=values)
