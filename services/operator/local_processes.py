"""``bubuh up`` / ``down`` / ``status``: the platform as background processes of the local stack.

The production shape in miniature: a process per tier, as the pods of deploy/k8s (``TIER_PROCESSES``:
the API, and the purchase, quota, notification and stamping workers), so the front door, the ledger
and signing never wait for each other's turn in one interpreter. ``BUBUH_LOCAL_LAYOUT=shared`` runs
the API with the light workers in one process and stamping in another (``PROCESSES``: fewer
processes, but a flood's intake then delays every channel's quota hop in that one event loop: the
fairness surge measured x3.8-4.5 there against x2.0-2.2 per tier, 2 December). Pids in
``.local/run/``, JSON logs in ``.local/logs/``; ``up`` returns once every process is ready and the
API answers ``/healthz``.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from services.kernel.door_pressure import AUTOGROUP
from services.kernel.runtime import ConfigError
from services.kernel.settings import Settings

PROCESSES: dict[str, list[str]] = {
    "bubuh": ["--api", "all", "--workers", "purchase,quota,notification"],
    "stamping-1": ["--api", "none", "--workers", "stamping"],
}


# BUBUH_LOCAL_LAYOUT=tiers (the default): a process per tier, as the pods of deploy/k8s (the API serves
# every route and runs no consumer), so a surge measures each tier's CPU on its own (docs/capacity.md),
# and BUBUH_LOCAL_TIER_MEMBERS of each (<tier>-1 .. <tier>-N; the API's share one port, SO_REUSEPORT)
TIER_PROCESSES: dict[str, list[str]] = {
    "api": ["--api", "all", "--workers", "none"],
    "purchase": ["--api", "none", "--workers", "purchase"],
    "quota": ["--api", "none", "--workers", "quota"],
    "notification": ["--api", "none", "--workers", "notification"],
    "stamping": ["--api", "none", "--workers", "stamping"],
}


def processes(settings: Settings) -> dict[str, list[str]]:
    """What ``up`` starts: ``TIER_PROCESSES`` with ``BUBUH_LOCAL_TIER_MEMBERS`` of each (the API and the
    stamping tier by ``api_members`` and ``stamping_members``); or, with ``BUBUH_LOCAL_LAYOUT=shared``,
    ``PROCESSES`` with ``stamping_members`` stamping workers (``stamping-1`` .. ``stamping-N``, one
    consumer group: Kafka splits the partitions between them, and their takers sign from one queue)."""
    if settings.local_layout == "tiers":
        n = max(1, settings.local_tier_members)
        count = {"stamping": stamping_members(settings), "api": api_members(settings)}
        return {f"{tier}-{i}": args for tier, args in TIER_PROCESSES.items()
                for i in range(1, count.get(tier, n) + 1)}
    out = dict(PROCESSES)
    for i in range(2, stamping_members(settings) + 1):
        out[f"stamping-{i}"] = PROCESSES["stamping-1"]
    return out


API_MEMBERS_MAX = 4


def api_members(settings: Settings) -> int:
    """API processes in the tiers layout: ``BUBUH_LOCAL_API_MEMBERS``, or by default one per core this
    process may run on (at most ``API_MEMBERS_MAX``, at least ``BUBUH_LOCAL_TIER_MEMBERS``). One API
    process is one core at most: in an open-loop spike at 3x the sustainable rate it answered 503 (64 in
    flight) to 2,224 of 3,960 arrivals on this 2-core box, two 0-497 (docs/surge-journal.md: "The front door first")."""
    if settings.local_api_members > 0:
        return settings.local_api_members
    return max(1, settings.local_tier_members, min(API_MEMBERS_MAX, len(os.sched_getaffinity(0))))


STAMPING_MEMBERS_MAX = 4


def stamping_members(settings: Settings) -> int:
    """Stamping worker processes: ``BUBUH_LOCAL_STAMPING_MEMBERS``, or by default one per core this process
    may run on (at most ``STAMPING_MEMBERS_MAX``, at least ``BUBUH_LOCAL_TIER_MEMBERS``). Each process leads
    a session of its own, and with the kernel's autogroups a session is what shares the CPU: one worker with
    its signing children took the share of one API process (make surge-sustained, 5 December: 40% of a
    core at 125 arrivals/s, 47.6 stamps/s over the first 300 s); two took 62% and signed 62.0/s over 300 s."""
    if settings.local_stamping_members > 0:
        return settings.local_stamping_members
    return max(1, settings.local_tier_members, min(STAMPING_MEMBERS_MAX, len(os.sched_getaffinity(0))))


def metrics_targets(settings: Settings) -> dict[str, tuple[str, int]]:
    """Each process's Prometheus job and its own /metrics port, never shared: a process with API routes
    serves /metrics on BUBUH_HTTP_PORT; the worker-only ones, and API members sharing the HTTP port,
    get BUBUH_METRICS_PORT, +1, +2, ... in order (default: the HTTP port + 1), so a scrape always lands
    on the one process it names."""
    base = settings.metrics_port or settings.http_port + 1
    targets: dict[str, tuple[str, int]] = {}
    for name, args in processes(settings).items():
        api, workers = args[args.index("--api") + 1], args[args.index("--workers") + 1]
        if api != "none" and _shares_port(settings):
            targets[name] = ("bubuh-api", base)         # the shared HTTP port answers from any member
            base += 1
        elif api != "none":
            targets[name] = ("bubuh-api", settings.http_port)
        else:
            tier = workers if "," not in workers else "workers"
            targets[name] = (f"bubuh-{tier}", base)
            base += 1
    return targets


def lower_priority(nice: int) -> None:
    """Run at ``nice`` against the other processes of the box: the process's own nice value, and its
    session's autogroup's (it runs in a child after ``setsid``, before the exec).

    Each process ``up`` starts leads a session of its own, and with the kernel's autogroups
    (``/proc/sys/kernel/sched_autogroup_enabled``, on by default) each session is a scheduling group
    whose weight its tasks' nice values do not change: sched(7), "the nice value is now relative only to
    other threads in the same autogroup". Until 4 December the workers ran at nice 10 that way, and
    took the same CPU share as at 0 (two busy loops in sessions of their own, one at nice 19: 43% and
    45% of a core each). The group's own nice (``/proc/<pid>/autogroup``) is what weighs; without
    autogroups (disabled, or the process in a cgroup of its own) the nice value does."""
    os.nice(nice)
    try:
        AUTOGROUP.write_text(str(nice))
    except OSError:      # no autogroups here: the nice value above is the one that counts
        pass


def _serves_api(args: list[str]) -> bool:
    return args[args.index("--api") + 1] != "none"


def _shares_port(settings: Settings) -> bool:
    """Several API processes: they bind the HTTP port together (BUBUH_HTTP_REUSE_PORT)."""
    return sum(_serves_api(a) for a in processes(settings).values()) > 1


def process_env(settings: Settings, name: str) -> dict[str, str]:
    """The settings ``up`` gives one process on top of the environment."""
    env = {"BUBUH_METRICS_PORT": str(metrics_targets(settings)[name][1]),
           # every process of the local stack shares this box's cores: the stamping workers yield them to a busy
           # front door (kernel/door_pressure.py)
           "BUBUH_DOOR_BUSY_FILE": settings.door_busy_file or str(_run_dir(settings) / "door-busy")}
    if _serves_api(processes(settings)[name]) and _shares_port(settings):
        env["BUBUH_HTTP_REUSE_PORT"] = "true"
    return env


def _run_dir(settings: Settings) -> Path:
    run = settings.local_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    (settings.local_dir / "logs").mkdir(parents=True, exist_ok=True)
    return run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(settings: Settings, name: str) -> int | None:
    try:
        pid = int((_run_dir(settings) / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def pids(settings: Settings) -> dict[str, int | None]:
    """The pid of each platform process ``up`` started (None: not running)."""
    return {name: _pid(settings, name) for name in processes(settings)}


def _healthy(settings: Settings) -> bool:
    try:
        with urllib.request.urlopen(f"http://{settings.http_host}:{settings.http_port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


# At `up`, a process's log past this size becomes <name>.log.1 (the one before it is dropped): the logs of
# a box that runs benchmarks day after day grew to hundreds of MB, every start appending to the same file.
LOG_ROTATE_BYTES = 64 * 1024 * 1024


def log_file(settings: Settings, name: str) -> Path:
    """Where process ``name`` writes, its last log set aside first when it has grown past ``LOG_ROTATE_BYTES``."""
    path = settings.local_dir / "logs" / f"{name}.log"
    try:
        if path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(path, path.with_name(f"{name}.log.1"))
    except FileNotFoundError:
        pass
    return path


def up(settings: Settings, timeout: float = 90) -> None:
    run = _run_dir(settings)
    wanted = processes(settings)
    running = {name: _pid(settings, name) for name in wanted}
    if all(running.values()):
        print(f"bubuh: already running (pids {', '.join(str(p) for p in running.values())}), "
              f"API on {settings.public_url}")
        return
    started: dict[str, subprocess.Popen] = {}
    for name, args in wanted.items():
        if running[name]:
            continue
        ready = run / f"{name}.ready"
        ready.unlink(missing_ok=True)
        env = {**os.environ, **process_env(settings, name)}
        # BUBUH_LOCAL_WORKER_NICE: worker-only processes yield the CPU to the API's; set before the exec, so
        # every thread and child of the process inherits it (default 0: equal shares, see lower_priority)
        nice = 0 if _serves_api(args) else settings.local_worker_nice
        with open(log_file(settings, name), "ab") as log:
            started[name] = subprocess.Popen(
                [sys.executable, "-m", "services.operator.cli", "serve", *args, "--ready-file", str(ready)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                preexec_fn=functools.partial(lower_priority, nice) if nice > 0 else None)
        (run / f"{name}.pid").write_text(str(started[name].pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in started.items():
            if proc.poll() is not None:
                logfile = settings.local_dir / "logs" / f"{name}.log"
                down(settings, quiet=True)
                raise ConfigError(f"{name} exited during start: {_last_line(logfile)} (log: {logfile})")
        if all((run / f"{name}.ready").exists() for name in wanted) and _healthy(settings):
            pids = ", ".join(str(_pid(settings, n)) for n in wanted)
            print(f"bubuh: running (pids {pids}), API on {settings.public_url}, logs in {settings.local_dir / 'logs'}")
            return
        time.sleep(0.3)
    down(settings, quiet=True)
    raise ConfigError(f"the platform did not become healthy in {timeout:g} s (logs in {settings.local_dir / 'logs'})")


def down(settings: Settings, quiet: bool = False) -> None:
    run = _run_dir(settings)
    # every process a pid file names, too: one started under another BUBUH_LOCAL_STAMPING_MEMBERS
    names = [*processes(settings), *(p.stem for p in sorted(run.glob("*.pid")))]
    pids = {name: _pid(settings, name) for name in dict.fromkeys(names)}
    for pid in filter(None, pids.values()):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for pid in filter(None, pids.values()):
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    for name in pids:
        (run / f"{name}.pid").unlink(missing_ok=True)
        (run / f"{name}.ready").unlink(missing_ok=True)
    if not quiet:
        print("bubuh: stopped" if any(pids.values()) else "bubuh: not running")


def status(settings: Settings) -> bool:
    wanted = processes(settings)
    pids = {name: _pid(settings, name) for name in wanted}
    healthy = _healthy(settings)
    for name, pid in pids.items():
        print(f"bubuh: {name} " + (f"running (pid {pid})" if pid else "stopped"))
    if all(pids.values()) and healthy:
        print(f"bubuh: API on {settings.public_url}")
        return True
    if any(pid for name, pid in pids.items() if _serves_api(wanted[name])) and not healthy:
        print("bubuh: running but the API does not answer")
    return False


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return "no log"
    return lines[-1][:300] if lines else "no log"
