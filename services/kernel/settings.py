"""All settings in one place, read from the environment (prefix ``BUBUH_``).

Defaults match the local stack (``deploy/local/``), so ``make run`` needs no configuration.
Tests isolate themselves with ``topic_prefix`` and ``schema_prefix`` instead of new brokers.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BUBUH_", extra="ignore")

    # --- infrastructure ---
    # the local stack's ports follow deploy/local's own settings (BUBUH_LOCAL_KAFKA_PORT, ...), so a
    # second checkout can run its stack beside the first one
    kafka_bootstrap: str = Field(
        default_factory=lambda: f"127.0.0.1:{os.environ.get('BUBUH_LOCAL_KAFKA_PORT', '19092')}")
    database_url: str = Field(default_factory=lambda: (
        f"postgresql://bubuh:{os.environ.get('BUBUH_LOCAL_PG_PASSWORD', 'bubuh-local')}"
        f"@127.0.0.1:{os.environ.get('BUBUH_LOCAL_PG_PORT', '15432')}/bubuh"))
    local_dir: Path = REPO_ROOT / ".local"
    # Kafka security (services/kernel/kafka_auth.py builds every client's options from these). The local
    # stack runs SASL_PLAINTEXT + SCRAM-SHA-512 with ACLs; production SASL_SSL. An empty username means the
    # local stack's credential: .local/kafka/credentials/platform.json (admin.json for the admin).
    kafka_security_protocol: str = "SASL_PLAINTEXT"   # PLAINTEXT | SASL_PLAINTEXT | SASL_SSL
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    kafka_username: str = ""
    kafka_password: str = ""
    kafka_ssl_cafile: str = ""         # SASL_SSL: the CA that signed the brokers' certificates (default: system)
    # the admin principal: only `bubuh kafka setup` and `bubuh channel ...` (credentials, ACLs) use it
    kafka_admin_username: str = ""
    kafka_admin_password: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    public_base_url: str = ""  # where channels and the public reach the API; default http://host:port
    metrics_port: int = 0      # a process without API routes serves /metrics and /healthz here (0: none)
    # several API processes on one port: each binds BUBUH_HTTP_PORT with SO_REUSEPORT and the kernel
    # spreads new connections over them; each also serves /metrics on its own BUBUH_METRICS_PORT
    http_reuse_port: bool = False
    # an API connection is closed after this many requests (``Connection: close`` on the last answer; 0:
    # never), as nginx's keepalive_requests: SO_REUSEPORT and an L4 load balancer (a Kubernetes Service)
    # place connections, not requests, so a few long-lived ones would pin the traffic to one member. At
    # 100, a surge round of ~4,000 requests over 32 client connections was ~70 placements, and two API
    # members split it 40/60 (a standard deviation of 6%); at 25, ~190 placements (4%). A new
    # connection on a LAN costs a fraction of a millisecond; TLS ends at the ingress, before the pod.
    http_keepalive_requests: int = 25
    # `bubuh up`: a process per tier as production's pods (default), or the API and the light workers in one
    local_layout: Literal["shared", "tiers"] = "tiers"
    local_tier_members: int = 1       # `bubuh up` with BUBUH_LOCAL_LAYOUT=tiers: processes per tier, API included
    local_api_members: int = 0        # `bubuh up` with the tiers layout: API processes (0: one per core, up to 4)
    # `bubuh up`: the nice value of every process that serves no API route (the workers, their signing
    # children), and of its session's autogroup (local_processes.lower_priority), so the front door takes
    # the CPU first on one box. 0 (equal shares): with it at 10 a flood's intake starved the small
    # channels' stamps, x8 their p99 alone against x3-4 at 0 (README, "One box, equal shares")
    local_worker_nice: int = 0
    # the front door first only while it is busy (kernel/door_pressure.py): API processes whose uploads in progress
    # pass half the admission bound, or that turn one away, touch this file, and stamping workers sharing the box
    # run their session's autogroup at door_busy_nice while it was touched in the last second. Empty: off (`bubuh
    # up` sets it in its run directory; deploy/ leaves it off: pods have cores of their own)
    door_busy_file: str = ""
    door_busy_nice: int = 10
    # `bubuh up`: stamping worker processes on the local stack (stamping-1..N; 0: one per core, up to 4)
    local_stamping_members: int = 0
    # body limits, enforced while the body arrives (kernel/http.py BodyLimits); routes that take a body
    # name their own below; this one holds every other route
    http_max_body_bytes: int = 16 * 1024

    # --- isolation (tests, several stacks on one broker) ---
    topic_prefix: str = ""      # prepended to every topic and consumer group
    schema_prefix: str = ""     # prepended to every service's PostgreSQL schema

    # --- platform key: seals channel HMAC secrets on the channel topic (32 bytes, urlsafe base64) ---
    secret_key: str = ""

    # --- logging ---
    log_level: str = "info"
    # auto: readable console lines when stderr is a terminal (`make run`), JSON otherwise; or json | console
    log_format: Literal["auto", "json", "console"] = "auto"

    # --- process ---
    # uvloop: libuv's loop, for `bubuh serve` (kernel/event_loop.py); asyncio: the standard library's
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # the cyclic garbage collector's youngest generation for `bubuh serve` (kernel/event_loop.tune_gc);
    # 0: Python's default (700)
    gc_gen0_threshold: int = 50_000

    # --- Kafka behaviour ---
    default_partitions: int = 4
    replication_factor: int = 1
    consumer_max_batch: int = 500
    consumer_fetch_max_wait_ms: int = 100   # how long a fetch may wait to gather the bytes below
    consumer_fetch_min_bytes: int = 64 * 1024   # what a fetch gathers before the broker answers (kafka_source.py)
    producer_linger_ms: int = 5
    kafka_request_timeout_ms: int = 15000
    kafka_ready_timeout_s: float = 60.0     # how long a consumer waits for its group's coordinator (readiness.py)

    # --- database ---
    db_pool_min: int = 1
    db_pool_max: int = 10
    db_command_timeout_s: float = 10.0
    # auto: no TLS to a loopback server, the URL's sslmode elsewhere; or disable|prefer|require|verify-ca|verify-full
    database_ssl: str = "auto"
    # migrations (kernel/migrations.py) as a process starts: each try waits this long for a lock, then gives
    # way to the platform's traffic and tries again, until it has waited migration_lock_wait_s in all (then
    # the process stops, naming the transactions in the way: before a Kubernetes startup probe's 2 minutes)
    migration_lock_timeout_s: float = 2.0
    migration_lock_wait_s: float = 90.0

    # --- consumers (kernel/processing): failure policy, docs in README "Failure policy" ---
    consumer_crash_retries: int = 3             # durable retries after a handler crash, then HANDLER_CRASHED
    consumer_crash_retry_base_s: float = 2.0     # then doubling to 600 s, equal jitter (kernel/retry.Backoff)
    consumer_suspect_retries: int = 3           # in-place retries of a timeout / cancel before the health probe
    consumer_transient_retries: int = 5         # in-place retries of a serialization failure / deadlock
    consumer_dlq_max_consecutive: int = 200     # dead letters in a row that stop a consumer (0: no limit)
    consumer_dlq_max_ratio: float = 0.5         # share of dead letters within the window that stops it (0: no limit)
    consumer_dlq_window_s: float = 60.0
    consumer_dlq_min_records: int = 200         # the ratio is judged only over at least this many records

    # --- purchase ---
    purchase_max_body_bytes: int = 16 * 1024
    purchase_max_quantity: int = 10_000
    stamp_price_rupiah: int = 10_000

    # --- quota ---
    reservation_ttl_s: int = 24 * 3600
    expiry_interval_s: float = 5.0

    # --- outbox relay ---
    outbox_batch: int = 500
    outbox_idle_poll_s: float = 0.5
    # after a wake-up, how long the relay lets more commits land before it publishes (as a producer's linger.ms):
    # a publish is five round trips (BEGIN, the publish lock, the claim, Kafka's acks=all, COMMIT) whatever it
    # carries, and under load each one carried 3-4 rows; 0: publish at once
    outbox_linger_ms: float = 5.0
    # work one member of a tier does at a time (kernel/leadership.py: an outbox's relay, quota's expiry sweep):
    # a standby tries the lead this often, and the leader checks its lock's connection as often, so a
    # leader's end is its successor's start at most this late
    leader_retry_s: float = 1.0

    # --- stamping --- (services/stamping)
    # uploads: the largest profile's document (10 MB) plus multipart framing and the meta field
    stamp_max_body_bytes: int = 10 * 1024 * 1024 + 64 * 1024
    verify_max_body_bytes: int = 10 * 1024 * 1024 + 64 * 1024
    # budgets of intake's document inspection (document/budget.py); over one is PDF_TOO_COMPLEX
    pdf_max_decoded_bytes: int = 256 * 1024 * 1024     # all Flate streams inflated, together
    pdf_max_object_stream_bytes: int = 32 * 1024 * 1024   # object and xref streams inflated (parsers hold them)
    pdf_max_objects: int = 100_000                     # indirect objects, those in object streams included
    pdf_max_nesting: int = 64                          # arrays / dictionaries inside one another
    document_store_root: Path | None = None      # default: <local_dir>/documents
    signing_p12_path: str = ""                   # default: <local_dir>/pki/signer.p12 (`bubuh keys dev-pki`)
    signing_p12_password: str = "bubuh-dev"
    signing_pkcs11_module: str = ""              # set to sign with an HSM through PKCS#11 instead
    signing_pkcs11_token_label: str = ""
    signing_pkcs11_pin: str = ""
    signing_pkcs11_key_label: str = ""
    signing_md_algorithm: str = "sha256"
    # PAdES level of every stamp: b-b, b-t (signature time-stamp), b-lt (plus the chains' certificates,
    # OCSP and CRLs in a DSS), b-lta (plus a document time-stamp). Never lowered: without its TSA or
    # revocation data a stamp waits on the retry path (TSA_UNAVAILABLE, VALIDATION_DATA_UNAVAILABLE)
    pades_level: str = "b-lt"
    # the RFC 3161 TSA (b-t and above); default: the local test PKI's (deploy/local/pki.sh). Production: the real one
    signing_tsa_url: str = Field(default_factory=lambda: (
        f"http://127.0.0.1:{os.environ.get('BUBUH_LOCAL_PKI_PORT', '18080')}/bubuh/tsa/tsa"))
    signing_tsa_timeout_s: float = 5.0           # one time-stamp request; over it is TSA_UNAVAILABLE (retried)
    # OCSP and CRLs come from the addresses in the certificates; fetched once per validity period (their
    # nextUpdate), or after this age when a response names none
    signing_revocation_timeout_s: float = 5.0
    signing_revocation_max_age_s: float = 3600.0
    trust_roots: str = ""                        # PEM files (comma separated) verification trusts; default: dev CA, PKI
    # every PDF is opened in a killable child process (services/stamping/sandbox.py) with these budgets;
    # over CPU or memory is PDF_TOO_COMPLEX, over the wall-clock time a retryable PROCESSING_TIMEOUT
    document_memory_mib: int = 768               # address space of each document child
    intake_processes: int = 2                    # per API process: intake checks of uploads
    # how long the HTTP doors (stamp and purchase intake) wait for Kafka's acknowledgement (acks=all) before
    # they answer 503 UNAVAILABLE with Retry-After: a broker restart costs a channel a retry, not a 30 s hang
    intake_publish_timeout_s: float = 5.0
    # stamp uploads one API process works on at once; the next is answered 503 with Retry-After before its
    # body is read, rather than queued inside the server past the caller's patience (kernel/http.py)
    intake_max_in_flight: int = 64
    # ... counted in uploads of the largest size (stamp_max_body_bytes: the most a process buffers); a smaller
    # upload counts as its Content-Length, at least this share of the largest: up to 256 letters at once
    intake_smallest_share: float = Field(0.25, gt=0.0, le=1.0)
    intake_cpu_s: float = 5.0
    intake_wall_s: float = 30.0
    # signing children per stamping worker process, each with its own key or PKCS#11 session. At B-T and above
    # a child spends much of a stamp waiting for the TSA's answer; with one child every stamp behind it waited too
    signing_processes: int = 2
    # stamp requests one stamping worker takes from the fair queue at once: one signing and one ready per signing
    # child. More only queue, first come first served, in front of the children (make surge-fairness: 8 gave a
    # small channel beside a flood x5.0 of its time alone, 4 gave x3.7, at the same stamps/s)
    stamping_concurrency: int = 4
    # the fair queue's share per channel (services/stamping/fair_queue.py), JSON: {"<channel id>": 3}; default 1
    stamp_channel_weights: dict[str, float] = {}
    signing_cpu_s: float = 10.0                  # per stamp, in the worker's signing child (the key stays open)
    signing_wall_s: float = 120.0                # includes the TSA and the HSM
    verify_processes: int = 1                    # anonymous verification: its own pool, lower CPU priority
    verify_cpu_s: float = 5.0
    verify_wall_s: float = 30.0
    verify_nice: int = 10
    # SCHED_IDLE for the verification children: CPU only when nothing else wants it (false: nice alone)
    verify_sched_idle: bool = True
    verify_max_waiting: int = 8                  # more waiting uploads: BUSY (503 + Retry-After)
    verify_rate_per_client_per_s: float = 1.0    # per client address, with a burst of verify_rate_burst
    verify_rate_burst: int = 5
    stamp_max_attempts: int = 5                  # transient failures before the dead-letter topic
    stamp_retry_base_s: float = 2.0              # first retry after base/2..base, then doubling (equal jitter)
    stamp_retry_max_s: float = 600.0             # the ceiling of one delay
    stamp_max_deliveries: int = 3                # a request that took its worker down this often is poison
    stamp_node_id: int | None = None             # unique per live worker process (SN field); default: random
    stamp_eta_window_s: float = 60.0             # throughput window behind queue positions' expected times
    # where an ETA finds the tier's rate before a backlog gives its pace (stamping/queue.py): "database", the
    # schema's count of the window; "stream", faust windows over stamp.events (about 3 ms of CPU a stamp more:
    # README, "faust-streaming")
    stamp_rates_from: str = "database"

    # --- notification --- (webhooks and email; services/notification, docs/webhooks.md)
    webhook_concurrency: int = 32          # webhook requests in flight per instance, all endpoints together
    webhook_per_endpoint: int = 4          # requests in flight per endpoint (scheme://host:port) per instance
    webhook_connect_timeout_s: float = 2.0
    webhook_timeout_s: float = 10.0        # the whole request, connect to last byte of the status line
    webhook_lease_s: float = 30.0          # a claimed delivery's lease; must exceed webhook_timeout_s
    webhook_backoff_base_s: float = 10.0   # first retry after base/2..base, then doubling (equal jitter)
    webhook_backoff_factor: float = 2.0
    webhook_backoff_max_s: float = 3600.0
    webhook_horizon_s: float = 24 * 3600   # retried until then; then dead-lettered (DeliveryAbandoned)
    webhook_breaker_failures: int = 5      # consecutive failures that open an endpoint's circuit
    webhook_breaker_cooldown_s: float = 30.0   # open -> half-open (one probe) after this
    # local mode: loopback webhook targets, and plain http to them, are accepted (make run, tests). Never
    # in production: there a webhook is https to a public address (services/kernel/webhook_targets.py)
    webhook_local_mode: bool = False
    webhook_hosts: str = ""                # "name=addr[|addr],...": answers instead of DNS, checked like DNS's
    notification_idle_poll_s: float = 1.0  # longest sleep of the senders without a NOTIFY
    notification_retention_s: float = 30 * 24 * 3600   # delivered / dead rows are deleted after this
    # every service's inbox claims are deleted after this (services/kernel/inbox.py: longer than any topic keeps
    # a record, so nothing that could still arrive loses its claim)
    inbox_retention_s: float = 30 * 24 * 3600
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_security: str = "none"            # "none" | "starttls" | "tls"
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_timeout_s: float = 10.0
    email_sender: str = "Bubuh e-Meterai <no-reply@bubuh.local>"
    email_locale: str = "id"               # "id" | "en" | "id+en" (one bilingual message, Indonesian first)
    email_concurrency: int = 4
    # email retries, apart from the webhooks' (a mail server's 4xx asks for minutes, not seconds):
    # first retry after base/2..base, then times factor up to max (equal jitter)
    email_backoff_base_s: float = 30.0
    email_backoff_factor: float = 2.0
    email_backoff_max_s: float = 3600.0
    email_horizon_s: float = 24 * 3600

    @property
    def public_url(self) -> str:
        return self.public_base_url or f"http://{self.http_host}:{self.http_port}"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def schema(self, service: str) -> str:
        return f"{self.schema_prefix}{service}"

    @property
    def kafka_credentials_dir(self) -> Path:
        return self.local_dir / "kafka" / "credentials"

    def kafka_credential(self, *, admin: bool = False) -> tuple[str, str]:
        """(username, password) this process authenticates with; ``admin``: the admin principal's."""
        user, password = ((self.kafka_admin_username, self.kafka_admin_password) if admin
                          else (self.kafka_username, self.kafka_password))
        if user:
            return user, password
        path = self.kafka_credentials_dir / ("admin.json" if admin else "platform.json")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            what = "BUBUH_KAFKA_ADMIN_USERNAME" if admin else "BUBUH_KAFKA_USERNAME"
            raise ValueError(f"no Kafka credential: set {what} (and its password), or start the local stack "
                             f"(deploy/local/stack.sh up writes {path})") from None
        return data["username"], data["password"]

    @property
    def documents_root(self) -> Path:
        return self.document_store_root or self.local_dir / "documents"

    @property
    def keys_dir(self) -> Path:
        return self.local_dir / "keys"

    @property
    def pki_dir(self) -> Path:
        """The local test PKI (`bubuh keys dev-pki`); its trust anchor is ``trust-anchor.pem`` in it."""
        return self.local_dir / "pki"

    def platform_key(self) -> bytes:
        """The 32-byte platform key; for local runs one is generated once into ``.local/secret.key``."""
        raw = self.secret_key
        if not raw:
            path = self.local_dir / "secret.key"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                # written whole under a temporary name, then linked: a process starting at the same
                # moment either wins the link or reads the winner's key, never a half-written file
                tmp = path.with_name(f".secret.key.{os.getpid()}")
                tmp.write_text(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
                os.chmod(tmp, 0o600)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink()
            raw = path.read_text().strip()
        key = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        if len(key) != 32:
            raise ValueError("BUBUH_SECRET_KEY must be 32 bytes in urlsafe base64 (`bubuh keys platform` makes one)")
        return key


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings()


