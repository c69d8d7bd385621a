"""``bubuh up`` / ``down`` / ``status``: the platform as a background process of the local stack.

One ``bubuh serve`` process (all services), its pid in ``.local/run/bubuh.pid`` and its JSON logs
in ``.local/logs/bubuh.log``. ``up`` returns once the API answers ``/healthz``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from services.kernel.runtime import ConfigError
from services.kernel.settings import Settings


def _paths(settings: Settings):
    run = settings.local_dir / "run"
    logs = settings.local_dir / "logs"
    run.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    return run / "bubuh.pid", logs / "bubuh.log", run / "bubuh.ready"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(settings: Settings) -> int | None:
    pidfile, _, _ = _paths(settings)
    try:
        pid = int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _healthy(settings: Settings) -> bool:
    try:
        with urllib.request.urlopen(f"http://{settings.http_host}:{settings.http_port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def up(settings: Settings, timeout: float = 90) -> None:
    pidfile, logfile, readyfile = _paths(settings)
    pid = _pid(settings)
    if pid:
        print(f"bubuh: already running (pid {pid}), API on {settings.public_url}")
        return
    readyfile.unlink(missing_ok=True)
    with open(logfile, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--ready-file", str(readyfile)],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    pidfile.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pidfile.unlink(missing_ok=True)
            last = _last_line(logfile)
            raise ConfigError(f"the platform exited during start: {last} (log: {logfile})")
        if readyfile.exists() and _healthy(settings):
            print(f"bubuh: running (pid {proc.pid}), API on {settings.public_url}, logs in {logfile}")
            return
        time.sleep(0.3)
    down(settings)
    raise ConfigError(f"the platform did not become healthy in {timeout:g} s (log: {logfile})")


def down(settings: Settings) -> None:
    pidfile, _, readyfile = _paths(settings)
    pid = _pid(settings)
    if not pid:
        pidfile.unlink(missing_ok=True)
        print("bubuh: not running")
        return
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    readyfile.unlink(missing_ok=True)
    print("bubuh: stopped")


def status(settings: Settings) -> bool:
    pid = _pid(settings)
    if pid and _healthy(settings):
        print(f"bubuh: running (pid {pid}), API on {settings.public_url}")
        return True
    print("bubuh: running but not answering" if pid else "bubuh: stopped")
    return False


def _last_line(path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return "no log"
    return lines[-1][:300] if lines else "no log"
