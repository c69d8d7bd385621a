"""Who may do what on Kafka: the principals, their ACLs and their SCRAM credentials.

The broker denies whatever no ACL allows (StandardAuthorizer, ``allow.everyone.if.no.acl.found=false``):
- a channel may write (and describe) ``purchase.submitted``, nothing else;
- each service's principal writes its own topics and reads what it consumes (``SERVICES``, from the
  topic catalogue and each ``services/*/service.py``); the local all-in-one ``bubuh serve`` runs as one
  ``platform`` principal with the union of those rights;
- the admin principal (a super user, bootstrapped by ``StorageTool format --add-scram``) creates topics,
  credentials and ACLs, here and in ``bubuh channel``.

Credentials and ACLs are managed with confluent-kafka's ``AdminClient`` (librdkafka): aiokafka's admin
client cannot alter SCRAM credentials or ACLs. Its calls block, so async callers use a thread.
SCRAM credentials and ACLs take effect asynchronously (the controller commits them; the broker applies
them a moment later): ``wait_authenticates`` and ``grant`` return only once the broker honours them.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from services.kernel import kafka_auth, topics
from services.kernel.settings import Settings
from services.kernel.topics import Topic

SCRAM_ITERATIONS = 8192
CHANNEL_USER_PREFIX = "channel-"
PLATFORM = "platform"
MONITOR = "monitor"                # the consumer-lag exporter: describes topics and groups, nothing else
FAUST_APP = "bubuh-throughput"     # services/stamping/throughput.APP_NAME: its group and internal topics


class AccessError(RuntimeError):
    """The broker refused or did not confirm a credential or ACL change."""


@dataclass(frozen=True)
class Rights:
    writes: tuple[Topic, ...]
    reads: tuple[Topic, ...]
    groups: tuple[str, ...]                         # consumer groups (settings.group prefixes them)
    library_prefixes: tuple[str, ...] = field(default=())   # topics and groups a library names itself

    def __or__(self, other: Rights) -> Rights:
        def union(a, b):
            return tuple(dict.fromkeys(a + b))
        return Rights(union(self.writes, other.writes), union(self.reads, other.reads),
                      union(self.groups, other.groups), union(self.library_prefixes, other.library_prefixes))


def _replay(dlq: Topic) -> str:
    return f"replay.{dlq.name}"                     # services/kernel/replay.py's group


T = topics
SERVICES: dict[str, Rights] = {
    # HTTP intake (purchase.submitted), the confirmation consumer, the channel registry's outbox
    "purchase": Rights(writes=(T.CHANNEL, T.PURCHASE_SUBMITTED, T.PURCHASE_EVENTS, T.PURCHASE_DLQ),
                       reads=(T.CHANNEL, T.PURCHASE_SUBMITTED, T.PURCHASE_DLQ),
                       groups=("purchase.confirmation", _replay(T.PURCHASE_DLQ))),
    "quota": Rights(writes=(T.QUOTA_EVENTS, T.QUOTA_DLQ),
                    reads=(T.CHANNEL, T.PURCHASE_EVENTS, T.STAMP_REQUESTED, T.STAMP_EVENTS, T.QUOTA_DLQ),
                    groups=("quota.ledger", _replay(T.QUOTA_DLQ))),
    # intake (stamp.requested), workers, tracker, and the faust throughput tables (internal topics)
    "stamping": Rights(writes=(T.STAMP_REQUESTED, T.STAMP_EVENTS, T.STAMP_RETRY, T.STAMP_DLQ),
                       reads=(T.CHANNEL, T.QUOTA_EVENTS, T.STAMP_RETRY, T.STAMP_EVENTS, T.STAMP_DLQ),
                       groups=("stamping.worker", "stamping.tracker", _replay(T.STAMP_DLQ)),
                       library_prefixes=(FAUST_APP,)),
    "notification": Rights(writes=(T.NOTIFICATION_DLQ,),
                           reads=(T.CHANNEL, T.QUOTA_EVENTS, T.PURCHASE_EVENTS, T.STAMP_EVENTS, T.NOTIFICATION_DLQ),
                           groups=("notification.intake", _replay(T.NOTIFICATION_DLQ))),
}


# production tiers that are not one service: the api deployment serves every service's HTTP routes
# (purchase intake and its rejections, stamp intake, the faust throughput behind queue positions)
TIERS: dict[str, Rights] = {
    "api": Rights(writes=(T.PURCHASE_SUBMITTED, T.PURCHASE_EVENTS, T.STAMP_REQUESTED),
                  reads=(T.CHANNEL, T.STAMP_EVENTS), groups=(),
                  library_prefixes=(FAUST_APP,)),
}


def platform_rights() -> Rights:
    """The local all-in-one process: every service's rights, nothing more."""
    rights = Rights((), (), ())
    for r in SERVICES.values():
        rights = rights | r
    return rights


