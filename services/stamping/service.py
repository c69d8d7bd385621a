"""The stamping service, top-down.

Consumes: ``quota.events`` (QuotaReserved -> the fair queue, then stamp; QuotaRejected, expiry -> status; QuotaCommitted
          -> release the signed stamp; QuotaRefused of a commit -> withhold it) and
          ``stamp.retry`` (transient failures, at their due time).
Publishes: ``stamp.requested`` (intake), ``stamp.events`` (StampSigned, StampCompleted, StampFailed),
           ``stamp.retry`` and ``stamp.dead-letter`` (through the outbox).
Stores:   schema ``stamping``: ``requests``, ``attempts``, ``schedule`` and ``channel_tags`` (the fair queue),
          inbox, outbox; documents in the document store.
HTTP:     ``POST /v1/stamps``, ``GET /v1/stamps/{id}``, ``GET /v1/stamps/{id}/document``,
          ``GET /v1/verify/{sn}``, ``POST /v1/verify``.
Workers are CPU-bound: run one process per core (``bubuh serve --api none --workers stamping``),
each a member of the ``stamping.worker`` consumer group; they share one fair queue.
"""

from __future__ import annotations

import functools
import secrets
from pathlib import Path

from fastapi import APIRouter

from services.kernel import database, topics
from services.kernel.door_pressure import DoorWatch, YieldToDoor
from services.kernel.leadership import Leadership
from services.kernel.outbox import Relay
from services.kernel.processing.pipeline import ConsumerLoop
from services.kernel.runtime import ConfigError, Runtime, Task
from services.kernel.settings import Settings
from services.stamping import NAME, api, store
from services.stamping.backlog import Backlog
from services.stamping.fair_queue import Enqueue, FairQueue, Takers
from services.stamping.http_intake import StampIntake
from services.stamping.public_verifier import ClientRate, PublicVerifier
from services.stamping.queue import QueueView
from services.stamping.request_status import RequestStatus
from services.stamping.sandbox import ProcessLimits, Sandbox
from services.stamping.serial import MAX_NODE, SerialIssuer
from services.stamping.signing.engine import LEVELS, SignerConfig, StampingEngine
from services.stamping.throughput import Throughput
from services.stamping.tracker import CONSUMER as TRACKER
from services.stamping.tracker import StatusTracker
from services.stamping.worker import CONSUMER as WORKER
from services.stamping.worker import StampWorker


def check(s: Settings, *, worker: bool) -> None:
    """The settings this service refuses, said before the process connects to anything."""
    fair_queue(s)
    rates_from(s)
    if worker:
        signer_config(s)


def rates_from(s: Settings) -> str:
    if s.stamp_rates_from not in ("stream", "database"):
        raise ConfigError(f"BUBUH_STAMP_RATES_FROM={s.stamp_rates_from!r}: choose stream or database")
    return s.stamp_rates_from


def fair_queue(s: Settings) -> FairQueue:
    try:
        return FairQueue(s.stamp_channel_weights)
    except ValueError as exc:
        raise ConfigError(f"BUBUH_STAMP_CHANNEL_WEIGHTS: {exc}") from None


def signer_config(s: Settings) -> SignerConfig:
    if s.pades_level not in LEVELS:
        raise ConfigError(f"BUBUH_PADES_LEVEL={s.pades_level!r}: expected one of {', '.join(LEVELS)}")
    if s.pades_level != "b-b" and not s.signing_tsa_url:
        raise ConfigError(f"PAdES {s.pades_level.upper()} needs a time-stamp authority: set BUBUH_SIGNING_TSA_URL")
    common = dict(md_algorithm=s.signing_md_algorithm, level=s.pades_level,
                  tsa_url=s.signing_tsa_url if s.pades_level != "b-b" else None,
                  tsa_timeout_s=s.signing_tsa_timeout_s, revocation_timeout_s=s.signing_revocation_timeout_s,
                  revocation_max_age_s=s.signing_revocation_max_age_s)
    if s.signing_pkcs11_module:
        return SignerConfig(pkcs11_module=s.signing_pkcs11_module, pkcs11_token_label=s.signing_pkcs11_token_label,
                            pkcs11_pin=s.signing_pkcs11_pin, pkcs11_key_label=s.signing_pkcs11_key_label, **common)
    path = s.signing_p12_path or str(s.pki_dir / "signer.p12")
    if not Path(path).exists():
        raise ConfigError(f"no signing key at {path}: run `bubuh keys dev-pki` (development) or set "
                          "BUBUH_SIGNING_P12_PATH / BUBUH_SIGNING_PKCS11_MODULE")
    return SignerConfig(p12_path=path, p12_password=s.signing_p12_password, **common)


def trust_roots(s: Settings) -> list[Path]:
    if s.trust_roots:
        return [Path(p.strip()) for p in s.trust_roots.split(",") if p.strip()]
    anchor = s.pki_dir / "trust-anchor.pem"
    return sorted(s.keys_dir.glob("ca-*.pem")) + ([anchor] if anchor.exists() else [])


