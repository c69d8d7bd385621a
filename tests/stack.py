"""The test harness's handle on the real local stack (deploy/local): start once, isolate per test.

Each test gets its own topic prefix, consumer groups and PostgreSQL schemas through ``Settings``,
so tests never see each other's records and need no broker or database of their own.
"""

from __future__ import annotations

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
            admin.delete_user(name)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_settings(**overrides) -> Settings:
    """Settings with a unique topic prefix and schema prefix; everything else from the environment."""
    tag = uuid.uuid4().hex[:10]
    base = Settings()
    values = {
        "topic_prefix": f"t{tag}.",
        "schema_prefix": f"t{tag}_",
        "default_partitions": 4,
        "log_format": "console",
        "http_port": _free_port(),
    }
    values.update(overrides)
    return base.model_copy(update=values)