def principal(user: str) -> str:
    return f"User:{user}"


def channel_user(channel_id: str) -> str:
    return f"{CHANNEL_USER_PREFIX}{channel_id}"


def _allow(kind: ResourceType, name: str, who: str, op: AclOperation,
           pattern: ResourcePatternType = ResourcePatternType.LITERAL) -> AclBinding:
    return AclBinding(kind, name, pattern, who, "*", op, AclPermissionType.ALLOW)


def service_bindings(settings: Settings, user: str, rights: Rights) -> list[AclBinding]:
    """A service principal's ACLs, on the topic and group names in use (``settings.topic_prefix``).

    Every principal may describe every catalogue topic: start-up checks the topics exist, and topic
    metadata is no secret; writing and reading are what the ACLs ration.
    """
    who, out = principal(user), []
    for t in topics.ALL:
        out.append(_allow(ResourceType.TOPIC, settings.topic(t.name), who, AclOperation.DESCRIBE))
        if t.append_time:       # start-up checks the broker stamps it (topics.ensure)
            out.append(_allow(ResourceType.TOPIC, settings.topic(t.name), who, AclOperation.DESCRIBE_CONFIGS))
    for t in rights.writes:
        out.append(_allow(ResourceType.TOPIC, settings.topic(t.name), who, AclOperation.WRITE))
    for t in rights.reads:
        out.append(_allow(ResourceType.TOPIC, settings.topic(t.name), who, AclOperation.READ))
    for g in rights.groups:
        out.append(_allow(ResourceType.GROUP, settings.group(g), who, AclOperation.READ))
    for p in rights.library_prefixes:
        out.append(_allow(ResourceType.TOPIC, settings.group(p), who, AclOperation.ALL, ResourcePatternType.PREFIXED))
        out.append(_allow(ResourceType.GROUP, settings.group(p), who, AclOperation.ALL, ResourcePatternType.PREFIXED))
    return out


def monitor_bindings(settings: Settings, user: str) -> list[AclBinding]:
    """The lag exporter (compose's kafka-exporter): DESCRIBE on every catalogue topic and on every
    consumer group the platform runs (faust's topics and group by their prefix), and nothing else.

    Listing and describing groups, fetching their committed offsets and the topics' end offsets all
    need DESCRIBE only. Not ``Rights``: a group there is granted READ, which would let the exporter
    join a group or commit its offsets; and it needs no DESCRIBE_CONFIGS (``service_bindings`` gives
    every service that for its start-up check).
    """
    who, everything = principal(user), platform_rights()
    out = [_allow(ResourceType.TOPIC, settings.topic(t.name), who, AclOperation.DESCRIBE) for t in topics.ALL]
    out += [_allow(ResourceType.GROUP, settings.group(g), who, AclOperation.DESCRIBE) for g in everything.groups]
    for p in everything.library_prefixes:
        out += [_allow(kind, settings.group(p), who, AclOperation.DESCRIBE, ResourcePatternType.PREFIXED)
                for kind in (ResourceType.TOPIC, ResourceType.GROUP)]
    return out