def documents(s: Settings) -> store.DocumentStore:
    return store.FilesystemStore(s.documents_root)


def yields_to_door(s: Settings) -> bool:
    """The stamping workers share the box's cores with the front door and yield them while it is busy."""
    return bool(s.door_busy_file) and s.door_busy_nice > 0


async def router(rt: Runtime) -> APIRouter:
    s = rt.settings
    pool = await rt.pool(NAME)
    throughput = None
    if rates_from(s) == "stream":
        throughput = Throughput(s, window_s=s.stamp_eta_window_s)
        rt.background.append(throughput.run)
    queue = QueueView(pool, s.stamp_eta_window_s, throughput, fair_queue(s),
                      door=DoorWatch(s.door_busy_file) if yields_to_door(s) else None)
    docs = documents(s)
    inspector = await Sandbox("intake", size=s.intake_processes,
                              budget=ProcessLimits.of(s.intake_cpu_s, s.intake_wall_s, s.document_memory_mib)).start()
    checker = await Sandbox("verify", size=s.verify_processes, nice=s.verify_nice, idle=s.verify_sched_idle,
                            max_waiting=s.verify_max_waiting,
                            budget=ProcessLimits.of(s.verify_cpu_s, s.verify_wall_s, s.document_memory_mib)).start()
    rt.background += [inspector.serve, checker.serve]
    intake = StampIntake(s, rt.producer, pool, docs, queue, inspector)
    verifier = PublicVerifier(pool, trust_roots(s), checker, ClientRate(s.verify_rate_per_client_per_s,
                                                                        s.verify_rate_burst))
    return api.router(s, rt.channels, intake, RequestStatus(s, pool, docs, queue), verifier)


async def workers(rt: Runtime) -> list[Task]:
    s = rt.settings
    fair = fair_queue(s)      # a bad weight stops the start before any child is forked
    pool = await rt.pool(NAME)
    # A signing child's state: one engine, one key or PKCS#11 session, for the child's life (a session
    # does one operation at a time: each child has its own). BUBUH_SIGNING_PROCESSES children (2): the
    # worker already stamps its partitions concurrently, and at B-T and above a child waits for the
    # TSA's answer for much of a stamp; with one child the next stamp waited behind that round trip
    # (issue 13's surge: B-LT at 53% of B-B's stamps/s, signing 78 ms a stamp against 16). More
    # workers still scale the CPU: one worker process per core. The setup is the engine class itself,
    # from a module the fork server preloaded: a setup defined here would make the child import this
    # whole service (FastAPI, the routers, asyncpg) to unpickle it, about a second of CPU per start.
    signing = Sandbox("signing", size=s.signing_processes, setup=StampingEngine,
                      setup_args=(signer_config(s), s.public_url),
                      budget=ProcessLimits.of(s.signing_cpu_s, s.signing_wall_s, s.document_memory_mib))
    try:
        await signing.start()
    except RuntimeError as exc:
        raise ConfigError(f"cannot open the signing key: {exc}") from None
    node = s.stamp_node_id if s.stamp_node_id is not None else secrets.randbelow(MAX_NODE + 1)
    worker = StampWorker(s, pool, documents(s), signing, SerialIssuer(node))
    tracker = StatusTracker(s, pool, documents(s))
    # reserved requests go into the fair queue (a batch a statement); the takers sign them by channel share,
    # each holding its row on a connection of its own while it signs
    stamp_loop = ConsumerLoop(s, rt.producer, name=WORKER,
                              topics=[s.topic(topics.QUOTA_EVENTS.name), s.topic(topics.STAMP_RETRY.name)],
                              handler=Enqueue(pool, fair), pool=pool,
                              dead_letter_topic=s.topic(topics.STAMP_DLQ.name))
    claims = await database.create_pool(s, NAME, min_size=0, max_size=s.stamping_concurrency)
    takers = Takers(s, claims, worker.handle, s.stamping_concurrency, consumer=WORKER,
                    dead_letter_topic=s.topic(topics.STAMP_DLQ.name))
    track_loop = ConsumerLoop(s, rt.producer, name=TRACKER, topics=[s.topic(topics.QUOTA_EVENTS.name)],
                              handler=tracker, pool=pool,
                              dead_letter_topic=s.topic(topics.STAMP_DLQ.name))
    relay = Relay(pool, rt.producer, s, NAME)
    # one member reads the backlog for the tier's gauges (an O(open requests) statement every 5 s); one that
    # finds another leading clears what it showed
    backlog, backlog_lock = Backlog(pool, rt.channels), Leadership(s, f"stamping backlog {s.schema(NAME)}")
    tasks = [stamp_loop.run, takers.run, track_loop.run, relay.run, signing.serve,
             functools.partial(backlog_lock.lead, work=backlog.run, on_standby=backlog.clear)]
    if yields_to_door(s):
        # sharing a box's cores with the front door: this worker and its signing children yield them while the
        # door is busy, and only then (kernel/door_pressure.py)
        tasks.append(YieldToDoor(s.door_busy_file, s.door_busy_nice).run)
    return tasks
