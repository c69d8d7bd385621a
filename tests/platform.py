"""Bubuh processes for tests: the real CLI, started as subprocesses on the isolated settings.

A test can kill one with SIGKILL and start it again, exactly as an operator's machine would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.kernel.settings import REPO_ROOT, Settings
from services.operator import process_tree
from tests.stack import free_port

__all__ = ["PlatformProcess", "add_channel", "cli", "env_for", "free_port"]

# Where each process's log directory goes. The suite points it at pytest's temporary directory
# (tests/conftest.py), which pytest prunes to its last three runs; left as None (the system's temporary
# directory), nothing removes the logs.
LOG_ROOT: Path | None = None


def env_for(settings: Settings, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "BUBUH_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "BUBUH_DATABASE_URL": settings.database_url,
        "BUBUH_TOPIC_PREFIX": settings.topic_prefix,
        "BUBUH_SCHEMA_PREFIX": settings.schema_prefix,
        "BUBUH_HTTP_PORT": str(settings.http_port),
        "BUBUH_LOG_FORMAT": "json",
        "BUBUH_DEFAULT_PARTITIONS": str(settings.default_partitions),
        "BUBUH_KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "BUBUH_KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism,
        "BUBUH_WEBHOOK_LOCAL_MODE": str(settings.webhook_local_mode).lower(),
        "BUBUH_WEBHOOK_HOSTS": settings.webhook_hosts,
        "BUBUH_PADES_LEVEL": settings.pades_level,
        "BUBUH_SIGNING_P12_PATH": settings.signing_p12_path,
        "BUBUH_CONSUMER_FETCH_MIN_BYTES": str(settings.consumer_fetch_min_bytes),
        "BUBUH_CONSUMER_FETCH_MAX_WAIT_MS": str(settings.consumer_fetch_max_wait_ms),
    })
    if settings.kafka_security_protocol.upper() != "PLAINTEXT":
        # resolved here: a child may get a BUBUH_LOCAL_DIR of its own, without the stack's credential files
        user, password = settings.kafka_credential()
        admin_user, admin_password = settings.kafka_credential(admin=True)
        env.update({"BUBUH_KAFKA_USERNAME": user, "BUBUH_KAFKA_PASSWORD": password,
                    "BUBUH_KAFKA_ADMIN_USERNAME": admin_user, "BUBUH_KAFKA_ADMIN_PASSWORD": admin_password})
    env.update({k: str(v) for k, v in extra.items()})
    return env


class PlatformProcess:
    def __init__(self, settings: Settings, *, api: str = "all", workers: str = "all", name: str = "bubuh",
                 own_group: bool = False, **env) -> None:
        """``own_group``: the process leads a process group of its own (with its fork server and sandbox
        children), as under `bubuh up`, so ``stop_group`` can stop them all at once."""
        self.settings = settings
        self.own_group = own_group
        self.api, self.workers, self.name = api, workers, name
        self.env = env_for(settings, **env)
        self.proc: subprocess.Popen | None = None
        self._dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=LOG_ROOT))
        self.log_path = self._dir / f"{name}.log"

    async def start(self, timeout: float = 60) -> PlatformProcess:
        ready = self._dir / f"{self.name}.ready"
        ready.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.operator.cli", "serve", "--api", self.api, "--workers", self.workers,
             "--ready-file", str(ready)], cwd=REPO_ROOT, env=self.env, stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=self.own_group)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout}s: {self.tail()}")
            await asyncio.sleep(0.1)
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush, no commit."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            await self._ended_or_killed(20)

    async def _ended_or_killed(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the process to end after a stop signal, then SIGKILL it."""
        for _ in range(int(timeout * 10)):
            if self.proc.poll() is not None:
                return
            await asyncio.sleep(0.1)
        self.kill()

    def group(self) -> list[int]:
        """The live processes of its process group (``own_group``): itself, its fork server, its children."""
        assert self.own_group and self.proc is not None
        return process_tree.group(self.proc.pid)

    async def stop_group(self, timeout: float = 20) -> None:
        """SIGTERM to the whole process group, as `bubuh down` and systemd stop a service: a graceful stop."""
        assert self.own_group and self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        await self._ended_or_killed(timeout)

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out


def cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.operator.cli", *args], cwd=REPO_ROOT, env=env_for(settings),
                          capture_output=True, text=True, timeout=120, check=check)


def add_channel(settings: Settings, name: str = "test-channel", webhook: str = "", *, by_cli: bool = False) -> dict:
    """``bubuh channel add NAME --json``: its output. By default the command's own code runs in this
    process (on a loop of its own, so a test's running loop may call it): a ``bubuh`` subprocess costs
    ~2 s of CPU to import and connect, and the suite adds a channel for most of its tests. ``by_cli``
    runs the real command (``test_channel_door_java`` does, with the credential it prints)."""
    if by_cli:
        args = ["channel", "add", name, "--json"] + (["--webhook", webhook] if webhook else [])
        return json.loads(cli(settings, *args).stdout)
    from services.purchase import admin
    # the settings the command would read from env_for's environment (local_dir, keys and the sealing
    # key from this process's, as a child's): the test's object may carry a broker's own local dir
    as_child = Settings(**{k.removeprefix("BUBUH_").lower(): v for k, v in env_for(settings).items()
                           if k.startswith("BUBUH_")})
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="channel-add") as own_loop:
        return own_loop.submit(asyncio.run, admin.add_channel(as_child, name, webhook=webhook)).result(timeout=120)
