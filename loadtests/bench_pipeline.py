"""How many purchases per second the platform carries end to end, next to PostgreSQL's own ceiling.

Issue 9: a channel publishes purchases straight to Kafka (``purchase.submitted``, signed with its
HMAC secret); the purchase service confirms each one, the quota ledger credits it, the notification
intake records the news. This times that whole pipeline on the running local stack (``stack.sh up``),
with the durability the platform promises left exactly as it is: ``synchronous_commit=on``,
``fsync=on``, producers with ``acks=all`` (checked and printed, not assumed).

One run:

* isolated topics, consumer groups and schemas (a fresh prefix, removed afterwards), a channel
  registered with ``bubuh channel add``;
* the platform's workers as real processes, ``bubuh serve --api none --workers <service>``, one
  process per service by default (``--layout single``: one process for all);
* N signed ``purchase.submitted`` records built beforehand over ``--accounts`` accounts, then
  published with the platform's own ``Producer`` (idempotent, acks=all);
* timed from the first publish until (i) every consumer group of the run has committed up to the
  end of every partition of the topics it reads (the topics its members subscribe to), (ii) the
  quota ledger holds N credit transfers and (iii) no service's outbox holds a row due for publishing,
  all three seen twice in a row with nothing moving in between (polled every 0.25 s; the time is
  the first of the two reads).

The ceiling, measured in the same invocation on the same server: one connection inserting
transactions of 500 ledger-like rows (``INSERT ... SELECT FROM unnest(...)``, and the same with
``executemany``) with ``synchronous_commit=on``, and single-row transactions per second.

``--runs`` pipeline runs (fresh prefixes each, each after a ceiling measurement), median reported;
``--profile-dir`` adds one more run, not counted, with py-spy recording each platform process.

    python -m loadtests.bench_pipeline --out loadtests/results/pipeline.json --readme README.md \\
        [--purchases 50000] [--runs 3] [--profile-dir loadtests/results --label after] \\
        [--code-dir /tmp/bubuh-before]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import colorsys
import contextlib
import datetime as dt
import hashlib
import html
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.kernel import kafka_auth

HERE = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(HERE))

# imported before --code-dir goes in front of sys.path: this repo's loadtests, whatever the code under test
from loadtests.readme import update_readme  # noqa: E402

TARGET_PER_S = 2000.0             # issue 9
BEFORE_PER_S = 65.0               # what the issue measured before the batched pipeline
CEILING_BATCH = 500
SERVICES = ("purchase", "quota", "notification")
DEAD_LETTER_TOPICS = ("purchase.dead-letter", "quota.dead-letter", "notification.dead-letter")
README_BEGIN = "<!-- bench:pipeline:begin (make bench writes this table) -->"
README_END = "<!-- bench:pipeline:end -->"
# the backlog mode's table has markers of its own
README_BACKLOG_BEGIN = "<!-- bench:pipeline-backlog:begin (make bench writes this table) -->"
README_BACKLOG_END = "<!-- bench:pipeline-backlog:end -->"
DEFAULT_BASELINE = Path("loadtests/results/pipeline-before.json")
POLL_S = 0.25
CREATED: list = []        # every run's settings, so a final sweep removes what a failed cleanup left

# Loaded by _load_services() from --code-dir, so records are built by the code the platform runs.
Settings = Producer = PurchaseOrder = submitted_record = topics_mod = None


def _load_services(code_dir: Path) -> None:
    global Settings, Producer, PurchaseOrder, submitted_record, topics_mod
    sys.path.insert(0, str(code_dir))
    import services
    if Path(services.__file__).resolve().parents[1] != code_dir.resolve():
        raise SystemExit(f"services imported from {services.__file__}, not from --code-dir {code_dir}")
    from services.kernel import topics as topics_mod
    from services.kernel.producer import Producer
    from services.kernel.settings import Settings
    from services.purchase.http_intake import submitted_record
    from services.purchase.validation import PurchaseOrder


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# the machine: load, CPU time of processes, what else is running


def _clk() -> int:
    return os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int, reaped_children: bool = False) -> float | None:
    """User + system CPU seconds of a process (None once it is gone); with ``reaped_children``, also
    those of its children that have exited (PostgreSQL's backends come and go under the postmaster)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    parts = text[text.rindex(")") + 2:].split()
    ticks = int(parts[11]) + int(parts[12]) + (int(parts[13]) + int(parts[14]) if reaped_children else 0)
    return ticks / _clk()


def _parent_of(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[1])


def listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:``port`` (``ss``, as root sees every socket's owner)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    m = re.search(r"pid=(\d+)", out)
    return int(m[1]) if m else None


def _pids_where(pred) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pred(comm, cmd):
            out.append(int(d.name))
    return out


def stack_ports(settings) -> tuple[int, int]:
    """(PostgreSQL port, Kafka port) of the stack the settings name: what ``server_pids`` looks for."""
    return (urlsplit(settings.database_url).port or 5432,
            int(settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1]))


def server_pids(pg_port: int | None = None, kafka_port: int | None = None) -> dict[str, list[int]]:
    """The PostgreSQL server (postmaster first, then its live children) and the Kafka broker that
    serve the run, found by the ports they listen on; other clusters and brokers on the box (other
    engineers' test stacks) are not counted. Without ports, or when a port has no visible owner:
    every postgres and Kafka process on the box."""
    postmaster = listener_pid(pg_port) if pg_port else None
    broker = listener_pid(kafka_port) if kafka_port else None
    if postmaster is not None:
        pg = [postmaster, *_pids_where(lambda comm, cmd: comm == "postgres")]
        pg = [postmaster] + [p for p in pg[1:] if _parent_of(p) == postmaster]
    else:
        pg = _pids_where(lambda comm, cmd: comm == "postgres")
    kafka = [broker] if broker is not None else _pids_where(
        lambda comm, cmd: comm == "java" and "kafka" in cmd.lower())
    return {"postgres": pg, "kafka": kafka, "postmaster": [postmaster] if postmaster else []}


def system_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return (total - idle) / _clk(), total / _clk()


def top_processes(n: int = 8) -> list[str]:
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,etimes,comm,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[:160] for line in out[1:n + 1]]


def machine_facts() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version
    return {"cpu": cpu, "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "busiest_processes_at_start": top_processes(),
            "python": platform.python_version(), "platform": platform.platform(),
            "aiokafka": version("aiokafka"), "asyncpg": version("asyncpg")}


def code_facts(code_dir: Path) -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(code_dir), *args], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    status = git("status", "--porcelain", "--", "services")
    return {"dir": str(code_dir), "commit": git("rev-parse", "HEAD"), "commit_subject": git("log", "-1", "--format=%s"),
            "services_uncommitted_changes": len(status.splitlines()) if status else 0}


# --------------------------------------------------------------------------------------------------
# guarantees: what the server and the code say about durability