def channel_bindings(settings: Settings, user: str) -> list[AclBinding]:
    """A channel: write (and describe, which a producer needs for metadata) purchase.submitted only."""
    name = settings.topic(topics.PURCHASE_SUBMITTED.name)
    return [_allow(ResourceType.TOPIC, name, principal(user), op)
            for op in (AclOperation.WRITE, AclOperation.DESCRIBE)]


def prefix_bindings(user: str, prefix: str) -> list[AclBinding]:
    """Everything on topics and groups starting with ``prefix`` (a test's own ``t<hex>.``)."""
    who = principal(user)
    return [_allow(kind, prefix, who, AclOperation.ALL, ResourcePatternType.PREFIXED)
            for kind in (ResourceType.TOPIC, ResourceType.GROUP)]


def new_password() -> str:
    return secrets.token_urlsafe(24)


def _key(b: AclBinding) -> tuple:
    return (b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation, b.permission_type)


class AccessAdmin:
    """The admin principal's client for credentials and ACLs (blocking calls)."""

    def __init__(self, settings: Settings, timeout_s: float = 30.0) -> None:
        self._settings = settings
        self._timeout = timeout_s
        self._admin = AdminClient(kafka_auth.confluent_config(settings, admin=True) | {"log_level": "2"})

    def _wait(self, futures: dict) -> list:
        out = []
        for f in futures.values():
            try:
                out.append(f.result(timeout=self._timeout))
            except KafkaException as exc:
                raise AccessError(f"the broker refused the change: {exc.args[0] if exc.args else exc}") from None
        return out

    # --- SCRAM credentials ---
    def set_password(self, user: str, password: str) -> None:
        info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
        self._wait(self._admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(user, info, password.encode())], request_timeout=self._timeout))

    def disable_user(self, user: str) -> None:
        """Replace the user's credential with a random password that is never shown or stored.

        The credential is not deleted: on Kafka 4.1-4.3 (KRaft, combined mode) a broker restarted after
        several SCRAM deletions authenticates nobody, the admin included, although the metadata log and
        image still hold every live credential (docs/kafka-access.md). Rotating to an unknown password
        locks the user out just as well, and restarts stay safe.
        """
        self.set_password(user, new_password())

    def has_user(self, user: str) -> bool:
        futures = self._admin.describe_user_scram_credentials([user], request_timeout=self._timeout)
        try:
            description = futures[user].result(timeout=self._timeout)
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "code", lambda: None)() == KafkaError.RESOURCE_NOT_FOUND:
                return False
            raise AccessError(f"cannot read the credentials of {user}: {exc}") from None
        return bool(description.scram_credential_infos)

    # --- ACLs ---
    def grant(self, bindings: list[AclBinding]) -> None:
        """Create the ACLs (idempotent) and return once the broker's authorizer holds them."""
        if not bindings:
            return
        self._wait(self._admin.create_acls(bindings, request_timeout=self._timeout))
        wanted = {_key(b) for b in bindings}
        deadline = time.monotonic() + self._timeout
        while True:
            held = set()
            for who in {b.principal for b in bindings}:
                held |= {_key(b) for b in self.acls(who)}
            if wanted <= held:
                return
            if time.monotonic() > deadline:
                raise AccessError(f"the broker did not apply {len(wanted - held)} ACLs in time")
            time.sleep(0.05)

    def acls(self, who: str) -> list[AclBinding]:
        return self._describe(AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, who, None,
                                               AclOperation.ANY, AclPermissionType.ANY))

    def acls_on(self, topic: str) -> list[AclBinding]:
        return self._describe(AclBindingFilter(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL, None, None,
                                               AclOperation.ANY, AclPermissionType.ANY))

    def _describe(self, f: AclBindingFilter) -> list[AclBinding]:
        try:
            return list(self._admin.describe_acls(f, request_timeout=self._timeout).result(timeout=self._timeout))
        except KafkaException as exc:
            raise AccessError(f"cannot read ACLs: {exc.args[0] if exc.args else exc}") from None

    def revoke(self, bindings: list[AclBinding]) -> None:
        if bindings:
            filters = [AclBindingFilter(*_key(b)) for b in bindings]
            self._wait(self._admin.delete_acls(filters, request_timeout=self._timeout))

    def revoke_all(self, user: str) -> None:
        f = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, principal(user), None,
                             AclOperation.ANY, AclPermissionType.ANY)
        self._wait(self._admin.delete_acls([f], request_timeout=self._timeout))