PRODUCER_HOOK = '''\
# Written by loadtests/bench_pipeline.py: records how each Kafka producer of this process is made
# (acks, idempotence), so the benchmark can show the platform kept acks=all. Nothing else changes.
import json as _json
import os as _os

_LOG = _os.environ.get("BUBUH_BENCH_PRODUCER_LOG")
if _LOG:
    try:
        from aiokafka.producer import producer as _producer

        _original = _producer.AIOKafkaProducer.__init__

        def _recording_init(self, *args, **kwargs):
            _original(self, *args, **kwargs)
            sender = getattr(self, "_sender", None)
            with open(_LOG, "a") as fh:
                fh.write(_json.dumps({"pid": _os.getpid(), "client_id": kwargs.get("client_id"),
                                      "acks": getattr(sender, "_acks", None), "acks_arg": repr(kwargs.get("acks")),
                                      "enable_idempotence": bool(kwargs.get("enable_idempotence"))}) + "\\n")

        _producer.AIOKafkaProducer.__init__ = _recording_init
    except Exception:  # never stop the platform from starting
        pass
'''


async def wait_for_stack(timeout: float = 180) -> None:
    """Until PostgreSQL and Kafka both answer (a neighbour's chaos test may have one stopped for a while)."""
    s = Settings()
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncio.wait_for(asyncpg.connect(s.database_url), 5)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()
            admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(s), request_timeout_ms=5000)
            await asyncio.wait_for(admin.start(), 10)
            try:
                await asyncio.wait_for(admin.list_topics(), 10)
            finally:
                await admin.close()
            return
        except Exception as exc:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise SystemExit(f"the local stack does not answer ({exc!r}): deploy/local/stack.sh up") from None
            log(f"waiting for PostgreSQL and Kafka ({type(exc).__name__})")
            await asyncio.sleep(3)


async def server_guarantees(database_url: str) -> dict:
    conn = await asyncpg.connect(database_url)
    try:
        shown = {name: await conn.fetchval(f"SHOW {name}") for name in
                 ("synchronous_commit", "fsync", "full_page_writes", "wal_sync_method", "wal_level",
                  "server_version")}
        # a database- or role-level override would apply to the platform's sessions without a SHOW here
        overrides = [dict(r) for r in await conn.fetch(
            "SELECT coalesce(d.datname, '*') AS db, coalesce(r.rolname, '*') AS role, s.setconfig::text AS config "
            "FROM pg_db_role_setting s LEFT JOIN pg_database d ON d.oid = s.setdatabase "
            "LEFT JOIN pg_roles r ON r.oid = s.setrole")]
    finally:
        await conn.close()
    return {**shown, "db_role_overrides": overrides}


def code_mentions(code_dir: Path) -> dict:
    """Every line of the platform's code that could weaken durability per session or per producer."""
    found: dict[str, list[str]] = {"synchronous_commit": [], "fsync": [], "acks": []}
    for path in sorted((code_dir / "services").rglob("*.py")):
        if "contracts" in path.parts:
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for word in found:
                if re.search(rf"\b{word}\b", line):
                    found[word].append(f"{path.relative_to(code_dir)}:{no}: {line.strip()[:140]}")
    return found


def producers_seen(log_path: Path) -> list[dict]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# the platform's processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """One pipeline run's isolated world: prefixes, environment, processes."""

    settings: object
    code_dir: Path
    workdir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def new(cls, code_dir: Path, workdir: Path, partitions: int, log_level: str, hook_dir: Path) -> Run:
        tag = uuid.uuid4().hex[:10]
        s = Settings().model_copy(update={"topic_prefix": f"bench{tag}.", "schema_prefix": f"bench{tag}_",
                                          "default_partitions": partitions, "http_port": free_port()})
        grant_prefix(s)
        env = dict(os.environ)
        env.update({
            "BUBUH_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "BUBUH_DATABASE_URL": s.database_url,
            "BUBUH_TOPIC_PREFIX": s.topic_prefix,
            "BUBUH_SCHEMA_PREFIX": s.schema_prefix,
            "BUBUH_HTTP_PORT": str(s.http_port),
            "BUBUH_DEFAULT_PARTITIONS": str(partitions),
            "BUBUH_LOG_FORMAT": "json",
            "BUBUH_LOG_LEVEL": log_level,
            # the CLI seals the channel's HMAC secret with this key, the services open it with it
            "BUBUH_SECRET_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            "BUBUH_LOCAL_DIR": str(s.local_dir),
            "PYTHONPATH": os.pathsep.join([str(code_dir), str(hook_dir)]),
            "BUBUH_BENCH_PRODUCER_LOG": str(workdir / "producers.jsonl"),
        })
        CREATED.append(s)
        return cls(settings=s, code_dir=code_dir, workdir=workdir, env=env)

    @property
    def cli_module(self) -> str:
        """The ``bubuh`` command's module in the code measured (it moved into services/operator/)."""
        new = (self.code_dir / "services" / "operator" / "cli.py").exists()
        return "services.operator.cli" if new else "services.cli"

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", self.cli_module, *args], cwd=self.code_dir, env=self.env,
                             capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"bubuh {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout

    def start(self, layout: str) -> None:
        groups = {"all": list(SERVICES)} if layout == "single" else {name: [name] for name in SERVICES}
        for name, workers in groups.items():
            logf = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
            self.metrics_ports[name] = free_port()
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", self.cli_module, "serve", "--api", "none", "--workers", ",".join(workers),
                 "--ready-file", str(self.workdir / f"{name}.ready")],
                cwd=self.code_dir, env={**self.env, "BUBUH_METRICS_PORT": str(self.metrics_ports[name])},
                stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
            logf.close()

    async def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            while not (self.workdir / f"{name}.ready").exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): {self.tail(name)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready in {timeout}s: {self.tail(name)}")
                await asyncio.sleep(0.1)

    def batch_sizes(self) -> dict[str, float]:
        """Mean records per partition batch of each consumer, and per relayed outbox batch, from the
        processes' own /metrics (larger batches: fewer transactions, fetches and commits per purchase)."""
        sums: dict[str, list[float]] = {}
        pattern = re.compile(r'^(bubuh_consumer_batch_records|bubuh_outbox_lag_seconds)_(sum|count)'
                             r'\{(?:consumer|schema)="([^"]+)"\} (\S+)$')
        for port in self.metrics_ports.values():
            try:
                body = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/metrics"], capture_output=True,
                                      text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            for line in body.splitlines():
                m = pattern.match(line)
                if m:
                    key = (m[3] if m[1].startswith("bubuh_consumer") else f"outbox {m[3]}")
                    sums.setdefault(key, [0.0, 0.0])[m[2] == "count"] += float(m[4])
        out = {}
        for key, (total, count) in sorted(sums.items()):
            if key.startswith("outbox "):
                out[f"{key}: relayed batches"] = count
            elif count:
                out[f"{key}: records per batch"] = round(total / count, 1)
        return out

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self.procs.items()}

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def tail(self, name: str, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        return ""

    def log_summary(self) -> dict:
        """Warnings and errors the processes logged (a run with errors is reported, not hidden)."""
        out = {}
        for name in self.procs:
            levels: dict[str, int] = {}
            first: list[str] = []
            with contextlib.suppress(OSError):
                for line in (self.workdir / f"{name}.log").read_text(errors="replace").splitlines():
                    if not line.startswith("{"):
                        if "Traceback" in line and len(first) < 5:
                            first.append(line[:300])
                        continue
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        level = str(rec.get("level", "?")).lower()
                        levels[level] = levels.get(level, 0) + 1
                        if level in ("warning", "error", "critical", "exception") and len(first) < 5:
                            first.append(f"{level}: {rec.get('event')} {json.dumps(rec)[:300]}")
            out[name] = {"log_lines_by_level": levels, "first_problems": first}
        return out


def _prefix_access(settings, grant: bool) -> None:
    """On the secured broker the platform principal may touch a run's prefix only once the admin allows it."""
    from services.kernel import access
    if settings.kafka_security_protocol.upper() == "PLAINTEXT":
        return
    admin = access.AccessAdmin(settings)
    bindings = access.prefix_bindings(settings.kafka_credential()[0], settings.topic_prefix)
    if grant:
        admin.grant(bindings)
    else:
        admin.revoke(bindings)


def grant_prefix(settings) -> None:
    _prefix_access(settings, True)


async def cleanup(settings) -> None:
    """Drop the run's schemas, topics and consumer groups (the broker and server stay up), then its ACLs."""
    try:
        await _cleanup(settings)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(_prefix_access, settings, False)


async def _cleanup(settings) -> None:
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(settings.database_url)
        try:
            for row in await conn.fetch("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)",
                                        settings.schema_prefix):
                await conn.execute(f'DROP SCHEMA "{row["nspname"]}" CASCADE')
        finally:
            await conn.close()
    admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(settings))
    with contextlib.suppress(Exception):
        await admin.start()
        try:
            groups = [g[0] for g in await admin.list_consumer_groups() if g[0].startswith(settings.topic_prefix)]
            if groups:
                from aiokafka.protocol.admin import DeleteGroupsRequest
                with contextlib.suppress(Exception):
                    node = await admin.find_coordinator(groups[0])
                    await asyncio.wait_for(admin._send_request(DeleteGroupsRequest(groups), node), 20)
            names = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
            if names:
                await asyncio.wait_for(admin.delete_topics(names), 30)
        finally:
            await admin.close()


# --------------------------------------------------------------------------------------------------
# consumer groups: who reads what, how far they have committed


class Offsets:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(settings))
        self.probe = AIOKafkaConsumer(**kafka_auth.aiokafka_options(settings), group_id=None)
        self.subscriptions: dict[str, set[str]] = {}
        self._partitions: dict[str, list[int]] = {}

    async def partitions(self, topics: set[str] | list[str]) -> list[TopicPartition]:
        """Every partition of ``topics``, asked of the broker once per topic. (Not the probe's
        ``partitions_for_topic``: ``topics()`` does not refresh what it reads, so a topic created
        after the probe started stays unknown until the periodic metadata refresh, 5 minutes.)"""
        unknown = [t for t in topics if not self._partitions.get(t)]
        if unknown:
            for d in await self.admin.describe_topics(unknown):
                if not d.get("error_code"):
                    self._partitions[d["topic"]] = sorted(p["partition"] for p in d["partitions"])
        return [TopicPartition(t, p) for t in topics for p in self._partitions.get(t, ())]

    async def __aenter__(self) -> Offsets:
        await self.admin.start()
        await self.probe.start()
        return self

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            await self.probe.stop()
        with contextlib.suppress(Exception):
            await self.admin.close()

    async def groups(self) -> list[str]:
        return sorted(g[0] for g in await self.admin.list_consumer_groups()
                      if g[0].startswith(self.settings.topic_prefix))

    async def describe(self, groups: list[str]) -> dict[str, dict]:
        """State, members and subscribed topics of each group (from the members' own metadata)."""
        from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
        out: dict[str, dict] = {}
        responses = []
        for group in groups:
            # one group per request: aiokafka 0.14 decodes a v3 DescribeGroups answer with the v2 schema,
            # which leaves the trailing authorized_operations unread: harmless for one group, not for two
            responses += await self.admin.describe_consumer_groups([group])
        for response in responses:
            for g in response.groups:
                _err, group, state, protocol_type, _protocol, members = g[:6]
                topics: set[str] = set()
                for m in members:
                    with contextlib.suppress(Exception):
                        topics |= set(ConsumerProtocolMemberMetadata.decode(m[3]).subscription)
                out[group] = {"state": state, "members": len(members), "topics": topics,
                              "protocol_type": protocol_type}
        return out

    async def wait_stable(self, expected_min: int, timeout: float = 120) -> dict[str, dict]:
        """Until at least ``expected_min`` groups exist, all Stable with members, twice in a row 1 s apart."""
        deadline = time.monotonic() + timeout
        previous = None
        while True:
            groups = await self.groups()
            desc = await self.describe(groups) if groups else {}
            ok = (len(groups) >= expected_min
                  and all(d["state"] == "Stable" and d["members"] > 0 and d["topics"] for d in desc.values()))
            signature = {g: (d["members"], tuple(sorted(d["topics"]))) for g, d in desc.items()}
            if ok and signature == previous:
                for g, d in desc.items():
                    self.subscriptions[g] = set(d["topics"])
                return desc
            previous = signature if ok else None
            if time.monotonic() > deadline:
                raise RuntimeError(f"consumer groups not stable in {timeout}s: {desc}")
            await asyncio.sleep(1.0)

    async def snapshot(self) -> dict:
        """Committed totals per group, whether each is caught up, and end offsets per topic."""
        groups = await self.groups()
        new = [g for g in groups if g not in self.subscriptions]
        if new:   # a group that appeared during the run is checked too
            for g, d in (await self.describe(new)).items():
                self.subscriptions[g] = set(d["topics"])
        committed: dict[str, dict[TopicPartition, int]] = {}
        for g in groups:
            offs = await self.admin.list_consumer_group_offsets(g)
            committed[g] = {tp: max(0, meta.offset) for tp, meta in offs.items()}
            self.subscriptions.setdefault(g, set()).update(tp.topic for tp in committed[g])
        wanted = set().union(*self.subscriptions.values()) if self.subscriptions else set()
        partitions = await self.partitions(wanted)
        ends = await self.probe.end_offsets(partitions) if partitions else {}
        per_group = {}
        for g in groups:
            mine = [tp for tp in ends if tp.topic in self.subscriptions.get(g, ())]
            per_group[g] = {
                "committed": sum(committed[g].get(tp, 0) for tp in mine),
                "end": sum(ends[tp] for tp in mine),
                "caught_up": bool(mine) and all(committed[g].get(tp, 0) >= ends[tp] for tp in mine),
            }
        per_topic: dict[str, int] = {}
        for tp, end in ends.items():
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + end
        return {"groups": per_group, "topics": per_topic}

    async def topic_ends(self, names: list[str]) -> dict[str, int]:
        tps = await self.partitions(names)
        ends = await self.probe.end_offsets(tps) if tps else {}
        out = {t: 0 for t in names}
        for tp, end in ends.items():
            out[tp.topic] += end
        return out


# --------------------------------------------------------------------------------------------------
# the records a channel publishes