def authenticates(settings: Settings, credential: tuple[str, str], timeout_s: float = 3.0) -> bool:
    """Whether the broker accepts this credential now (one fresh connection). A refusal is known as soon
    as the broker answers the SASL exchange; only an unreachable broker takes the whole ``timeout_s``."""
    failed: list[KafkaError] = []
    config = kafka_auth.confluent_config(settings, credential) | {
        "log_level": "0", "error_cb": failed.append, "reconnect.backoff.ms": "50"}
    client = AdminClient(config)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.list_topics(timeout=min(0.2, max(0.01, deadline - time.monotonic())))
            return True
        except KafkaException:
            pass
        client.poll(0)     # serves error_cb: librdkafka reports the refusal there, then keeps retrying
        if any(e.code() == KafkaError._AUTHENTICATION for e in failed) or time.monotonic() >= deadline:
            return False


def wait_authenticates(settings: Settings, credential: tuple[str, str], timeout_s: float = 30.0) -> None:
    """Return once a new credential works (SCRAM changes reach the broker asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while not authenticates(settings, credential, timeout_s=min(3.0, timeout_s)):
        if time.monotonic() > deadline:
            raise AccessError(f"the broker did not accept the new credential of {credential[0]} "
                              f"within {timeout_s:g} s")
        time.sleep(0.1)


def create_principal(admin: AccessAdmin, settings: Settings, user: str, bindings: list[AclBinding],
                     password: str | None = None) -> tuple[str, str]:
    """A SCRAM credential (new password unless given) and its ACLs; returns once both work."""
    credential = (user, password or new_password())
    admin.set_password(*credential)
    admin.grant(bindings)
    wait_authenticates(settings, credential)
    return credential


def service_user(service: str) -> str:
    return f"bubuh-{service}"


def rights_of(name: str) -> Rights:
    """A principal's rights by deployment: ``platform``, a service, or a tier (``api``)."""
    return platform_rights() if name == PLATFORM else SERVICES.get(name) or TIERS[name]


def principal_names() -> tuple[str, ...]:
    """What ``bubuh kafka principal`` makes: the platform, every service, every tier, the monitor."""
    return (PLATFORM, *TIERS, *SERVICES, MONITOR)


def bindings_of(settings: Settings, name: str) -> list[AclBinding]:
    """The ACLs of the principal ``service_user(name)``, for a name of ``principal_names()``."""
    user = service_user(name)
    if name == MONITOR:
        return monitor_bindings(settings, user)
    return service_bindings(settings, user, rights_of(name))


def setup_local_platform(admin: AccessAdmin, settings: Settings) -> tuple[str, str]:
    """The local stack's platform principal, its credential kept in ``.local/kafka/credentials/platform.json``.

    Idempotent: an existing credential that still authenticates is kept; the ACLs are (re)applied.
    """
    import json
    import os

    path = settings.kafka_credentials_dir / "platform.json"
    try:
        data = json.loads(path.read_text())
        credential = (data["username"], data["password"])
    except (FileNotFoundError, ValueError, KeyError):
        credential = (service_user(PLATFORM), new_password())
    if not admin.has_user(credential[0]) or not authenticates(settings, credential):
        admin.set_password(*credential)
    admin.grant(service_bindings(settings, credential[0], platform_rights()))
    wait_authenticates(settings, credential)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".platform.json.{os.getpid()}")
    tmp.write_text(json.dumps({"username": credential[0], "password": credential[1],
                               "mechanism": settings.kafka_sasl_mechanism}) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return credential