def build_records(settings, channel: dict, n: int, accounts: int) -> list:
    secret = channel["hmac_secret"].encode()
    paid_at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    run = secrets.token_hex(4)
    out = []
    for i in range(n):
        order = PurchaseOrder(channel_id=channel["channel_id"], channel_order_id=f"bench-{run}-{i}",
                              account_id=f"acct-{i % accounts:05d}", quantity=1,
                              amount=settings.stamp_price_rupiah, paid_at=paid_at, payment_ref=f"VA-{i}")
        out.append(submitted_record(settings, order, secret, producer=f"channel:{channel['channel_id']}"))
    return out


def producer_acks(p) -> int | None:
    inner = getattr(p, "_producer", None)
    return getattr(getattr(inner, "_sender", None), "_acks", None)


# --------------------------------------------------------------------------------------------------
# profiling with py-spy


def py_spy_path() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def py_spy_version(exe: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    return ""


def _short_file(path: str) -> str:
    """``services/quota/ledger.py``, ``asyncpg/connection.py``, ``asyncio/events.py``: enough to read."""
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker == "/lib/python3." and "/" in rest else rest
    return path[path.rindex("/services/") + 1:] if "/services/" in path else path


def collapse_speedscope(path: Path) -> dict[tuple[str, ...], float]:
    """Stacks (root first, frames as ``function (file)``) with their weights (py-spy: seconds), all threads
    merged."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    names = [f"{f.get('name', '?')} ({_short_file(f.get('file', '?'))})" for f in frames]
    stacks: dict[tuple[str, ...], float] = {}
    for prof in data.get("profiles", []):
        for sample, weight in zip(prof.get("samples", []), prof.get("weights", []), strict=False):
            key = tuple(names[i] for i in sample)
            stacks[key] = stacks.get(key, 0) + weight
    return stacks


def top_frames(stacks: dict[tuple[str, ...], float], n: int = 15) -> dict:
    total = sum(stacks.values()) or 1
    self_w: dict[str, float] = {}
    incl_w: dict[str, float] = {}
    for stack, w in stacks.items():
        if stack:
            self_w[stack[-1]] = self_w.get(stack[-1], 0) + w
        for f in set(stack):
            incl_w[f] = incl_w.get(f, 0) + w
    pct = lambda d: [{"frame": k, "pct": round(100 * v / total, 1)}  # noqa: E731
                     for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]
    # the platform's own frames, less the ones every sample passes through (cli, runner)
    ours = {k: v for k, v in incl_w.items() if "(services/" in k and v < 0.99 * total}
    return {"seconds_sampled": round(total, 2), "self": pct(self_w), "inclusive_platform_code": pct(ours)}


def flamegraph_svg(stacks: dict[tuple[str, ...], float], title: str, width: int = 1200, row: int = 16) -> str:
    """A plain SVG flame graph (root at the bottom; hover a frame for its share)."""
    root: dict = {"name": "all", "value": 0.0, "children": {}}
    for stack, w in stacks.items():
        node = root
        node["value"] += w
        for frame in stack:
            node = node["children"].setdefault(frame, {"name": frame, "value": 0.0, "children": {}})
            node["value"] += w
    total = root["value"] or 1.0
    scale = (width - 20) / total
    placed: list[tuple[float, int, dict]] = []

    def place(node: dict, x: float, depth: int) -> None:
        if node["value"] * scale < 0.5:
            return
        placed.append((x, depth, node))
        cx = x
        for child in sorted(node["children"].values(), key=lambda c: c["name"]):
            place(child, cx, depth + 1)
            cx += child["value"]

    place(root, 0.0, 0)
    depth = max((d for _, d, _ in placed), default=0)
    height = (depth + 1) * row + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           '<rect width="100%" height="100%" fill="#fbfbf6"/>',
           f'<text x="10" y="18" font-size="14">{html.escape(title)}</text>',
           f'<text x="10" y="34" fill="#555">py-spy: {total:.1f} s of samples of threads not idle (running, or '
           'runnable and waiting for a core); width = share; hover a frame for its name and share</text>']
    for x, d, node in placed:
        w = node["value"] * scale
        y = height - (d + 1) * row - 4
        hue = int(hashlib.md5(node["name"].split(" (")[-1].encode()).hexdigest()[:4], 16) / 65535
        r, g, b = colorsys.hls_to_rgb(0.02 + 0.12 * hue, 0.62, 0.75)
        fill = f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
        label = html.escape(node["name"])
        pct = 100 * node["value"] / total
        chars = int((w - 4) / 6.6)
        text = ""
        if chars >= 3:
            shown = node["name"] if len(node["name"]) <= chars else node["name"][:chars - 2] + ".."
            text = f'<text x="{10 + x * scale + 2:.1f}" y="{y + row - 4}">{html.escape(shown)}</text>'
        out.append(f'<g><title>{label} ({pct:.1f}%)</title><rect x="{10 + x * scale:.1f}" y="{y}" '
                   f'width="{w:.1f}" height="{row - 1}" fill="{fill}" rx="2"/>{text}</g>')
    out.append("</svg>")
    return "\n".join(out)


class Profiler:
    def __init__(self, exe: str, out_dir: Path, label: str, rate: int) -> None:
        self.exe, self.out_dir, self.label, self.rate = exe, out_dir, label, rate
        self.procs: dict[str, tuple[subprocess.Popen, Path, Path]] = {}

    def start(self, pids: dict[str, int], workdir: Path) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            out = self.out_dir / f"pipeline-{name}-{self.label}.speedscope.json"
            logp = workdir / f"py-spy-{name}.log"
            with open(logp, "wb") as logf:
                p = subprocess.Popen([self.exe, "record", "--pid", str(pid), "--format", "speedscope",
                                      "--rate", str(self.rate), "-o", str(out)], stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL)
            self.procs[name] = (p, out, logp)

    def stop(self, title: str) -> dict:
        for p, _, _ in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        result = {}
        for name, (p, out, logp) in self.procs.items():
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            entry: dict = {"speedscope": str(out), "py_spy_log": logp.read_text(errors="replace")[-500:]}
            if out.exists():
                stacks = collapse_speedscope(out)
                svg = out.with_name(out.name.replace(".speedscope.json", ".svg"))
                svg.write_text(flamegraph_svg(stacks, f"{title}: {name} process"))
                entry.update({"svg": str(svg), **top_frames(stacks)})
            result[name] = entry
        return result


# --------------------------------------------------------------------------------------------------
# one pipeline run


def _cpu_snapshot(pids: dict[str, int], servers: dict[str, list[int]]) -> dict:
    reaping = set(servers.get("postmaster", ()))
    return {"procs": {name: proc_cpu_s(pid) for name, pid in pids.items()},
            "servers": {kind: {pid: proc_cpu_s(pid, pid in reaping) for pid in ps}
                        for kind, ps in servers.items() if kind != "postmaster"},
            "system": system_busy()}


def _cpu_delta(before: dict, after: dict, seconds: float, n: int) -> dict:
    out: dict = {"per_process_cpu_s": {}, "per_process_cpu_ms_per_purchase": {}}
    for name, start in before["procs"].items():
        end = after["procs"].get(name)
        if start is not None and end is not None:
            out["per_process_cpu_s"][name] = round(end - start, 2)
            out["per_process_cpu_ms_per_purchase"][name] = round(1000 * (end - start) / n, 3)
    for kind, pids in after["servers"].items():
        total = 0.0
        for pid, end in pids.items():
            if end is not None:
                total += end - (before["servers"].get(kind, {}).get(pid) or 0.0)
        out["per_process_cpu_s"][f"{kind} (whole server)"] = round(total, 2)
        out["per_process_cpu_ms_per_purchase"][f"{kind} (whole server)"] = round(1000 * total / n, 3)
    busy = after["system"][0] - before["system"][0]
    tot = after["system"][1] - before["system"][1]
    out["machine_busy_fraction"] = round(busy / tot, 3) if tot else None
    out["machine_busy_cores"] = round(busy / seconds, 2) if seconds else None
    return out


async def _outbox_tables(conn: asyncpg.Connection, schema_prefix: str) -> list[str]:
    rows = await conn.fetch("SELECT table_schema FROM information_schema.tables WHERE table_name = 'outbox' "
                            "AND starts_with(table_schema, $1) ORDER BY 1", schema_prefix)
    return [r["table_schema"] for r in rows]


async def _outbox_due(conn: asyncpg.Connection, schemas: list[str]) -> int:
    """Rows due for publishing in every service's outbox (later, durable retries do not count), up to
    1,000 each: the poll only needs "none" or "some", and a full count of a busy outbox was a
    measurable share of the server's CPU during a run."""
    if not schemas:
        return 0
    sql = " + ".join(f'(SELECT count(*) FROM (SELECT 1 FROM "{sc}".outbox WHERE available_at <= now() '
                     f"LIMIT 1000) AS due)" for sc in schemas)
    return await conn.fetchval(f"SELECT {sql}")


async def _ledger_credits(conn: asyncpg.Connection) -> int:
    """Units credited so far: one per purchase here (quantity 1). Summed over the ~2,000 accounts, not
    counted over the growing transfers table (~15 ms a poll, four times a second, on the measured
    server); the end-of-run checks count the transfers themselves."""
    try:
        return int(await conn.fetchval("SELECT coalesce(sum(credited), 0) FROM accounts") or 0)
    except asyncpg.UndefinedTableError:
        return 0            # backlog mode: the quota service has not created its schema yet


async def pipeline_run(args, index: int, profiler: Profiler | None = None) -> dict:
    n = args.purchases
    workdir = Path(tempfile.mkdtemp(prefix="bubuh-bench-pipeline-"))
    hook_dir = workdir / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(PRODUCER_HOOK)
    run = Run.new(args.code_dir, workdir, args.partitions, args.log_level, hook_dir)
    s = run.settings
    result: dict = {"run": index, "profiled": profiler is not None, "topic_prefix": s.topic_prefix,
                    "schema_prefix": s.schema_prefix, "purchases": n, "accounts": args.accounts,
                    "partitions": args.partitions, "layout": args.layout,
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    producer = None
    try:
        add = ["channel", "add", f"bench-{s.topic_prefix.rstrip('.')}", "--json"]
        channel = json.loads(run.cli(*add, *(["--webhook", args.webhook] if args.webhook else [])))
        log(f"run {index}: channel {channel['channel_id']}, building {n} signed records")
        started = time.perf_counter()
        records = build_records(s, channel, n, args.accounts)
        result["build_records_s"] = round(time.perf_counter() - started, 2)
        producer = Producer(s, client_id="bench-channel")
        await producer.start()
        result["publisher_acks"] = producer_acks(producer)
        backlog = args.mode == "backlog"
        published: dict = {}
        if backlog:
            # the whole backlog first, with the platform down: the publisher's CPU is not the platform's
            await asyncio.wait_for(topics_mod.ensure(s), 60)
            t_pub = time.perf_counter()
            for i in range(0, n, args.chunk):
                await producer.publish_many(records[i:i + args.chunk])
            published["at"] = time.perf_counter() - t_pub
            log(f"run {index}: {n} purchases published before the platform starts "
                f"({n / published['at']:.0f}/s)")
        t_start = time.perf_counter()
        run.start(args.layout)
        ready = asyncio.create_task(run.wait_ready())
        if not backlog:
            await ready
        async with Offsets(s) as offsets:
            if not backlog:
                desc = await offsets.wait_stable(len(SERVICES))   # at least one consumer group per service
                result["consumer_groups"] = {g: {"topics": sorted(d["topics"]), "members": d["members"]}
                                             for g, d in desc.items()}
            pids = {name: p.pid for name, p in run.procs.items()}
            ports = stack_ports(s)
            if profiler:
                profiler.start(pids, workdir)
                await asyncio.sleep(1.5)      # py-spy attaches
            db = await asyncpg.connect(s.database_url, server_settings={"search_path": s.schema("quota")})
            try:
                outboxes = await _outbox_tables(db, s.schema_prefix)
                result["outboxes_watched"] = outboxes
                if not backlog:
                    log(f"run {index}: publishing {n} purchases ({len(run.procs)} platform processes: "
                        f"{', '.join(run.procs)})")
                cpu0 = _cpu_snapshot(pids, server_pids(*ports))
                t0 = time.perf_counter() if not backlog else t_start
                idle = (0.0, cpu0)       # backlog: the last poll at which nothing was handled yet

                async def publish() -> None:
                    if backlog:
                        return
                    for i in range(0, n, args.chunk):
                        await producer.publish_many(records[i:i + args.chunk])
                    published["at"] = time.perf_counter() - t0

                pub = asyncio.create_task(publish())
                timeline = []
                done_at = None
                previous = None
                deadline = t0 + args.timeout
                last_log = t0
                while True:
                    await asyncio.sleep(POLL_S)
                    if pub.done() and pub.exception():
                        raise pub.exception()
                    now = time.perf_counter() - t0
                    if backlog and not ready.done():
                        outboxes = await _outbox_tables(db, s.schema_prefix)   # created as services start
                        result["outboxes_watched"] = outboxes
                    elif backlog and "consumer_groups" not in result:
                        ready.result()
                        desc = await offsets.describe(await offsets.groups())   # members' subscriptions
                        for g, d in desc.items():
                            offsets.subscriptions.setdefault(g, set()).update(d["topics"])
                        result["consumer_groups"] = {g: {"topics": sorted(d["topics"]), "members": d["members"]}
                                                     for g, d in desc.items()}
                    pending = await _outbox_due(db, outboxes)
                    snap = await offsets.snapshot()
                    credits = await _ledger_credits(db)
                    if backlog and credits == 0 and not any(v["committed"] for v in snap["groups"].values()):
                        idle = (now, _cpu_snapshot(pids, server_pids(*ports)))
                    timeline.append({"t": round(now, 3), "credits": credits, "outbox_due": pending,
                                     "groups": {g: v["committed"] for g, v in snap["groups"].items()},
                                     "submitted": snap["topics"].get(s.topic("purchase.submitted"), 0)})
                    ok = (pub.done() and ready.done() and "consumer_groups" in result
                          and credits >= n and pending == 0 and bool(snap["groups"])
                          and all(v["caught_up"] for v in snap["groups"].values()))
                    state = (credits, sorted((g, v["committed"]) for g, v in snap["groups"].items()),
                             sorted(snap["topics"].items()))
                    # done when caught up with nothing left in any outbox, twice in a row with nothing
                    # moving in between (a record relayed between two reads cannot slip through); the
                    # time is the first of the two reads
                    if ok and previous is not None and previous[0] == state:
                        done_at = previous[1]
                        break
                    previous = (state, now) if ok else None
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"not caught up after {args.timeout}s: credits {credits}/{n}, "
                                           f"groups {snap['groups']}")
                    if not all(run.alive().values()):
                        raise RuntimeError(f"a platform process died: {run.alive()}")
                    if time.perf_counter() - last_log > 10:
                        last_log = time.perf_counter()
                        log(f"run {index}: t={now:.0f}s credits {credits}/{n}, committed "
                            + ", ".join(f"{g.removeprefix(s.topic_prefix)} {v['committed']}"
                                        for g, v in snap["groups"].items()))
                cpu1 = _cpu_snapshot(pids, server_pids(*ports))
                result["batches"] = run.batch_sizes()
            finally:
                await db.close()
            if profiler:
                result["profiles"] = profiler.stop(f"bench_pipeline {args.label}, {n} purchases")
                for name, entry in result["profiles"].items():
                    # py-spy counts runnable threads as busy: next to this, its seconds read as a share
                    if cpu0["procs"].get(name) is not None and cpu1["procs"].get(name) is not None:
                        entry["process_cpu_s"] = round(cpu1["procs"][name] - cpu0["procs"][name], 2)
            if backlog:
                # timed from the last poll that saw nothing handled (at most one poll early), so the
                # platform's start-up (imports, group joins) is not counted; its CPU neither
                started_at, cpu0 = idle
                result["platform_start_to_first_work_s"] = round(started_at, 3)
                done_at -= started_at
                for entry in timeline:
                    entry["t"] = round(entry["t"] - started_at, 3)
            result.update({
                "mode": args.mode,
                "seconds": round(done_at, 3),
                "purchases_per_s": round(n / done_at, 1),
                "publish_seconds": round(published["at"], 3),
                "publish_per_s": round(n / published["at"], 1),
                "stages": _stages(timeline, s.topic_prefix, n),
                "timeline": _thin(timeline, s.topic_prefix),
                "cpu": _cpu_delta(cpu0, cpu1, done_at, n),
                "poll_interval_s": POLL_S,
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            })
            result["checks"] = await _checks(s, offsets, n)
        log(f"run {index}: {n} purchases in {done_at:.2f}s = {n / done_at:.1f}/s "
            f"(publish {n / published['at']:.0f}/s); checks {'ok' if result['checks']['ok'] else 'FAILED'}")
    finally:
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()
        await run.stop()
        result["platform_logs"] = run.log_summary()
        result["platform_producers"] = producers_seen(workdir / "producers.jsonl")
        if not args.keep:
            await cleanup(s)
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            result["workdir"] = str(workdir)
    return result


def _stages(timeline: list[dict], prefix: str, n: int) -> dict:
    """When each consumer group committed its last record, and when the ledger held each credit."""
    out: dict = {}
    if not timeline:
        return out
    final = timeline[-1]
    for g, total in final["groups"].items():
        at = next((p["t"] for p in timeline if p["groups"].get(g) == total), None)
        half = next((p["t"] for p in timeline if p["groups"].get(g, 0) >= total / 2), None)
        out[g.removeprefix(prefix)] = {"records_committed": total, "last_commit_at_s": at,
                                       "half_committed_at_s": half,
                                       "records_per_s_overall": round(total / at, 1) if at else None}
    out["ledger"] = {"credits": final["credits"],
                     "all_credited_at_s": next((p["t"] for p in timeline if p["credits"] >= n), None),
                     "half_credited_at_s": next((p["t"] for p in timeline if p["credits"] >= n / 2), None)}
    return out


def _thin(timeline: list[dict], prefix: str, every_s: float = 1.0) -> list[dict]:
    """About one point per ``every_s`` (and the last), group names without the run's prefix."""
    out, next_t = [], 0.0
    for i, p in enumerate(timeline):
        if p["t"] >= next_t or i == len(timeline) - 1:
            out.append({**p, "groups": {g.removeprefix(prefix): v for g, v in p["groups"].items()}})
            next_t = p["t"] + every_s
    return out


async def _checks(s, offsets: Offsets, n: int) -> dict:
    """What the run must have produced: every purchase confirmed once and credited once, no dead letter."""
    out: dict = {}
    conn = await asyncpg.connect(s.database_url)
    try:
        out["purchases_confirmed"] = await conn.fetchval(
            f'SELECT count(*) FROM "{s.schema("purchase")}".purchases WHERE status = \'confirmed\'')
        out["credit_transfers"] = await conn.fetchval(
            f'SELECT count(*) FROM "{s.schema("quota")}".transfers WHERE kind = \'credit\'')
        out["credited_units"] = int(await conn.fetchval(
            f'SELECT coalesce(sum(credited), 0) FROM "{s.schema("quota")}".accounts') or 0)
    finally:
        await conn.close()
    ends = await offsets.topic_ends([s.topic(t) for t in ("purchase.submitted", "purchase.events", "quota.events",
                                                          *DEAD_LETTER_TOPICS)])
    out["topic_records"] = {k.removeprefix(s.topic_prefix): v for k, v in ends.items()}
    dead = sum(ends[s.topic(t)] for t in DEAD_LETTER_TOPICS)
    out["ok"] = (out["purchases_confirmed"] == n and out["credit_transfers"] == n and out["credited_units"] == n
                 and dead == 0 and ends[s.topic("purchase.submitted")] == n)
    return out


# --------------------------------------------------------------------------------------------------
# PostgreSQL's own ceiling on the same server


async def ceiling(database_url: str, seconds: float) -> dict:
    """One connection, synchronous_commit on: batched inserts of ledger-like rows, and single-row commits."""
    schema = f"bench{uuid.uuid4().hex[:10]}_ceiling"
    conn = await asyncpg.connect(database_url)
    out: dict = {"batch_rows": CEILING_BATCH, "seconds_per_case": seconds,
                 "synchronous_commit_in_session": await conn.fetchval("SHOW synchronous_commit")}
    channel = f"ch_{secrets.token_hex(4)}"
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path = "{schema}"')
        # as quota.transfers for a credit: text id primary key, the account index, a timestamp default
        await conn.execute(
            "CREATE TABLE transfers (id text PRIMARY KEY, kind text NOT NULL, channel_id text NOT NULL, "
            "account_id text NOT NULL, amount bigint NOT NULL CHECK (amount >= 0), event_id text, "
            "created_at timestamptz NOT NULL DEFAULT now())")
        await conn.execute("CREATE INDEX transfers_by_account ON transfers (channel_id, account_id)")

        def rows(k: int) -> list[tuple]:
            return [(str(uuid.uuid4()), "credit", channel, f"acct-{secrets.randbelow(2000):05d}", 1,
                     str(uuid.uuid4())) for _ in range(k)]

        unnest = ("INSERT INTO transfers (id, kind, channel_id, account_id, amount, event_id) "
                  "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[])")
        single = "INSERT INTO transfers (id, kind, channel_id, account_id, amount, event_id) VALUES ($1,$2,$3,$4,$5,$6)"

        async def batch_unnest(batch: list[tuple]) -> None:
            async with conn.transaction():
                await conn.execute(unnest, *map(list, zip(*batch, strict=True)))

        async def batch_executemany(batch: list[tuple]) -> None:
            async with conn.transaction():
                await conn.executemany(single, batch)

        async def one_row(batch: list[tuple]) -> None:
            await conn.execute(single, *batch[0])      # autocommit: one transaction, one commit

        for name, case, size in (("batch_unnest", batch_unnest, CEILING_BATCH),
                                 ("batch_executemany", batch_executemany, CEILING_BATCH),
                                 ("single_row", one_row, 1)):
            # rows are made outside the timed calls: the figure is the server's (and the driver's)
            tx, inserted, in_db = 0, 0, 0.0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                batch = rows(size)
                t0 = time.perf_counter()
                await case(batch)
                in_db += time.perf_counter() - t0
                tx += 1
                inserted += size
            out[name] = {"transactions": tx, "rows": inserted, "seconds_in_calls": round(in_db, 3),
                         "rows_per_s": round(inserted / in_db, 1), "transactions_per_s": round(tx / in_db, 1)}
    finally:
        with contextlib.suppress(Exception):
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
    out["batched_rows_per_s"] = out["batch_unnest"]["rows_per_s"]
    out["single_row_transactions_per_s"] = out["single_row"]["transactions_per_s"]
    return out


# --------------------------------------------------------------------------------------------------
# the whole invocation


def _median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["purchases_per_s"])
    return ordered[len(ordered) // 2]


async def run_all(args) -> dict:
    await wait_for_stack()
    machine = machine_facts()
    guarantees = {"server": await server_guarantees(Settings().database_url),
                  "code_mentions": code_mentions(args.code_dir)}
    log(f"PostgreSQL: synchronous_commit={guarantees['server']['synchronous_commit']}, "
        f"fsync={guarantees['server']['fsync']}; load {machine['loadavg_at_start']}")
    profiler = None
    if args.profile_dir:
        exe = py_spy_path()
        if not exe:
            raise SystemExit("--profile-dir needs py-spy (pip install py-spy into .venv)")
        profiler = Profiler(exe, args.profile_dir, args.label, args.profile_rate)
        machine["py_spy"] = py_spy_version(exe)
    ceilings, runs, failures = [], [], []
    async def attempt(what: str, call):
        """On a shared box a neighbour may restart PostgreSQL or Kafka under a run: such a run is
        reported in ``failures`` and done again (``--retries`` times), never averaged in."""
        for n in range(1, args.retries + 2):
            try:
                await wait_for_stack()
                return await call()
            except Exception as exc:  # noqa: BLE001
                log(f"{what} (attempt {n}) FAILED: {exc!r}")
                failures.append({"what": what, "attempt": n, "error": repr(exc)[:2000],
                                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return None

    for i in range(1, args.runs + 1):
        log(f"ceiling {i}: PostgreSQL batched and single-row inserts, {args.ceiling_seconds}s each")
        c = await attempt(f"ceiling {i}", lambda: ceiling(Settings().database_url, args.ceiling_seconds))
        if c:
            log(f"ceiling {i}: {c['batched_rows_per_s']:.0f} rows/s in {CEILING_BATCH}-row transactions "
                f"(executemany {c['batch_executemany']['rows_per_s']:.0f}), "
                f"{c['single_row_transactions_per_s']:.0f} single-row tx/s")
            ceilings.append(c)
        r = await attempt(f"run {i}", lambda i=i: pipeline_run(args, i))
        if r:
            runs.append(r)
    profiled = None
    if profiler:
        profiled = await attempt("profiled run", lambda: pipeline_run(args, args.runs + 1, profiler))
    await wait_for_stack()
    guarantees["server_after"] = await server_guarantees(Settings().database_url)
    if not args.keep:
        for s in CREATED:      # a run cut short by an outage may have left topics, groups or schemas
            await cleanup(s)

    valid = [r for r in runs if r["checks"]["ok"]]
    result: dict = {"label": args.label, "mode": args.mode, "purchases": args.purchases, "accounts": args.accounts,
                    "runs_requested": args.runs, "partitions": args.partitions, "layout": args.layout,
                    "log_level": args.log_level, "webhook": args.webhook or None, "code": code_facts(args.code_dir),
                    "notes": args.note, "target_purchases_per_s": TARGET_PER_S,
                    "before_purchases_per_s_in_issue": BEFORE_PER_S}
    if not ceilings:
        raise SystemExit(f"no ceiling measurement succeeded: {failures}")
    c_med = statistics.median(c["batched_rows_per_s"] for c in ceilings)
    result["ceiling"] = {
        "batched_rows_per_s_median": round(c_med, 1),
        "batched_executemany_rows_per_s_median": round(
            statistics.median(c["batch_executemany"]["rows_per_s"] for c in ceilings), 1),
        "single_row_transactions_per_s_median": round(
            statistics.median(c["single_row_transactions_per_s"] for c in ceilings), 1),
        "runs": ceilings}
    if valid:
        med = _median_run(valid)
        per_s = statistics.median(r["purchases_per_s"] for r in valid)
        result["pipeline"] = {
            "purchases_per_s_median": round(per_s, 1),
            "purchases_per_s_runs": [r["purchases_per_s"] for r in runs],
            # on a shared box the least disturbed run is the best one; the median is the figure
            "purchases_per_s_best": max(r["purchases_per_s"] for r in valid),
            "publish_per_s_median": round(statistics.median(r["publish_per_s"] for r in valid), 1),
            "seconds_median": round(statistics.median(r["seconds"] for r in valid), 3),
            "median_run": med["run"],
            "stages_of_median_run": med["stages"],
            "cpu_of_median_run": med["cpu"],
        }
        result["fraction_of_batched_ceiling"] = round(per_s / c_med, 4) if c_med else None
        result["target_fraction_of_batched_ceiling"] = round(TARGET_PER_S / c_med, 4) if c_med else None
        result["targets_met"] = {f"purchases/s >= {TARGET_PER_S:.0f}": per_s >= TARGET_PER_S}
    result["runs"] = runs
    result["profiled_run"] = profiled
    result["failures"] = failures
    publisher_acks = {r.get("publisher_acks") for r in runs + ([profiled] if profiled else [])}
    platform_acks = {p["acks"] for r in runs + ([profiled] if profiled else [])
                     for p in r.get("platform_producers", [])}
    srv = guarantees["server"]
    guarantees["verdict"] = {
        "synchronous_commit_on": srv["synchronous_commit"] == "on"
        and guarantees["server_after"]["synchronous_commit"] == "on",
        "fsync_on": srv["fsync"] == "on" and guarantees["server_after"]["fsync"] == "on",
        "no_db_role_overrides": not srv["db_role_overrides"],
        "no_synchronous_commit_in_code": not guarantees["code_mentions"]["synchronous_commit"],
        # aiokafka keeps acks=all as -1
        "publisher_acks_all": publisher_acks == {-1},
        "platform_producers_acks_all": bool(platform_acks) and platform_acks == {-1},
    }
    result["guarantees"] = guarantees
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"] = machine
    result["generated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


# --------------------------------------------------------------------------------------------------
# the README table


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _column(r: dict) -> dict[str, str]:
    p = r.get("pipeline") or {}
    c = r["ceiling"]
    stages = p.get("stages_of_median_run") or {}
    cpu = (p.get("cpu_of_median_run") or {}).get("per_process_cpu_ms_per_purchase", {})
    col = {
        "purchases/s end to end (median)": _fmt(p.get("purchases_per_s_median")),
        "runs (purchases/s)": ", ".join(_fmt(x) for x in p.get("purchases_per_s_runs", [])) or "-",
        "purchases per run": f"{r['purchases']:,}",
        "publish rate (records/s, acks=all)": _fmt(p.get("publish_per_s_median")),
        "seconds to caught up (median)": _fmt(p.get("seconds_median")),
    }
    for g in ("purchase.confirmation", "quota.ledger", "notification.intake"):
        if g in stages:
            col[f"`{g}` last commit at (s)"] = _fmt(stages[g]["last_commit_at_s"])
    for name in ("purchase", "quota", "notification", "all", "postgres (whole server)", "kafka (whole server)"):
        if name in cpu:
            col[f"CPU ms per purchase: {name}"] = _fmt(cpu[name])
    col.update({
        f"PostgreSQL ceiling: rows/s in {CEILING_BATCH}-row transactions": _fmt(c["batched_rows_per_s_median"]),
        f"PostgreSQL: rows/s in {CEILING_BATCH}-row transactions (executemany)":
            _fmt(c["batched_executemany_rows_per_s_median"]),
        "PostgreSQL: single-row transactions/s": _fmt(c["single_row_transactions_per_s_median"]),
        "fraction of the batched ceiling": (f"{100 * r['fraction_of_batched_ceiling']:.1f}%"
                                            if r.get("fraction_of_batched_ceiling") is not None else "-"),
        f"target {TARGET_PER_S:.0f}/s as a fraction of the ceiling":
            (f"{100 * r['target_fraction_of_batched_ceiling']:.1f}%"
             if r.get("target_fraction_of_batched_ceiling") is not None else "-"),
        f"target >= {TARGET_PER_S:.0f} purchases/s met":
            ("yes" if all((r.get("targets_met") or {"": False}).values()) else "no"),
        "guarantees (sync commit, fsync, acks=all)":
            "unchanged" if all(r["guarantees"]["verdict"].values()) else "CHANGED: see JSON",
        "machine load at start": " / ".join(f"{x:.2f}" for x in r["machine"]["loadavg_at_start"]),
    })
    return col


def markdown(result: dict, baseline: dict | None) -> str:
    def head(r: dict) -> str:
        return f"{r['label']} (`{r['code']['commit'][:7]}`)"
    cols = [(head(baseline), _column(baseline))] if baseline else []
    cols.append((head(result), _column(result)))
    keys = list(dict.fromkeys(k for _, c in cols for k in c))
    rows = ["| measure | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    rows += [f"| {k} | " + " | ".join(c.get(k, "-") for _, c in cols) + " |" for k in keys]
    m = result["machine"]
    g = result["guarantees"]["server"]
    layout = "one process per service" if result["layout"] == "separate" else "one process for all services"
    backlog = result.get("mode") == "backlog"
    rows += ["", f"- {m['cpu']}, {m['usable_cores']} usable cores shared by Kafka, PostgreSQL, the platform "
                 f"({layout}) "
                 + ("(the backlog published before the platform started, timed from its first handled record)"
                    if backlog else "and the publisher") + ";"
                 f" {result['partitions']} partitions per topic; {result['accounts']:,} accounts; "
                 f"PostgreSQL {g['server_version']} with synchronous_commit={g['synchronous_commit']}, "
                 f"fsync={g['fsync']}; Python {m['python']}."]
    for r in ([baseline] if baseline else []) + [result]:
        for note in r.get("notes") or []:
            rows.append(f"- {r['label']}: {note}")
        if r.get("failures"):
            rows.append(f"- {r['label']}: {len(r['failures'])} attempt(s) failed and were run again "
                        "(a neighbour restarting PostgreSQL or Kafka, say): see `failures` in the JSON.")
        svgs = [v.get("svg") for v in ((r.get("profiled_run") or {}).get("profiles") or {}).values() if v.get("svg")]
        if svgs:
            rows.append(f"- {r['label']} profiles (py-spy, one extra run): "
                        + ", ".join(f"[{Path(s).stem}]({s})" for s in svgs)
                        + " (and `.speedscope.json` beside each, for speedscope.app)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/pipeline.json"))
    parser.add_argument("--readme", type=Path, help="also put the table into this README between the markers")
    parser.add_argument("--purchases", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4, help="partitions of each topic (BUBUH_DEFAULT_PARTITIONS)")
    parser.add_argument("--layout", choices=("separate", "single"), default="separate",
                        help="separate: one `bubuh serve` process per service; single: one for all three")
    parser.add_argument("--code-dir", type=Path, default=HERE,
                        help="repo whose `services` package the platform (and the publisher) run; default this one")
    parser.add_argument("--label", "--profile-label", dest="label", default="after",
                        help="names this measurement (before|after) in the JSON, README and profile files")
    parser.add_argument("--profile-dir", type=Path, help="also record py-spy profiles of one extra run here")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--baseline", type=Path, help=f"a previous result shown beside this one in the README "
                                                      f"(default {DEFAULT_BASELINE} when it exists)")
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    parser.add_argument("--mode", choices=("concurrent", "backlog"), default="concurrent",
                        help="concurrent: publish while the platform runs (the publisher shares the cores); "
                             "backlog: publish everything first, start the platform, time the drain")
    parser.add_argument("--chunk", type=int, default=1000, help="records per publish_many call")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a run may take to catch up")
    parser.add_argument("--log-level", default="info", help="the platform processes' BUBUH_LOG_LEVEL")
    parser.add_argument("--webhook", default="", help="the channel's webhook URL (default none)")
    parser.add_argument("--note", action="append", default=[], help="a remark kept in the JSON and README")
    parser.add_argument("--retries", type=int, default=1, help="attempts again a run that failed (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep each run's topics, schemas and logs")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite the README table from --out (and the baseline)")
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads(args.out.read_text())
    else:
        args.code_dir = args.code_dir.resolve()
        _load_services(args.code_dir)
        result = asyncio.run(run_all(args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    # the recorded baseline was measured in concurrent mode: it stands beside that mode only
    baseline_path = args.baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE.exists() and args.mode == "concurrent"
                                      else None)
    baseline = None
    if baseline_path and baseline_path.resolve() != args.out.resolve():
        baseline = json.loads(baseline_path.read_text())
    table = markdown(result, baseline)
    print(table)
    print(json.dumps({"guarantees": result["guarantees"]["verdict"]}, indent=2))
    if args.readme:
        backlog = args.mode == "backlog"
        update_readme(args.readme, table, result["generated_at"],
                      begin=README_BACKLOG_BEGIN if backlog else README_BEGIN,
                      end=README_BACKLOG_END if backlog else README_END, source=str(args.out))
    if args.render_only:
        return 0
    ok = (len(result["runs"]) == args.runs and all(r["checks"]["ok"] for r in result["runs"])
          and (not args.profile_dir or result["profiled_run"] is not None))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
